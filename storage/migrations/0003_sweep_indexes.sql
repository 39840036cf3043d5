-- flashsale embedded store, schema 3.
--
-- The sweeps read through partial indexes that hold only the orders they look for, so their
-- cost does not grow with the number of settled orders. The queries repeat each index's
-- condition as it is written here (SQLite uses a partial index only when the query's WHERE
-- clause contains the index's condition term for term) and name it with INDEXED BY: left to
-- itself the planner prefers orders_by_status (status = ?), which for unfinished_followups
-- reads every paid order; INDEXED BY also makes a query fail rather than scan if its index
-- is ever dropped.

-- orders_in_status(persisted / payment_pending): unsettled orders, oldest accepted first.
CREATE INDEX orders_open ON orders (accepted_at)
    WHERE status IN ('persisted', 'payment_pending');

-- pending_since: payment_pending orders by the instant they entered it.
CREATE INDEX orders_pending ON orders (updated_at)
    WHERE status = 'payment_pending';

-- unfinished_followups: final orders whose release (failed, expired) or notification is owed.
CREATE INDEX orders_followups ON orders (accepted_at)
    WHERE (status IN ('payment_failed', 'expired') AND released_at IS NULL) OR
          (status IN ('paid', 'payment_failed', 'expired') AND notified_at IS NULL);

-- A charge id is a provider's short id: a longer one is refused by the database itself (a
-- trigger, since SQLite cannot add a CHECK constraint to an existing table). The message is
-- matched by storage/src/sqlite.rs.
CREATE TRIGGER orders_charge_id_length_insert BEFORE INSERT ON orders
    WHEN length(NEW.charge_id) > 200
BEGIN
    SELECT RAISE(ABORT, 'orders.charge_id is longer than 200 characters');
END;
CREATE TRIGGER orders_charge_id_length_update BEFORE UPDATE OF charge_id ON orders
    WHEN length(NEW.charge_id) > 200
BEGIN
    SELECT RAISE(ABORT, 'orders.charge_id is longer than 200 characters');
END;
