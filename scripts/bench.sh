#!/usr/bin/env bash
# Run a benchmark: scripts/bench.sh newsletter|crm|ticketing|memory|nightly [options] (--help: its options). Prints figures.
# memory: peak RSS of every nightly step per system at 250,000 and 1,000,000 records.
# nightly: a first full night, 0.1% changed, then the next night under the providers' real limits.
# They share benchmarks/harness.py (scratch RETENTION_HOME and ledger, one process per step, figures).
set -euo pipefail
name=${1:-}
if [ -z "$name" ] || [ ! -f "$(dirname "$0")/../benchmarks/${name}_benchmark.py" ]; then
  echo "usage: scripts/bench.sh newsletter|crm|ticketing|memory|nightly [options]   (scripts/bench.sh NAME --help: its options)" >&2
  exit 2
fi
shift
source "$(dirname "$0")/setup.sh"
cd "$ROOT"
exec python "benchmarks/${name}_benchmark.py" "$@"
