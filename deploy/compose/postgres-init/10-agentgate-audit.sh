#!/bin/sh
# Creates the audit store's role and database. The postgres image runs this once, when its
# data volume is first initialised (files in /docker-entrypoint-initdb.d); after that it is
# never run again, so a changed password means `ALTER ROLE` by hand (or a new volume).
#
# The role owns its database, because the audit store applies its migrations at start.
# docs/operations.md ("Postgres roles") describes the hardened split: an owner role for
# migrations and a service role with INSERT/SELECT only.
set -e

: "${AUDIT_DB_PASSWORD:?AUDIT_DB_PASSWORD is not set (see docs/operations.md, docker-compose)}"

psql -v ON_ERROR_STOP=1 --no-psqlrc \
     --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
     -v audit_password="$AUDIT_DB_PASSWORD" <<'SQL'
CREATE ROLE agentgate_audit LOGIN PASSWORD :'audit_password';
CREATE DATABASE agentgate_audit OWNER agentgate_audit;
REVOKE ALL ON DATABASE agentgate_audit FROM PUBLIC;
SQL
