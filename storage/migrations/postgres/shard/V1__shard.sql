-- flashsale sharded Postgres store: one shard database, schema 1.
-- An order lives on shard jump_hash(mix(order id), shards) (storage/src/shard.rs), together
-- with its history. order_history doubles as the outbox of flashsale.order-events.v1: a row
-- is written in the status change's transaction and flagged once published.
-- Instants are BIGINT milliseconds since the Unix epoch, as in the embedded store.
CREATE TABLE orders (
    order_id         UUID PRIMARY KEY,
    sale_id          TEXT NOT NULL,
    user_id          TEXT NOT NULL,
    quantity         INTEGER NOT NULL CHECK (quantity > 0),
    amount_minor     BIGINT NOT NULL,
    currency         TEXT NOT NULL,
    sequence         BIGINT NOT NULL,
    idempotency_key  TEXT NOT NULL,
    payment_token    TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('accepted', 'persisted',
                         'payment_pending', 'paid', 'payment_failed', 'expired')),
    accepted_at      BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    charge_id        TEXT,
    released_at      BIGINT,
    notified_at      BIGINT
);
CREATE INDEX orders_by_sale ON orders (sale_id, sequence);
CREATE INDEX orders_by_status ON orders (status, accepted_at);
CREATE INDEX orders_pending ON orders (updated_at) WHERE status = 'payment_pending';

CREATE TABLE order_history (
    id         BIGINT GENERATED ALWAYS AS IDENTITY,
    order_id   UUID NOT NULL REFERENCES orders (order_id) ON DELETE CASCADE,
    status     TEXT NOT NULL,
    at         BIGINT NOT NULL,
    published  BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (order_id, status)
);
CREATE INDEX order_history_unpublished ON order_history (at, id) WHERE NOT published;
