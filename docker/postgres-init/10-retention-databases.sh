#!/usr/bin/env bash
# Run by the postgres image on the first start of an empty data volume (every *.sh file in
# /docker-entrypoint-initdb.d, as the superuser POSTGRES_USER). Each component gets a login role
# of its own that owns its database and nothing else, and no other role may connect to it:
#
#   AIRFLOW_DB  Airflow's metadata database; AIRFLOW__DATABASE__SQL_ALCHEMY_CONN logs in as it.
#   LEDGER_DB   the write-ahead ledger of erasures and the manual holds (connection
#               retention_ledger). Its role owns the database because the ledger migrates its
#               own schema when it is opened (retention.store.migrations).
#
# Each role's name is its database's name. The superuser's password is used by nothing else.
# The CRM is not here: a real CRM is its own server, where the connector gets the role of
# docker/crm-connector-grants.sql; the demo's CRM is the crm-demo-db service (demo profile).
#
# Names and passwords come from the environment (docker-compose.yml sets them; the tests use
# names of their own) and reach psql as variables, quoted by :'name' and :"name". CREATE
# DATABASE cannot run in a DO block: \gexec runs what the guarded SELECT returns, so the script
# can run again. A data volume created before this file existed keeps what it had:
# `docker compose down -v` starts afresh.
set -euo pipefail
: "${AIRFLOW_DB:?}" "${AIRFLOW_DB_PASSWORD:?}" "${LEDGER_DB:?}" "${LEDGER_DB_PASSWORD:?}"
superuser=${POSTGRES_USER:-postgres}

psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "$superuser" --dbname "${POSTGRES_DB:-postgres}" \
  -v airflow_db="$AIRFLOW_DB" -v airflow_password="$AIRFLOW_DB_PASSWORD" \
  -v ledger_db="$LEDGER_DB" -v ledger_password="$LEDGER_DB_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE %I', :'airflow_db')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'airflow_db')\gexec
ALTER ROLE :"airflow_db" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'airflow_password';
SELECT format('CREATE DATABASE %I OWNER %I', :'airflow_db', :'airflow_db')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'airflow_db')\gexec
REVOKE ALL ON DATABASE :"airflow_db" FROM PUBLIC;

SELECT format('CREATE ROLE %I', :'ledger_db')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'ledger_db')\gexec
ALTER ROLE :"ledger_db" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'ledger_password';
SELECT format('CREATE DATABASE %I OWNER %I', :'ledger_db', :'ledger_db')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'ledger_db')\gexec
REVOKE ALL ON DATABASE :"ledger_db" FROM PUBLIC;
SQL

# The owner of a database does not own its public schema (PostgreSQL 15+ lets only that
# schema's owner create in it): hand it over, and let no other role use it.
for db in "$AIRFLOW_DB" "$LEDGER_DB"; do
  psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "$superuser" --dbname "$db" -v owner="$db" <<'SQL'
ALTER SCHEMA public OWNER TO :"owner";
REVOKE ALL ON SCHEMA public FROM PUBLIC;
SQL
done
