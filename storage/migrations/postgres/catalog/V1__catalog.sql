-- flashsale sharded Postgres store: the catalog database, schema 1.
-- It holds what is not per order: the sale catalog and the consumers' log checkpoints.
-- Instants are BIGINT milliseconds since the Unix epoch, as in the embedded store.
CREATE TABLE sales (
    id          TEXT PRIMARY KEY,
    body        TEXT NOT NULL,   -- the Sale as JSON (stock below is authoritative)
    stock       BIGINT NOT NULL CHECK (stock >= 0),
    created_at  BIGINT NOT NULL
);
CREATE INDEX sales_by_created_at ON sales (created_at, id);

CREATE TABLE consumer_offsets (
    consumer     TEXT NOT NULL,
    partition    BIGINT NOT NULL,
    next_offset  BIGINT NOT NULL,
    PRIMARY KEY (consumer, partition)
);
