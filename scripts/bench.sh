#!/usr/bin/env bash
# Run a benchmark: scripts/bench.sh newsletter|crm|ticketing [options]. Prints figures.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
cd "$ROOT"
name=${1:?usage: scripts/bench.sh newsletter|crm|ticketing [options]}
shift
exec python "benchmarks/${name}_benchmark.py" "$@"
