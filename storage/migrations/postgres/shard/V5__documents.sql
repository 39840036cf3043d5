-- flashsale sharded Postgres store: one shard database, schema 5.
--
-- Documents stored for an order in object storage, by object key (the receipts stage
-- records a key once the object is written):
--   receipt_key      the receipt of a paid order;
--   refund_note_key  the note of a refunded late charge.
ALTER TABLE orders
    ADD COLUMN receipt_key TEXT CHECK (length(receipt_key) <= 512),
    ADD COLUMN refund_note_key TEXT CHECK (length(refund_note_key) <= 512);

-- documents_owed: the receipts stage's work (none once it has caught up).
CREATE INDEX orders_documents_owed ON orders (accepted_at, order_id)
    WHERE (status = 'paid' AND receipt_key IS NULL)
       OR (refund_state = 'refunded' AND refund_note_key IS NULL);
