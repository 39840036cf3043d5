-- flashsale sharded Postgres store: the catalog database, schema 2.
-- How many shards the order ids are hashed over. Written once by `flashsale migrate`;
-- a store opened with another number of shards is refused, since every order id would be
-- looked for on the wrong shard.
CREATE TABLE store_layout (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    shards  INTEGER NOT NULL CHECK (shards > 0)
);
