-- authz state. Portable SQL: the same migration runs on Postgres and SQLite.
-- Times are microseconds since the Unix epoch (UTC).

CREATE TABLE authz_tokens (
    jti           TEXT PRIMARY KEY,
    subject       TEXT   NOT NULL,
    kind          TEXT   NOT NULL,
    groups_json   TEXT   NOT NULL,
    audience_json TEXT   NOT NULL,
    issued_at_us  BIGINT NOT NULL,
    expires_at_us BIGINT NOT NULL,
    issued_by     TEXT   NOT NULL
);

CREATE TABLE authz_revocations (
    jti           TEXT PRIMARY KEY,
    revoked_at_us BIGINT NOT NULL,
    revoked_by    TEXT   NOT NULL,
    reason        TEXT   NOT NULL,
    expires_at_us BIGINT NOT NULL
);

CREATE TABLE authz_grants (
    id               TEXT PRIMARY KEY,
    subject          TEXT    NOT NULL,
    connection       TEXT    NOT NULL,
    role             TEXT    NOT NULL,
    source           INTEGER NOT NULL,
    not_before_us    BIGINT  NOT NULL,
    expires_at_us    BIGINT  NOT NULL,
    approved_by_json TEXT    NOT NULL,
    reason           TEXT    NOT NULL,
    approval_id      TEXT    NOT NULL,
    created_at_us    BIGINT  NOT NULL,
    revoked_at_us    BIGINT,
    revoked_by       TEXT,
    revoke_reason    TEXT
);
CREATE INDEX authz_grants_lookup ON authz_grants (subject, connection, role, expires_at_us);

CREATE TABLE authz_access_requests (
    approval_id   TEXT PRIMARY KEY,
    subject       TEXT   NOT NULL,
    connection    TEXT   NOT NULL,
    role          TEXT   NOT NULL,
    duration_secs BIGINT NOT NULL,
    reason        TEXT   NOT NULL,
    created_at_us BIGINT NOT NULL,
    state         TEXT   NOT NULL,
    grant_id      TEXT
);

CREATE TABLE authz_sessions (
    id             TEXT PRIMARY KEY,
    subject        TEXT   NOT NULL,
    token_id       TEXT   NOT NULL,
    grant_id       TEXT   NOT NULL,
    connection     TEXT   NOT NULL,
    role           TEXT   NOT NULL,
    source_address TEXT   NOT NULL,
    opened_at_us   BIGINT NOT NULL,
    expires_at_us  BIGINT NOT NULL,
    closed_at_us   BIGINT,
    close_reason   TEXT
);
