-- contend service schema (MariaDB / MySQL, InnoDB). Text keys compare byte for byte, trailing
-- spaces included (`utf8mb4_nopad_bin`), like on the other backends.
CREATE TABLE accounts (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    owner VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL,
    balance BIGINT NOT NULL,
    version BIGINT NOT NULL DEFAULT 0,
    token_hash CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    UNIQUE KEY accounts_token (token_hash)
) ENGINE = InnoDB;
CREATE TABLE ledger (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    account_id BIGINT NOT NULL,
    amount BIGINT NOT NULL,
    kind VARCHAR(16) NOT NULL,
    ref_id BIGINT,
    KEY ledger_account (account_id),
    CONSTRAINT ledger_account_fk FOREIGN KEY (account_id) REFERENCES accounts (id)
) ENGINE = InnoDB;
CREATE TABLE transfers (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    from_id BIGINT NOT NULL,
    to_id BIGINT NOT NULL,
    amount BIGINT NOT NULL,
    KEY transfers_from (from_id),
    KEY transfers_to (to_id)
) ENGINE = InnoDB;
CREATE TABLE products (
    sku VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL PRIMARY KEY,
    stock BIGINT NOT NULL,
    price BIGINT NOT NULL,
    version BIGINT NOT NULL DEFAULT 0,
    initial_stock BIGINT NOT NULL
) ENGINE = InnoDB;
CREATE TABLE orders (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    account_id BIGINT NOT NULL,
    sku VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL,
    quantity BIGINT NOT NULL,
    total BIGINT NOT NULL,
    KEY orders_sku (sku)
) ENGINE = InnoDB;
CREATE TABLE events (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL,
    seats BIGINT NOT NULL,
    version BIGINT NOT NULL DEFAULT 0
) ENGINE = InnoDB;
CREATE TABLE bookings (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    event_id BIGINT NOT NULL,
    seat BIGINT NOT NULL,
    account_id BIGINT NOT NULL,
    KEY bookings_seat (event_id, seat)
) ENGINE = InnoDB;
CREATE TABLE seat_claims (
    event_id BIGINT NOT NULL,
    seat BIGINT NOT NULL,
    PRIMARY KEY (event_id, seat)
) ENGINE = InnoDB;
CREATE TABLE idempotency_keys (
    scope CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    idem_key VARCHAR(255) CHARACTER SET ascii COLLATE ascii_nopad_bin NOT NULL,
    fingerprint CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    owner CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    status_code BIGINT,
    body MEDIUMTEXT CHARACTER SET utf8mb4,
    lease_until BIGINT NOT NULL,
    PRIMARY KEY (scope, idem_key)
) ENGINE = InnoDB;
