-- Retention runs with the owner's rights, so the service role needs no DELETE privilege at
-- all (see docs/operations.md, "Postgres roles"); a fixed search_path keeps it from being
-- redirected to look-alike tables.
ALTER FUNCTION audit_prune(BIGINT) SECURITY DEFINER;
ALTER FUNCTION audit_prune(BIGINT) SET search_path = pg_catalog, public;
