"""The tests leave the developer's machine as they found it: their own Airflow home and metadata
database (never ``~/airflow``, the repository's ``.airflow`` or an exported
``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN``), no server left running when the session ends, and no
server listening beyond 127.0.0.1."""

from __future__ import annotations

import ast
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from retention_dev.standins.process import StandIn

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by a parent that is gone) counts as stopped.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def _inside(path: str | Path, parent: str | Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(parent).resolve())


def test_airflow_home_and_metadata_db_are_this_sessions_own():
    from airflow.configuration import AIRFLOW_HOME, conf

    home = os.environ["AIRFLOW_HOME"]
    assert AIRFLOW_HOME == home
    assert _inside(home, tempfile.gettempdir()) and Path(home).parent.name.startswith("retention-tests-"), home
    assert not _inside(home, ROOT), f"the tests use the repository's Airflow home {home}"
    assert not _inside(home, Path.home() / "airflow")
    db = conf.get("database", "sql_alchemy_conn")
    assert db.startswith("sqlite:///") and _inside(db.removeprefix("sqlite:///"), home), "the metadata database is not the session's own"
    assert not os.environ.get("AIRFLOW_CONFIG") or _inside(os.environ["AIRFLOW_CONFIG"], home)


def _pytest(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def test_a_developers_airflow_settings_do_not_reach_the_tests(tmp_path):
    # What a developer's shell may export: their Airflow home, config file and metadata database.
    users = tmp_path / "users-airflow"
    users.mkdir()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(users),
        "AIRFLOW_CONFIG": str(users / "airflow.cfg"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{users / 'users.db'}",
    }
    out = _pytest([f"{Path(__file__).name}::test_airflow_home_and_metadata_db_are_this_sessions_own"], env, TESTS)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert list(users.iterdir()) == [], "the tests wrote into the developer's Airflow home"


def test_a_stopped_stand_in_leaves_its_port_closed(tmp_path):
    s = StandIn("mailchimp", "--port", "0", "--members", "5", "--state-file", str(tmp_path / "mc.npz")).start()
    port, pid = s.port, s.proc.pid
    assert _port_open(port)
    s.stop()
    assert not _port_open(port) and not _alive(pid)


LEAKY_TEST = '''
from pathlib import Path

from retention_dev.standins.process import StandIn


def test_forgets_to_stop_its_stand_in(tmp_path):
    s = StandIn("mailchimp", "--port", "0", "--members", "5", "--state-file", str(tmp_path / "mc.npz")).start()
    Path({marker!r}).write_text(f"{{s.proc.pid}} {{s.port}}")
'''


def test_a_server_left_running_fails_the_session_and_is_stopped(tmp_path):
    marker = tmp_path / "leaked"
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_leaky.py").write_text(textwrap.dedent(LEAKY_TEST.format(marker=str(marker))))
    # The project's conftest.py as a plugin: the session's own set-up and end, around one leaky test.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = _pytest(["-c", os.devnull, "--rootdir", str(project), "-p", "conftest", "test_leaky.py"], env, project)
    assert marker.exists(), out.stdout[-3000:] + out.stderr[-2000:]
    pid, port = (int(x) for x in marker.read_text().split())
    try:
        assert out.returncode != 0, "a session that left a server running passed"
        assert "left running" in out.stdout + out.stderr
        assert not _port_open(port) and not _alive(pid), "the server was left running"
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


# --- nothing listens beyond 127.0.0.1 by default ---------------------------------------------------

# Where a wildcard address may stand: docker-compose's containers must be reachable from each
# other (their ports are published on 127.0.0.1 only; tests/test_docker_compose.py checks both).
WILDCARD_ALLOWED = {"tests/test_docker_compose.py", "tests/test_isolation.py"}
WILDCARD = re.compile(r"""0\.0\.0\.0|["']::["']|\bhost\s*=\s*["']["']|(bind|Server)\(\s*\(\s*["']["']""")


def _sources() -> list[Path]:
    return sorted(p for d in ("retention_dev", "tests", "scripts", "src", "plugins") for p in (ROOT / d).rglob("*") if p.suffix in {".py", ".sh"})


def test_no_server_in_the_sources_binds_a_wildcard_address():
    found = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in _sources() if str(p.relative_to(ROOT)) not in WILDCARD_ALLOWED
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if WILDCARD.search(line)
    ]
    assert not found, "binds beyond 127.0.0.1:\n" + "\n".join(found)


def test_every_stand_in_listens_on_loopback_by_default():
    modules = [p for p in (ROOT / "retention_dev" / "standins").glob("*.py") if 'add_argument("--host"' in p.read_text()]
    assert modules, "no stand-in with a --host option found"
    for path in modules:
        tree = ast.parse(path.read_text())
        defaults = [
            kw.value.value for node in ast.walk(tree) if isinstance(node, ast.Call) and node.args
            and isinstance(node.args[0], ast.Constant) and node.args[0].value == "--host"
            for kw in node.keywords if kw.arg == "default" and isinstance(kw.value, ast.Constant)
        ]
        assert defaults == ["127.0.0.1"], f"{path.name}: --host defaults to {defaults}"


def test_the_airflow_services_check_finds_a_server_listening_on_every_interface():
    """What AirflowServices.stop checks before it stops the services (the scheduler's log server
    listens on every interface unless started with --skip-serve-logs): a listener of the
    process is found when the socket table says it is bound to 0.0.0.0, not when to 127.0.0.1.
    (Nothing here listens beyond 127.0.0.1: the wildcard row is the real one, readdressed.)"""
    from airflow_services import wildcard_listeners

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        table = Path("/proc/net/tcp").read_text()
        mine = next(line for line in table.splitlines()[1:] if line.split()[1] == f"0100007F:{port:04X}")
        assert wildcard_listeners([os.getpid()]) == []
        header = table.splitlines()[0]
        wide = mine.replace(f"0100007F:{port:04X}", f"00000000:{port:04X}", 1)
        assert wildcard_listeners([os.getpid()], {"tcp": f"{header}\n{wide}"}) == [f"00000000:{port}"]
