-- Approval requests. `body` is the whole request (agentgate.approvals.v1.ApprovalRequest,
-- protobuf-encoded) and is what the service reads; the other columns are derived from it on
-- every write, for filtering, expiry and operators' queries.
CREATE TABLE approval_requests (
    id              TEXT PRIMARY KEY,
    state           INTEGER NOT NULL,
    connection      TEXT NOT NULL,
    requester       TEXT NOT NULL,
    -- JSON array of group names.
    reviewer_groups TEXT NOT NULL,
    created_at_us   INTEGER NOT NULL,
    expires_at_us   INTEGER NOT NULL,
    decided_at_us   INTEGER,
    version         INTEGER NOT NULL,
    body            BLOB NOT NULL
);

CREATE INDEX approval_requests_due ON approval_requests (expires_at_us) WHERE state = 1;
CREATE INDEX approval_requests_created ON approval_requests (created_at_us DESC, id DESC);
CREATE INDEX approval_requests_connection ON approval_requests (connection, created_at_us DESC);
CREATE INDEX approval_requests_requester ON approval_requests (requester, created_at_us DESC);

-- A decision is final, whatever writes to the file: only a pending request (state 1) may
-- change, its version must grow, and rows are never deleted.
CREATE TRIGGER approval_requests_final
    BEFORE UPDATE ON approval_requests
    WHEN OLD.state <> 1 OR NEW.id <> OLD.id OR NEW.version <= OLD.version
BEGIN
    SELECT RAISE(ABORT, 'approval request is decided; a decision is final');
END;

CREATE TRIGGER approval_requests_no_delete
    BEFORE DELETE ON approval_requests
BEGIN
    SELECT RAISE(ABORT, 'approval requests are never deleted');
END;
