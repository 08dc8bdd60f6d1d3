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
    created_at_us   BIGINT NOT NULL,
    expires_at_us   BIGINT NOT NULL,
    decided_at_us   BIGINT,
    version         BIGINT NOT NULL,
    body            BYTEA NOT NULL
);

-- The expiry sweeper: pending requests by expiry.
CREATE INDEX approval_requests_due ON approval_requests (expires_at_us) WHERE state = 1;
CREATE INDEX approval_requests_created ON approval_requests (created_at_us DESC, id DESC);
CREATE INDEX approval_requests_connection ON approval_requests (connection, created_at_us DESC);
CREATE INDEX approval_requests_requester ON approval_requests (requester, created_at_us DESC);

-- A decision is final, whatever writes to the table: only a pending request (state 1) may
-- change, its version must grow, and a row is never deleted by the service's role.
CREATE FUNCTION approval_requests_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'approval requests are never deleted';
    END IF;
    IF OLD.state <> 1 THEN
        RAISE EXCEPTION 'approval request % is decided (state %); a decision is final', OLD.id, OLD.state;
    END IF;
    IF NEW.id <> OLD.id OR NEW.version <= OLD.version THEN
        RAISE EXCEPTION 'approval request %: id must not change and version must grow', OLD.id;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER approval_requests_guard
    BEFORE UPDATE OR DELETE ON approval_requests
    FOR EACH ROW EXECUTE FUNCTION approval_requests_guard();
