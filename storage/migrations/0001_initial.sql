-- flashsale embedded store, schema 1.
CREATE TABLE sales (
    id          TEXT PRIMARY KEY,
    body        TEXT NOT NULL,   -- the Sale as JSON (stock below is authoritative)
    stock       INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE orders (
    order_id         TEXT PRIMARY KEY,
    sale_id          TEXT NOT NULL,
    user_id          TEXT NOT NULL,
    quantity         INTEGER NOT NULL CHECK (quantity > 0),
    amount_minor     INTEGER NOT NULL,
    currency         TEXT NOT NULL,
    sequence         INTEGER NOT NULL,
    idempotency_key  TEXT NOT NULL,
    payment_token    TEXT NOT NULL,
    status           TEXT NOT NULL,
    accepted_at      INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    charge_id        TEXT,
    released_at      INTEGER,
    notified_at      INTEGER
);
CREATE INDEX orders_by_sale_status ON orders (sale_id, status);
CREATE INDEX orders_by_status ON orders (status, accepted_at);

CREATE TABLE order_history (
    order_id  TEXT NOT NULL,
    status    TEXT NOT NULL,
    at        INTEGER NOT NULL,
    PRIMARY KEY (order_id, status)
);

CREATE TABLE consumer_offsets (
    consumer     TEXT NOT NULL,
    partition    INTEGER NOT NULL,
    next_offset  INTEGER NOT NULL,
    PRIMARY KEY (consumer, partition)
);
