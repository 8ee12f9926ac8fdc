#!/usr/bin/env bash
# The demo's CRM server (service crm-demo-db, demo profile): run by the postgres image on the
# first start of its empty data volume, as the superuser, in the database POSTGRES_DB (the CRM).
# Creates the connector's login role with no rights but to connect: crm-demo-data creates the
# CRM's tables and seeds them, then crm-demo-grants gives the role what the connector needs
# (docker/crm-connector-grants.sql, the same file a real CRM's administrator runs).
set -euo pipefail
: "${CRM_DB_USER:?}" "${CRM_DB_PASSWORD:?}" "${POSTGRES_DB:?}"

psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "${POSTGRES_USER:-postgres}" --dbname "$POSTGRES_DB" \
  -v connector="$CRM_DB_USER" -v password="$CRM_DB_PASSWORD" -v crm_db="$POSTGRES_DB" <<'SQL'
SELECT format('CREATE ROLE %I', :'connector')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'connector')\gexec
ALTER ROLE :"connector" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'password';
REVOKE ALL ON DATABASE :"crm_db" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"crm_db" TO :"connector";
REVOKE ALL ON SCHEMA public FROM PUBLIC;
SQL
