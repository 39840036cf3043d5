-- flashsale embedded store, schema 5.
--
-- State the settler used to keep in memory, now on the order so a restart keeps it:
--   refund_state     the refund of a charge that landed after the order was void
--                    ('owed', 'refunded', 'refused'; the charge is charge_id);
--   failed_attempts  charge attempts that failed at the provider (errors, not declines);
--   retry_after      the earliest next attempt (milliseconds) after such a failure.
ALTER TABLE orders ADD COLUMN refund_state TEXT
    CHECK (refund_state IN ('owed', 'refunded', 'refused'));
ALTER TABLE orders ADD COLUMN failed_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE orders ADD COLUMN retry_after INTEGER;

-- refunds_owed: the refunds the sweep retries (few, and none most of the time).
CREATE INDEX orders_refunds_owed ON orders (accepted_at) WHERE refund_state = 'owed';
