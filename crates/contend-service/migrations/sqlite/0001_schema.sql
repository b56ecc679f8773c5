-- contend service schema (SQLite).
CREATE TABLE accounts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL,
    balance BIGINT NOT NULL,
    version BIGINT NOT NULL DEFAULT 0,
    token_hash TEXT NOT NULL UNIQUE
);
CREATE TABLE ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id BIGINT NOT NULL REFERENCES accounts (id),
    amount BIGINT NOT NULL,
    kind TEXT NOT NULL,
    ref_id BIGINT
);
CREATE INDEX ledger_account ON ledger (account_id);
CREATE TABLE transfers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    from_id BIGINT NOT NULL REFERENCES accounts (id),
    to_id BIGINT NOT NULL REFERENCES accounts (id),
    amount BIGINT NOT NULL
);
CREATE INDEX transfers_from ON transfers (from_id);
CREATE INDEX transfers_to ON transfers (to_id);
CREATE TABLE products (
    sku TEXT PRIMARY KEY,
    stock BIGINT NOT NULL,
    price BIGINT NOT NULL,
    version BIGINT NOT NULL DEFAULT 0,
    initial_stock BIGINT NOT NULL
);
CREATE TABLE orders (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id BIGINT NOT NULL REFERENCES accounts (id),
    sku TEXT NOT NULL REFERENCES products (sku),
    quantity BIGINT NOT NULL,
    total BIGINT NOT NULL
);
CREATE INDEX orders_sku ON orders (sku);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    seats BIGINT NOT NULL,
    version BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE bookings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id BIGINT NOT NULL REFERENCES events (id),
    seat BIGINT NOT NULL,
    account_id BIGINT NOT NULL REFERENCES accounts (id)
);
CREATE INDEX bookings_seat ON bookings (event_id, seat);
CREATE TABLE seat_claims (
    event_id BIGINT NOT NULL,
    seat BIGINT NOT NULL,
    PRIMARY KEY (event_id, seat)
);
CREATE TABLE idempotency_keys (
    scope TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    owner TEXT NOT NULL,
    status_code BIGINT,
    body TEXT,
    lease_until BIGINT NOT NULL,
    PRIMARY KEY (scope, idem_key)
);
