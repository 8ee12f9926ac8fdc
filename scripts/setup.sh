# Sourced by scripts/demo.sh and scripts/test.sh: a virtualenv with the pinned development
# requirements and the project installed (editable), and the environment the project runs in
# (Airflow home, DAG folder, pseudonym key).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
PYTHON_BIN=${PYTHON:-python3}

want=$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/constraints.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.requirements.sha" 2>/dev/null)" != "$want" ]; then
  echo "==> installing dependencies into .venv (first time: about two minutes)"
  "$PYTHON_BIN" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$ROOT/requirements-dev.txt" -c "$ROOT/constraints.txt"
  # The project itself: the `retention` command and the Airflow provider entry point.
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e "$ROOT"
  echo "$want" > "$VENV/.requirements.sha"
fi
export PATH="$VENV/bin:$PATH"
# dags/ for the tests that load DAG files; the project root for the development tools (retention_dev/).
export PYTHONPATH="$ROOT/dags:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export AIRFLOW_HOME=${AIRFLOW_HOME:-$ROOT/.airflow}
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__UNIT_TEST_MODE=False
export GX_ANALYTICS_ENABLED=false
export RETENTION_HOME=${RETENTION_HOME:-$ROOT/.retention}
mkdir -p "$RETENTION_HOME"
# The pseudonym key is configuration, never code: one random key per checkout, outside git.
if [ -z "${RETENTION_PSEUDONYM_KEY:-}" ] && [ -z "${RETENTION_PSEUDONYM_KEY_FILE:-}" ]; then
  if [ ! -s "$RETENTION_HOME/pseudonym.key" ]; then
    (umask 077 && "$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(32))' > "$RETENTION_HOME/pseudonym.key")
  fi
  export RETENTION_PSEUDONYM_KEY_FILE="$RETENTION_HOME/pseudonym.key"
fi
# The Connections of this checkout (the demo writes its own there): one file that Airflow's own
# file secrets backend and the `retention` command both read. A backend configured already wins.
if [ -z "${AIRFLOW__SECRETS__BACKEND:-}" ]; then
  [ -e "$RETENTION_HOME/connections.json" ] || (umask 077 && echo '{}' > "$RETENTION_HOME/connections.json")
  export AIRFLOW__SECRETS__BACKEND=airflow.secrets.local_filesystem.LocalFilesystemBackend
  export AIRFLOW__SECRETS__BACKEND_KWARGS="{\"connections_file_path\": \"$RETENTION_HOME/connections.json\"}"
fi
# The request key encrypts erasure requests' addresses in the request inbox until each request is
# complete (a Fernet key: 32 random bytes, url-safe base64): one per checkout, outside git.
if [ -z "${RETENTION_REQUEST_KEY:-}" ] && [ -z "${RETENTION_REQUEST_KEY_FILE:-}" ]; then
  if [ ! -s "$RETENTION_HOME/request.key" ]; then
    (umask 077 && "$VENV/bin/python" -c 'import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())' > "$RETENTION_HOME/request.key")
  fi
  export RETENTION_REQUEST_KEY_FILE="$RETENTION_HOME/request.key"
fi
