-- flashsale sharded Postgres store: one shard database, schema 2.
--
-- The sweeps read through partial indexes that hold only the orders they look for, so their
-- cost does not grow with the number of settled orders. Each index ends with order_id, the
-- queries' tie-breaker, so a LIMIT stops early without a sort.

-- orders_in_status(persisted / payment_pending): the query writes its statuses as literals,
-- from which the planner proves this index usable (a parameter, `status = ANY($1)`, proves
-- nothing about a partial index).
CREATE INDEX orders_open ON orders (accepted_at, order_id)
    WHERE status IN ('persisted', 'payment_pending');

-- pending_since (replaces schema 1's index on updated_at alone).
DROP INDEX orders_pending;
CREATE INDEX orders_pending ON orders (updated_at, order_id)
    WHERE status = 'payment_pending';

-- unfinished_followups: final orders whose release (failed, expired) or notification is owed.
CREATE INDEX orders_followups ON orders (accepted_at, order_id)
    WHERE (status IN ('payment_failed', 'expired') AND released_at IS NULL) OR
          (status IN ('paid', 'payment_failed', 'expired') AND notified_at IS NULL);

-- A charge id is a provider's short id: a longer one is refused by the database itself.
ALTER TABLE orders ADD CONSTRAINT orders_charge_id_length CHECK (length(charge_id) <= 200);
