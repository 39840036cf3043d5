-- flashsale embedded store, schema 2: order_history doubles as the outbox of
-- flashsale.order-events.v1 (a row is written in the status change's transaction).
ALTER TABLE order_history ADD COLUMN published INTEGER NOT NULL DEFAULT 0;
CREATE INDEX order_history_unpublished ON order_history (at) WHERE published = 0;
