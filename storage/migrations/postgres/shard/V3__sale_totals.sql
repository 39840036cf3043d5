-- flashsale sharded Postgres store: one shard database, schema 3.
--
-- Orders and units per sale and status on this shard, and how many of them were released:
-- what sale_totals reads (summed over the shards), a few rows instead of every order of
-- the sale. Every write of orders updates it in the same transaction, rows in sorted
-- order (storage/src/batch.rs); this migration fills it from the orders already held, so
-- run it with the writers (serve, settle) stopped.
CREATE TABLE sale_totals (
    sale_id          TEXT NOT NULL,
    status           TEXT NOT NULL,
    orders           BIGINT NOT NULL,
    units            BIGINT NOT NULL,
    released_orders  BIGINT NOT NULL,
    released_units   BIGINT NOT NULL,
    PRIMARY KEY (sale_id, status)
);

INSERT INTO sale_totals (sale_id, status, orders, units, released_orders, released_units)
SELECT sale_id, status, count(*), coalesce(sum(quantity), 0),
       count(released_at), coalesce(sum(quantity) FILTER (WHERE released_at IS NOT NULL), 0)
FROM orders GROUP BY sale_id, status;
