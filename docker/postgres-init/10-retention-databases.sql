-- Run by the postgres image on the first start of an empty data volume (files in
-- /docker-entrypoint-initdb.d, as POSTGRES_USER in POSTGRES_DB). Besides Airflow's metadata
-- database it holds the project's two databases:
--   crm               the CRM (customer register) the DAG reads and erases in; connection retention_crm
--   retention_ledger  the write-ahead ledger of erasures and the manual holds; connection retention_ledger
-- A volume created before this file existed keeps its databases: `docker compose down -v`
-- starts afresh, or run these statements with psql.
SELECT 'CREATE DATABASE crm'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'crm')\gexec

SELECT 'CREATE DATABASE retention_ledger'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'retention_ledger')\gexec
