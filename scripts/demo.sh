#!/usr/bin/env bash
# Set everything up and run retention_nightly once through Airflow, on the embedded default:
# SQLite for Airflow, the ledger and the CRM; local stand-ins for Mailchimp and Zendesk.
# Run it again: the second run erases nothing. Options are passed to `python -m retention_dev.demo`
# (--dry-run, --reset, --members N, ...).
set -euo pipefail
source "$(dirname "$0")/setup.sh"
cd "$ROOT"
exec python -m retention_dev.demo "$@"
