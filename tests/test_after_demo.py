"""The README's "After the demo" commands work as written, in order, right after the demo.

The commands are read from README.md between ``<!-- after-demo -->`` and ``<!-- /after-demo -->``
(so the README and this test cannot drift), and run one after another in one bash shell, as a
user would type them, after ``./scripts/demo.sh --reset`` in a fresh RETENTION_HOME and
AIRFLOW_HOME. Each must exit 0 and print what it is for; a README command this test has no
expectation for fails the test too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- after-demo -->", "<!-- /after-demo -->"


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    if START not in text or END not in text:
        pytest.fail(f"README.md has no {START} ... {END} block")
    block = text.split(START, 1)[1].split(END, 1)[0]
    lines = [line.strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith(("```", "#"))]


def _json(out: str) -> dict:
    return json.loads(out)


def _dag_succeeded(out: str) -> bool:
    return bool(re.search(r"DagRun Finished: .*\bstate=success", out))


def _erased_everywhere(out: str) -> bool:
    # The request's report: one line per record type; the person is in all three systems.
    return _dag_succeeded(out) and all(
        re.search(rf"{kind}\s+erased [1-9]", out) for kind in ("newsletter_member", "crm_contact", "ticket_user", "support_ticket")
    )


# What each README command must print (stdout and stderr together, except explain: its stdout
# is JSON and nothing else), by the command's start.
EXPECT: list[tuple[str, Callable[[str, str], bool]]] = [
    ("source scripts/setup.sh", lambda out, err: True),
    ("python -m retention_dev.standins start",
     lambda out, err: "mailchimp stand-in: http://127.0.0.1:" in out and "zendesk stand-in: http://127.0.0.1:" in out),
    ("retention explain --record-type crm_contact", lambda out, err: _json(out)["found"] is True),
    ("retention explain --record-type newsletter_member", lambda out, err: _json(out)["found"] is True),
    ("retention hold add", lambda out, err: "hold added: crm_contact" in out),
    ("retention hold list", lambda out, err: re.search(r"^\s*\d+\s+crm_contact\s", out, re.M) is not None),
    ("retention preview", lambda out, err: "total: newly erased 0" in out),
    ("retention replay", lambda out, err: "state success" in out),
    ("airflow dags test erasure_request", lambda out, err: _erased_everywhere(out + err)),
    ("airflow dags test retention_nightly", lambda out, err: _dag_succeeded(out + err)),
    ("python -m retention_dev.standins stop", lambda out, err: "stopped: mailchimp, zendesk" in out),
]


def expectation(command: str) -> Callable[[str, str], bool]:
    for start, check in EXPECT:
        if command.startswith(start):
            return check
    pytest.fail(f"README's after-demo command has no expectation in this test: {command}")


@pytest.mark.timeout(1500)
def test_readme_commands_after_the_demo(tmp_path):
    commands = readme_commands()
    checks = [expectation(c) for c in commands]  # before the slow part: a new command fails at once
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    env.update(
        RETENTION_HOME=str(tmp_path / "retention"),
        AIRFLOW_HOME=str(tmp_path / "airflow"),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{tmp_path / 'airflow' / 'airflow.db'}",
    )
    demo = subprocess.run(["./scripts/demo.sh", "--reset"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    shown = re.search(r"in all three systems \(synthetic\): (\S+)", demo.stdout)
    assert shown, demo.stdout[-2000:]
    for address in re.findall(r"[\w.]+@example\.\w+", " ".join(commands)):
        assert address in demo.stdout, f"the README's {address} is not one the demo prints"

    # One shell, the commands in order; each one's output and exit status in files of its own.
    out = tmp_path / "out"
    out.mkdir()
    script = ["set +e", f"cd {ROOT}"]
    for i, command in enumerate(commands):
        script += [f"{{ {command}\n}} >{out}/{i}.out 2>{out}/{i}.err </dev/null", f"echo $? >{out}/{i}.rc"]
    script.append("python -m retention_dev.standins stop >/dev/null 2>&1")  # whatever happened above
    try:
        subprocess.run(["bash", "-c", "\n".join(script)], env=env, timeout=1200, check=False)
    finally:
        subprocess.run(["bash", "-c", f"cd {ROOT} && source scripts/setup.sh && python -m retention_dev.standins stop"],
                       env=env, capture_output=True, timeout=120, check=False)
    for i, (command, check) in enumerate(zip(commands, checks, strict=True)):
        stdout, stderr = (out / f"{i}.out").read_text(), (out / f"{i}.err").read_text()
        rc = int((out / f"{i}.rc").read_text())
        assert rc == 0, f"{command}: exit {rc}\n{stdout[-2000:]}\n{stderr[-2000:]}"
        assert check(stdout, stderr), f"{command}: not what it should print\n{stdout[-2000:]}\n{stderr[-2000:]}"
