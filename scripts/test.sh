#!/usr/bin/env bash
# Set everything up and run the whole test suite: real PostgreSQL (started here), real HTTP
# against the stand-ins, real Airflow runs. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
cd "$ROOT"
echo "==> starting PostgreSQL for the tests"
RETENTION_TEST_PG_URL=$("$ROOT/scripts/postgres.sh" retention_test)
export RETENTION_TEST_PG_URL
echo "==> running the tests"
exec python -m pytest -q -p no:cacheprovider "$@"
