-- The audit log: one hash chain per store. Rows are append-only; only retention removes
-- them, through audit_prune(), and never past a signed checkpoint.

CREATE TABLE audit_events (
    chain_sequence   BIGINT PRIMARY KEY,
    stored_at_us     BIGINT NOT NULL,
    session_id       TEXT   NOT NULL,
    session_sequence BIGINT NOT NULL,
    -- Query columns, derived from body; Verify checks them against it.
    occurred_at_us   BIGINT NOT NULL,
    kind             TEXT   NOT NULL,
    principal        TEXT   NOT NULL,
    connection       TEXT   NOT NULL,
    protocol         INTEGER NOT NULL,
    -- The exact bytes the chain hash covers.
    body             BYTEA  NOT NULL,
    hash             BYTEA  NOT NULL,
    UNIQUE (session_id, session_sequence)
);

CREATE TABLE audit_checkpoints (
    chain_sequence BIGINT PRIMARY KEY,
    head_hash      BYTEA  NOT NULL,
    created_at_us  BIGINT NOT NULL,
    signature      BYTEA  NOT NULL,
    key_id         TEXT   NOT NULL
);

-- A derived index of sessions for listing and gap detection; rebuildable from audit_events.
CREATE TABLE audit_sessions (
    session_id      TEXT PRIMARY KEY,
    principal       TEXT    NOT NULL,
    connection      TEXT    NOT NULL,
    protocol        INTEGER NOT NULL,
    role            TEXT    NOT NULL,
    source_address  TEXT    NOT NULL,
    first_event_us  BIGINT  NOT NULL,
    last_event_us   BIGINT  NOT NULL,
    events          BIGINT  NOT NULL,
    last_sequence   BIGINT  NOT NULL
);
CREATE INDEX audit_sessions_principal ON audit_sessions (principal, first_event_us);
CREATE INDEX audit_sessions_connection ON audit_sessions (connection, first_event_us);
CREATE INDEX audit_sessions_time ON audit_sessions (first_event_us);

CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'audit_events'
       AND current_setting('agentgate.retention_prune', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();

-- Retention's only way in: removes events up to a signed checkpoint, never past it.
CREATE FUNCTION audit_prune(upto BIGINT) RETURNS BIGINT LANGUAGE plpgsql AS $$
DECLARE
    removed BIGINT;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM audit_checkpoints WHERE chain_sequence = upto) THEN
        RAISE EXCEPTION 'audit_prune: no signed checkpoint at %', upto
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM set_config('agentgate.retention_prune', 'on', true);
    DELETE FROM audit_events WHERE chain_sequence <= upto;
    GET DIAGNOSTICS removed = ROW_COUNT;
    PERFORM set_config('agentgate.retention_prune', 'off', true);
    RETURN removed;
END $$;

REVOKE UPDATE, DELETE, TRUNCATE ON audit_events, audit_checkpoints FROM PUBLIC;
