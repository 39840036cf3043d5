-- flashsale embedded store, schema 4.
--
-- Orders and units per sale and status, and how many of them were released: what
-- sale_totals (the stats route, the per-sale metrics) reads, a few rows instead of every
-- order of the sale. Every write of orders updates it in the same transaction
-- (storage/src/batch.rs); this migration fills it from the orders already held.
CREATE TABLE sale_totals (
    sale_id          TEXT NOT NULL,
    status           TEXT NOT NULL,
    orders           INTEGER NOT NULL,
    units            INTEGER NOT NULL,
    released_orders  INTEGER NOT NULL,
    released_units   INTEGER NOT NULL,
    PRIMARY KEY (sale_id, status)
);

INSERT INTO sale_totals (sale_id, status, orders, units, released_orders, released_units)
SELECT sale_id, status, count(*), sum(quantity),
       sum(CASE WHEN released_at IS NULL THEN 0 ELSE 1 END),
       sum(CASE WHEN released_at IS NULL THEN 0 ELSE quantity END)
FROM orders GROUP BY sale_id, status;
