"""Every user error is one line naming what is wrong and where: no traceback, no secret, no
address (issue 10, item 12).

The real ``retention`` command runs in a subprocess for each case: exit status 2, exactly one line
on stderr, no "Traceback" anywhere, and neither the password nor an address given in the input
repeated. Connection cases use a real closed port on 127.0.0.1, the tests' real PostgreSQL (a
database that does not exist, a role it refuses) and a host name that cannot resolve
(``.invalid`` is reserved, RFC 2606). A real Airflow run then fails its task on a bad Connection
field with that one line and without a traceback from the driver or our modules.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from airflow_run import run_dag, task_states

ROOT = Path(__file__).resolve().parents[1]
SECRET = "pw-s3cr3t-7Qx"  # every password and token below: it must never be printed
ADDRESS = "kim.doe@example.org"  # an address in the input: it must never be printed either
UNRESOLVABLE = "no-such-host.invalid"
HASH = "0" * 32


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound by the OS, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pg(postgres_url):
    url = sa.make_url(postgres_url)
    return f"{url.host}:{url.port}", url.database


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("user-errors")
    (d / "syntax.yaml").write_text("rules: [\n  - a: b\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "key-dir").mkdir()
    (d / "empty.db").touch()
    crm = sa.create_engine(f"sqlite:///{d / 'crm.db'}")
    from retention.systems.crm import schema

    schema.create_schema(crm)
    crm.dispose()
    return d


def mailchimp(host: str, **extra) -> str:
    return json.dumps({"conn_type": "retention_mailchimp", "host": host, "password": f"{SECRET}-us1",
                       "extra": {"list_id": "L1", "max_retries": 0, **extra}})


def zendesk(host: str, **extra) -> str:
    return json.dumps({"conn_type": "retention_zendesk", "host": host, "login": ADDRESS, "password": SECRET,
                       "extra": {"max_retries": 0, **extra}})


def crm_sqlite(path: Path, **extra) -> str:
    return json.dumps({"conn_type": "sqlite", "host": str(path), "extra": extra})


EXPLAIN_CRM = ["explain", "--record-type", "crm_contact", "--record-id", "1"]
EXPLAIN_MEMBER = ["explain", "--record-type", "newsletter_member", "--record-id", HASH]
EXPLAIN_TICKET = ["explain", "--record-type", "support_ticket", "--record-id", "1"]

# id -> (arguments, environment, words the one line must contain). In the environment, {port}
# is a closed port, {pg} the tests' PostgreSQL (host:port), {db} its database, {d} a directory
# of prepared files.
CASES = {
    # -- the command line
    "as-of-yesterday": (EXPLAIN_CRM + ["--as-of", "yesterday"], {}, ["--as-of", "yesterday"]),
    "expires-2027-13-40": (["hold", "add", "--record-type", "crm_contact", "--record-id", "1", "--reason", "r",
                            "--expires", "2027-13-40"], {}, ["--expires"]),
    "unknown-record-type": (["explain", "--record-type", "contacts", "--record-id", "1"], {}, ["record type", "contacts"]),
    "hold-id-not-a-number": (["hold", "remove", "--hold-id", "abc", "--reason", "r"], {}, ["--hold-id", "abc"]),
    "show-keys-not-a-number": (["preview", "--old-rev", "HEAD", "--show-keys", "many"], {}, ["--show-keys"]),
    "unknown-system": (["replay", "--systems", "crms"], {}, ["--systems", "crms"]),
    "hold-on-a-malformed-address": (["hold", "add", "--record-type", "newsletter_member", "--record-id",
                                     ADDRESS.replace("@", "@@"), "--reason", "r"], {}, ["--record-id"]),
    # -- the policy file
    "policy-yaml-syntax": (["policy", "validate", "{d}/syntax.yaml"], {}, ["syntax.yaml", "not valid YAML", "line 2"]),
    "policy-not-a-mapping": (["policy", "validate", "{d}/list.yaml"], {}, ["list.yaml", "mapping"]),
    "policy-missing": (["policy", "validate"], {"RETENTION_POLICY_FILE": "{d}/nope.yaml"}, ["nope.yaml"]),
    "explain-policy-yaml-syntax": (EXPLAIN_CRM + ["--policy", "{d}/syntax.yaml"], {}, ["syntax.yaml", "not valid YAML"]),
    # -- the CRM Connection
    "crm-port-closed": (EXPLAIN_CRM, {"AIRFLOW_CONN_RETENTION_CRM": f"postgresql://u:{SECRET}@127.0.0.1:{{port}}/crm"},
                        ["retention_crm", "CRM database", "nothing listens"]),
    "crm-database-missing": (EXPLAIN_CRM, {"AIRFLOW_CONN_RETENTION_CRM": f"postgresql://postgres:{SECRET}@{{pg}}/no_such_db"},
                             ["retention_crm", "database", "does not exist"]),
    "crm-role-refused": (EXPLAIN_CRM, {"AIRFLOW_CONN_RETENTION_CRM": f"postgresql://nobody:{SECRET}@{{pg}}/{{db}}"},
                         ["retention_crm", "refused the user"]),
    "crm-host-unresolvable": (EXPLAIN_CRM, {"AIRFLOW_CONN_RETENTION_CRM": f"postgresql://u:{SECRET}@{UNRESOLVABLE}:5432/crm"},
                              ["retention_crm", "does not resolve"]),
    "crm-uri-port-not-a-number": (EXPLAIN_CRM, {"AIRFLOW_CONN_RETENTION_CRM": f"postgresql://u:{SECRET}@db:abc/crm"},
                                  ["retention_crm", "AIRFLOW_CONN_RETENTION_CRM"]),
    "crm-sqlalchemy-url-garbage": (EXPLAIN_CRM, {"AIRFLOW_CONN_RETENTION_CRM": json.dumps(
        {"conn_type": "retention_crm", "extra": {"sqlalchemy_url": f"nonsense://u:{SECRET}@db/crm"}})}, ["retention_crm"]),
    "crm-mapping-missing": (EXPLAIN_CRM, {"AIRFLOW_CONN_RETENTION_CRM": crm_sqlite(Path("{d}/crm.db"), mapping="{d}/no-mapping.yaml")},
                            ["no-mapping.yaml"]),
    "crm-chunk-size-not-a-number": (EXPLAIN_CRM, {"AIRFLOW_CONN_RETENTION_CRM": crm_sqlite(Path("{d}/crm.db"), chunk_size="lots")},
                                    ["retention_crm", "chunk_size"]),
    "crm-without-tables": (EXPLAIN_CRM, {"AIRFLOW_CONN_RETENTION_CRM": crm_sqlite(Path("{d}/empty.db"))}, ["table", "does not exist"]),
    "crm-init-port-closed": (["crm", "init"], {"AIRFLOW_CONN_RETENTION_CRM": f"postgresql://u:{SECRET}@127.0.0.1:{{port}}/crm"},
                             ["retention_crm", "nothing listens"]),
    "crm-init-database-missing": (["crm", "init"], {"AIRFLOW_CONN_RETENTION_CRM": f"postgresql://postgres:{SECRET}@{{pg}}/no_such_db"},
                                  ["retention_crm", "does not exist"]),
    # -- the Mailchimp Connection
    "mailchimp-port-closed": (EXPLAIN_MEMBER, {"AIRFLOW_CONN_RETENTION_MAILCHIMP": mailchimp("http://127.0.0.1:{port}")},
                              ["retention_mailchimp", "Mailchimp API", "nothing listens"]),
    "mailchimp-host-unresolvable": (EXPLAIN_MEMBER, {"AIRFLOW_CONN_RETENTION_MAILCHIMP": mailchimp(f"http://{UNRESOLVABLE}")},
                                    ["retention_mailchimp", "does not resolve"]),
    "mailchimp-no-password": (EXPLAIN_MEMBER, {"AIRFLOW_CONN_RETENTION_MAILCHIMP": json.dumps(
        {"conn_type": "retention_mailchimp", "host": "http://127.0.0.1:1", "extra": {"list_id": "L1"}})}, ["retention_mailchimp", "password"]),
    "mailchimp-extra-not-json": (EXPLAIN_MEMBER, {"AIRFLOW_CONN_RETENTION_MAILCHIMP": f"retention-mailchimp://:{SECRET}@127.0.0.1:1?__extra__=%7Bbad"},
                                 ["retention_mailchimp", "extra", "JSON"]),
    "mailchimp-max-connections-not-a-number": (EXPLAIN_MEMBER, {"AIRFLOW_CONN_RETENTION_MAILCHIMP": mailchimp("http://127.0.0.1:1", max_connections="ten")},
                                               ["retention_mailchimp", "max_connections"]),
    # -- the Zendesk Connection
    "zendesk-requests-per-minute-not-a-number": (EXPLAIN_TICKET, {"AIRFLOW_CONN_RETENTION_ZENDESK": zendesk("http://127.0.0.1:1", requests_per_minute="fast")},
                                                 ["retention_zendesk", "requests_per_minute"]),
    "zendesk-port-closed": (EXPLAIN_TICKET, {"AIRFLOW_CONN_RETENTION_ZENDESK": zendesk("http://127.0.0.1:{port}")},
                            ["retention_zendesk", "Zendesk API", "nothing listens"]),
    "zendesk-host-unresolvable": (EXPLAIN_TICKET, {"AIRFLOW_CONN_RETENTION_ZENDESK": zendesk(UNRESOLVABLE)},
                                  ["retention_zendesk", "does not resolve"]),
    "zendesk-json-garbled": (EXPLAIN_TICKET, {"AIRFLOW_CONN_RETENTION_ZENDESK": zendesk("x")[:-20]}, ["AIRFLOW_CONN_RETENTION_ZENDESK"]),
    # -- the ledger
    "ledger-port-closed": (["hold", "list"], {"AIRFLOW_CONN_RETENTION_LEDGER": f"postgresql://u:{SECRET}@127.0.0.1:{{port}}/ledger"},
                           ["ledger", "nothing listens"]),
    "ledger-database-missing": (["hold", "list"], {"AIRFLOW_CONN_RETENTION_LEDGER": f"postgresql://postgres:{SECRET}@{{pg}}/no_such_db"},
                                ["ledger", "does not exist"]),
    "ledger-role-refused": (["hold", "list"], {"RETENTION_LEDGER_URL": f"postgresql+psycopg2://nobody:{SECRET}@{{pg}}/{{db}}"},
                            ["ledger", "refused the user"]),
    "ledger-url-garbage": (["hold", "list"], {"RETENTION_LEDGER_URL": f"not a url {SECRET}"}, ["ledger", "SQLAlchemy URL"]),
    "ledger-url-unknown-dialect": (["hold", "list"], {"RETENTION_LEDGER_URL": f"mysqlx://u:{SECRET}@db/ledger"}, ["ledger", "not installed"]),
    "ledger-sqlite-directory-missing": (["hold", "list"], {"RETENTION_LEDGER_URL": "sqlite:///{d}/no/such/dir/ledger.db"},
                                        ["ledger", "cannot be opened"]),
    # -- files and settings
    "key-file-missing": (["hold", "list"], {"RETENTION_PSEUDONYM_KEY": "", "RETENTION_PSEUDONYM_KEY_FILE": "{d}/no.key"},
                         ["RETENTION_PSEUDONYM_KEY_FILE"]),
    "key-file-a-directory": (["hold", "list"], {"RETENTION_PSEUDONYM_KEY": "", "RETENTION_PSEUDONYM_KEY_FILE": "{d}/key-dir"},
                             ["RETENTION_PSEUDONYM_KEY_FILE"]),
    "retention-home-a-file": (["hold", "list"], {"RETENTION_HOME": "{d}/list.yaml"}, ["RETENTION_HOME"]),
    "max-plan-age-abc": (["replay", "--systems", "crm"], {"RETENTION_MAX_PLAN_AGE": "abc",
                                                           "AIRFLOW_CONN_RETENTION_CRM": crm_sqlite(Path("{d}/crm.db"))},
                         ["RETENTION_MAX_PLAN_AGE"]),
    "replay-crm-port-closed": (["replay", "--systems", "crm", "--dry-run"],
                               {"AIRFLOW_CONN_RETENTION_CRM": f"postgresql://u:{SECRET}@127.0.0.1:{{port}}/crm"},
                               ["crm", "retention_crm", "nothing listens"]),
}


def fill(text: str, values: dict) -> str:
    for name, value in values.items():
        text = text.replace("{" + name + "}", str(value))
    return text


@pytest.mark.parametrize("case", list(CASES))
def test_a_user_error_is_one_line_naming_what_and_where(case, files, pg, tmp_path):
    argv, env_in, words = CASES[case]
    values = {"port": closed_port(), "pg": pg[0], "db": pg[1], "d": files}
    env = {**os.environ, "RETENTION_HOME": str(tmp_path / "home"), "PYTHONPATH": os.environ["PYTHONPATH"]}
    for name in ("RETENTION_LEDGER_URL", *(f"AIRFLOW_CONN_RETENTION_{s}" for s in ("CRM", "MAILCHIMP", "ZENDESK", "LEDGER"))):
        env.pop(name, None)
    env.update({k: fill(v, values) for k, v in env_in.items()})
    args = [fill(a, values) for a in argv]
    done = subprocess.run([sys.executable, "-m", "retention.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=180)
    everything = done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, f"exit {done.returncode}: {done.stderr[-3000:]}"
    assert "Traceback" not in everything, everything[-3000:]
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{done.stderr[-3000:]}"
    for secret in (SECRET, ADDRESS, ADDRESS.split("@")[0], UNRESOLVABLE):
        assert secret not in everything, f"{secret!r} printed: {everything[-2000:]}"
    assert all(w in lines[0] for w in words), f"{lines[0]!r} should name {words}"


# --- a task of a real Airflow run ------------------------------------------------------------------


@pytest.mark.airflow
@pytest.mark.parametrize(
    "conn, words",
    [
        ({"conn_type": "retention_crm", "extra": {"sqlalchemy_url": "sqlite:///{d}/crm.db", "chunk_size": "lots"}},
         ["connection 'retention_crm': extra 'chunk_size' must be an integer"]),
        ({"conn_type": "postgres", "host": "{host}", "port": "{port}", "schema": "no_such_db", "login": "postgres", "password": SECRET},
         ["connection 'retention_crm' (the CRM database): cannot connect: the database it names does not exist"]),
    ],
    ids=["chunk-size-not-a-number", "database-missing"],
)
def test_a_task_fails_on_a_bad_connection_with_its_one_line(conn, words, files, pg, retention_home, monkeypatch, capfd):
    host, port = pg[0].split(":")
    values = {"d": files, "host": host, "port": port}
    filled = json.loads(fill(json.dumps(conn), values))
    if "port" in filled:
        filled["port"] = int(filled["port"])
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_CRM", json.dumps(filled))
    dr = run_dag({"systems": ["crm"]})
    states = task_states(dr)
    out, err = capfd.readouterr()
    log = out + err
    assert dr.state == "failed", states
    # The set-up is wrong: the task fails at once (no retry can help), nothing after it runs.
    assert states["crm.extract"] == "failed", states
    assert {states[f"crm.{t}"] for t in ("plan", "validate", "erase", "verify")} == {"upstream_failed"}, states
    assert all(w in log for w in words), log[-4000:]
    assert SECRET not in log
    # Airflow's runner logs its own frames for every failed task, through the task's glue (the DAG
    # file, retention/airflow/tasks.py) to the one line; nothing below it: no chained exception, no
    # frame of the driver, of SQLAlchemy or of the systems and store modules where the error arose.
    failure = task_failure(log, words[0])
    assert "The above exception was the direct cause" not in failure, failure
    assert "During handling of the above exception" not in failure, failure
    for frame in ("site-packages/sqlalchemy", "psycopg2", "retention/systems/", "retention/store/", "retention/runs/"):
        assert frame not in failure, f"a traceback through {frame}:\n{failure}"


def task_failure(log: str, message: str) -> str:
    """What Airflow logged for the failed task: from its "Task failed with exception" line to the
    exception's last line, which must be the one line ``message``."""
    start = log.find("Task failed with exception")
    assert start >= 0, log[-4000:]
    end = log.find(message, start)
    assert end >= 0, f"the failure does not end in {message!r}:\n{log[start:start + 6000]}"
    return log[start:end + len(message)]
