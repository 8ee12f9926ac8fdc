#!/usr/bin/env bash
# Start (or reuse) a throw-away PostgreSQL server for the tests and benchmarks.
# Listens on 127.0.0.1:${RETENTION_PG_PORT:-54329} with trust auth; data under /tmp.
# Prints the SQLAlchemy URL of a fresh-enough database on stdout.
set -euo pipefail
PORT=${RETENTION_PG_PORT:-54329}
DATA=/tmp/retention-pg-$PORT
DB=${1:-retention_test}

pg_bin() {
  local d
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && { echo "$d"; return; }; done
  return 1
}
if ! BIN=$(pg_bin); then
  CALLER=postgres.sh APT_RECOMMENDS=1 "$(dirname "$0")/apt-install.sh" "the ledger and CRM tests" postgresql
  BIN=$(pg_bin)
fi
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

if ! as_pg "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then
  if [ ! -f "$DATA/PG_VERSION" ]; then
    if [ "$(id -u)" = 0 ]; then install -d -o postgres -g postgres "$DATA"; else mkdir -p "$DATA"; fi
    as_pg "$BIN/initdb" -D "$DATA" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  as_pg "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -t 60 \
    -o "-p $PORT -h 127.0.0.1 -k /tmp -c fsync=off -c synchronous_commit=off -c full_page_writes=off" start >&2
fi
if ! as_pg "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -tAc "select 1 from pg_database where datname='$DB'" | grep -q 1; then
  as_pg "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB"
fi
echo "postgresql+psycopg2://postgres@127.0.0.1:$PORT/$DB"
