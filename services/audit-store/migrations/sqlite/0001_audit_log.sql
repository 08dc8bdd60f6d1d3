-- The audit log: one hash chain per store. Rows are append-only; only retention removes
-- them, never past a signed checkpoint. See the Postgres migration for the column notes.

CREATE TABLE audit_events (
    chain_sequence   INTEGER PRIMARY KEY,
    stored_at_us     INTEGER NOT NULL,
    session_id       TEXT    NOT NULL,
    session_sequence INTEGER NOT NULL,
    occurred_at_us   INTEGER NOT NULL,
    kind             TEXT    NOT NULL,
    principal        TEXT    NOT NULL,
    connection       TEXT    NOT NULL,
    protocol         INTEGER NOT NULL,
    body             BLOB    NOT NULL,
    hash             BLOB    NOT NULL,
    UNIQUE (session_id, session_sequence)
);

CREATE TABLE audit_checkpoints (
    chain_sequence INTEGER PRIMARY KEY,
    head_hash      BLOB    NOT NULL,
    created_at_us  INTEGER NOT NULL,
    signature      BLOB    NOT NULL,
    key_id         TEXT    NOT NULL
);

CREATE TABLE audit_sessions (
    session_id      TEXT PRIMARY KEY,
    principal       TEXT    NOT NULL,
    connection      TEXT    NOT NULL,
    protocol        INTEGER NOT NULL,
    role            TEXT    NOT NULL,
    source_address  TEXT    NOT NULL,
    first_event_us  INTEGER NOT NULL,
    last_event_us   INTEGER NOT NULL,
    events          INTEGER NOT NULL,
    last_sequence   INTEGER NOT NULL
);
CREATE INDEX audit_sessions_principal ON audit_sessions (principal, first_event_us);
CREATE INDEX audit_sessions_connection ON audit_sessions (connection, first_event_us);
CREATE INDEX audit_sessions_time ON audit_sessions (first_event_us);

-- Present (one row) only inside a retention transaction.
CREATE TABLE audit_prune_window (upto INTEGER NOT NULL);

CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: UPDATE refused'); END;

CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
WHEN NOT EXISTS (SELECT 1 FROM audit_prune_window WHERE OLD.chain_sequence <= upto)
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: DELETE refused'); END;

CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only: UPDATE refused'); END;

CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only: DELETE refused'); END;
