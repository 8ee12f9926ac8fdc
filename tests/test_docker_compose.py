"""Static checks of docker-compose.yml, the Dockerfile, .dockerignore and .env.example.

Nothing here needs a Docker engine. The compose file is parsed with PyYAML (anchors and ``<<``
merge keys resolved) and interpolated the way Compose does (``${VAR:-default}``,
``${VAR:?error}``, ``$$``), then checked against the project it runs: the services exist and
agree with each other, the Airflow Connections point at services of the file and are read
correctly by the project's own hooks, the stand-ins' commands are accepted by their argument
parsers, mounted host paths exist, the pseudonym key is never written in the file, and the
Dockerfile builds on the Airflow version that requirements.txt pins.

Every check returns a list of problems; ``test_checks_catch_broken_copies`` runs them against
broken copies of the files, so a check that can no longer fail is noticed. When a Compose
binary is installed (``docker compose`` or ``docker-compose``), ``config -q`` validates the file
against Compose's own schema as well.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
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
STANDINS = {"mailchimp-standin": "tools.standins.mailchimp", "zendesk-standin": "tools.standins.zendesk"}
REQUIRED_SERVICES = {"postgres", *CORE_AIRFLOW_SERVICES, *STANDINS}
# Services that run once (or on demand) instead of staying up: no healthcheck expected.
ONE_SHOT = {"airflow-init", "airflow-cli"}
CONNECTIONS = ("retention_mailchimp", "retention_zendesk", "retention_crm", "retention_ledger")
# Required secrets: only ever referenced as ${NAME:?...}, never written in the file.
SECRETS = ("RETENTION_PSEUDONYM_KEY", "AIRFLOW__API_AUTH__JWT_SECRET")
MIN_KEY_LENGTH = 32  # retention.config.pseudonym_key() refuses shorter keys
# Host folders the stack creates at run time (Docker creates a missing bind source, airflow-init
# creates and chowns it): they need not be in the repository.
RUNTIME_DIRS = {"logs", "config"}
# The values the required variables get in these tests.
TEST_ENV = {"RETENTION_PSEUDONYM_KEY": "test-only-compose-key-0123456789abcdef", "AIRFLOW__API_AUTH__JWT_SECRET": "test-only-jwt"}
# Packages the image must have (the pipeline imports them).
RUNTIME_PACKAGES = {"apache-airflow", "great-expectations", "pandas", "numpy", "pyarrow", "sqlalchemy", "psycopg2-binary", "pyyaml"}


# ----------------------------------------------------------------------------------------------
# Compose interpolation


class InterpolationError(ValueError):
    pass


_DOLLAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.DOTALL)


def interpolate(value: str, env: dict[str, str]) -> str:
    """One string as Compose interpolates it (no nested expressions in defaults)."""

    def sub(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        if m.group("named"):
            return env.get(m.group("named"), "")
        expr = _BRACED.fullmatch(m.group("braced"))
        if expr is None:
            raise InterpolationError(f"invalid interpolation ${{{m.group('braced')}}}")
        name, op, arg = expr.group("name", "op", "arg")
        val = env.get(name)
        if op is None:
            return val or ""
        if op == ":-":
            return val if val else arg
        if op == "-":
            return val if val is not None else arg
        if op in (":?", "?"):
            if (op == ":?" and not val) or val is None:
                raise InterpolationError(f"required variable {name} is missing: {arg}")
            return val
        if op == ":+":
            return arg if val else ""
        return arg if val is not None else ""  # "+"

    return _DOLLAR.sub(sub, value)


def interpolate_tree(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(v, env) for v in node]
    return node


def references(value: Any) -> list[tuple[str, str | None, str]]:
    """The ``${NAME<op><arg>}`` references in a raw (uninterpolated) string."""
    if not isinstance(value, str):
        return []
    out = []
    for m in _DOLLAR.finditer(value):
        if m.group("braced") is not None and (expr := _BRACED.fullmatch(m.group("braced"))):
            out.append((expr.group("name"), expr.group("op"), expr.group("arg") or ""))
        elif m.group("named"):
            out.append((m.group("named"), None, ""))
    return out


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
    constraints_text: str = field(default_factory=lambda: _read("constraints.txt"))
    env: dict = field(default_factory=lambda: dict(TEST_ENV))

    @cached_property
    def raw(self) -> dict:
        doc = yaml.safe_load(self.compose_text)
        assert isinstance(doc, dict), "docker-compose.yml is not a mapping"
        return doc

    @cached_property
    def doc(self) -> dict:
        return interpolate_tree(self.raw, self.env)

    @property
    def services(self) -> dict[str, dict]:
        return self.doc.get("services") or {}

    @property
    def raw_services(self) -> dict[str, dict]:
        return self.raw.get("services") or {}

    @property
    def airflow_services(self) -> dict[str, dict]:
        return {n: s for n, s in self.services.items() if n.startswith("airflow-")}

    @property
    def common(self) -> dict:
        return self.doc.get("x-airflow-common") or {}

    def requirement_pin(self, name: str, text: str | None = None) -> str | None:
        for line in (text if text is not None else self.requirements_text).splitlines():
            m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
            if m and _norm(m.group(1)) == _norm(name):
                return m.group(2)
        return None


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    kind: str  # "bind" or "volume"
    read_only: bool


def _mounts(service: dict) -> list[Mount]:
    out = []
    for vol in service.get("volumes") or []:
        if isinstance(vol, dict):
            out.append(Mount(str(vol.get("source", "")), str(vol["target"]), vol.get("type", "volume"), bool(vol.get("read_only"))))
            continue
        parts = str(vol).split(":")
        source, target = parts[0], parts[1] if len(parts) > 1 else parts[0]
        mode = parts[2] if len(parts) > 2 else ""
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        out.append(Mount(source, target, kind, "ro" in mode.split(",")))
    return out


def _host_path(project: Project, service: dict, container_path: str) -> Path | None:
    """The repository path a container path comes from, through the service's bind mounts."""
    path = PurePosixPath(container_path)
    best: tuple[int, Path] | None = None
    for m in _mounts(service):
        target = PurePosixPath(m.target)
        if m.kind == "bind" and (path == target or target in path.parents):
            depth = len(target.parts)
            if best is None or depth > best[0]:
                best = (depth, (project.root / m.source / path.relative_to(target)).resolve())
    return best[1] if best else None


def _named_volume_targets(service: dict) -> list[PurePosixPath]:
    return [PurePosixPath(m.target) for m in _mounts(service) if m.kind == "volume"]


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


def _connection_json(project: Project, conn_id: str) -> dict | None:
    value = _env_of(project.common).get(f"AIRFLOW_CONN_{conn_id.upper()}")
    return None if value is None else json.loads(value)


def _postgres_databases_created(project: Project) -> set[str]:
    """Databases the postgres service has after its first start: POSTGRES_DB plus the init scripts'."""
    pg = project.services.get("postgres") or {}
    dbs = {_env_of(pg).get("POSTGRES_DB") or _env_of(pg).get("POSTGRES_USER") or "postgres"}
    for m in _mounts(pg):
        if m.kind == "bind" and m.target.rstrip("/") == "/docker-entrypoint-initdb.d":
            folder = project.root / m.source
            for script in sorted(folder.glob("*")) if folder.is_dir() else []:
                if script.suffix in (".sql", ".sh"):
                    dbs |= {d.strip("\"'") for d in re.findall(r"CREATE\s+DATABASE\s+(\"?\w+\"?)", script.read_text(), re.IGNORECASE)}
    return dbs


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
# Checks: each returns the problems it found


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


def check_airflow_common(p: Project) -> list[str]:
    from airflow.cli.cli_config import core_commands

    airflow_commands = {c.name for c in core_commands}
    common, common_env = p.common, _env_of(p.common)
    problems = []
    if not common:
        return ["no x-airflow-common block"]
    common_mounts = set(_mounts(common))
    for name, svc in p.airflow_services.items():
        for key in ("image", "build"):
            if svc.get(key) != common.get(key):
                problems.append(f"{name}: {key} {svc.get(key)!r} differs from x-airflow-common's {common.get(key)!r}")
        env = _env_of(svc)
        for key, value in common_env.items():
            if env.get(key) != value:
                problems.append(f"{name}: environment {key} is {env.get(key)!r}, not the common {value!r}")
        missing = common_mounts - set(_mounts(svc))
        if missing:
            problems.append(f"{name}: lacks the common mounts {sorted(m.target for m in missing)}")
        expected = CORE_AIRFLOW_SERVICES.get(name)
        cmd = _command(svc)
        if expected and cmd[:1] != [expected]:
            problems.append(f"{name}: command {cmd!r}, expected {expected!r}")
        if svc.get("entrypoint") is None and cmd and cmd[0] not in airflow_commands | {"bash", "python"}:
            problems.append(f"{name}: {cmd[0]!r} is not an airflow command")
    return problems


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
    if "/opt/airflow/plugins" not in env.get("PYTHONPATH", "").split(":"):
        problems.append("PYTHONPATH must contain /opt/airflow/plugins (the retention package)")
    plugins = _host_path(p, p.common, "/opt/airflow/plugins/retention/__init__.py")
    if plugins is None or not plugins.exists():
        problems.append("/opt/airflow/plugins is not mounted from the repository's plugins/")
    url = urlsplit(env.get("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", ""))
    api = p.services.get(url.hostname or "")
    if api is None or _command(api)[:1] != ["api-server"]:
        problems.append(f"AIRFLOW__CORE__EXECUTION_API_SERVER_URL host {url.hostname!r} is not the api-server service")
    if url.port != 8080 or url.path.rstrip("/") != "/execution":
        problems.append(f"AIRFLOW__CORE__EXECUTION_API_SERVER_URL should be http://<api-server>:8080/execution/, is {url.geturl()!r}")
    apiserver = p.services.get("airflow-apiserver") or {}
    if not any(str(port).endswith(":8080") or str(port) == "8080" for port in apiserver.get("ports") or []):
        problems.append("airflow-apiserver does not publish port 8080")
    policy = env.get("RETENTION_POLICY_FILE")
    host = _host_path(p, p.common, policy) if policy else None
    if host is None or not host.is_file():
        problems.append(f"RETENTION_POLICY_FILE {policy!r} is not a repository file mounted into the containers")
    home = env.get("RETENTION_HOME")
    if not home or PurePosixPath(home) not in _named_volume_targets(p.common):
        problems.append(f"RETENTION_HOME {home!r} is not on a named volume (staging would be lost with the container)")
    return problems


def check_connections(p: Project) -> list[str]:
    from airflow.models.connection import Connection

    problems = []
    pg = p.services.get("postgres") or {}
    pg_env = _env_of(pg)
    databases = _postgres_databases_created(p)
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
            if conn.login != pg_env.get("POSTGRES_USER") or conn.password != pg_env.get("POSTGRES_PASSWORD"):
                problems.append(f"connection {conn_id}: login/password differ from the postgres service's")
            if conn.schema not in databases:
                problems.append(f"connection {conn_id}: database {conn.schema!r} is not created by the postgres service ({sorted(databases)})")
        else:
            problems.append(f"connection {conn_id}: points at {hostname}, expected a stand-in or postgres")
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


def check_secrets(p: Project) -> list[str]:
    problems = []
    for name, svc in p.raw_services.items():
        env = svc.get("environment") or {}
        for secret in SECRETS:
            if secret not in env:
                continue
            refs = references(env[secret])
            ok = len(refs) == 1 and refs[0][0] == secret and refs[0][1] in (":?", "?") and env[secret].strip() == f"${{{secret}{refs[0][1]}{refs[0][2]}}}"
            if not ok:
                problems.append(f"{name}: {secret} must be exactly ${{{secret}:?...}} (from the environment / .env, no literal, no default)")
    if SECRETS[0] not in _env_of(p.raw.get("x-airflow-common") or {}):
        problems.append(f"{SECRETS[0]} is not passed to the Airflow services")
    for secret in SECRETS:
        env = {k: v for k, v in p.env.items() if k != secret}
        try:
            interpolate_tree(p.raw, env)
            problems.append(f"the file interpolates without {secret}: it must be required")
        except InterpolationError:
            pass
    if TEST_ENV[SECRETS[0]] in p.compose_text:
        problems.append("the test's pseudonym key appears in docker-compose.yml")
    return problems


def check_env_example(p: Project) -> list[str]:
    problems = []
    values = {}
    for line in p.env_example_text.splitlines():
        m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
        if m:
            values[m.group(1)] = m.group(2).strip()
    required = {name for svc in [p.raw.get("x-airflow-common") or {}, *p.raw_services.values()]
                for v in _env_of(svc).values() for name, op, _ in references(v) if op in (":?", "?")}
    for name in sorted(required | {"AIRFLOW_UID", "_AIRFLOW_WWW_USER_USERNAME", "_AIRFLOW_WWW_USER_PASSWORD"}):
        if name not in values:
            problems.append(f".env.example does not document {name}")
    key = values.get(SECRETS[0], "")
    if len(key) >= MIN_KEY_LENGTH:
        problems.append(f".env.example's {SECRETS[0]} placeholder is long enough to be used as a key: make it obviously not one (< {MIN_KEY_LENGTH} characters)")
    return problems


def check_mounts(p: Project) -> list[str]:
    problems = []
    declared = set((p.doc.get("volumes") or {}).keys())
    init_script = " ".join(_command(p.services.get("airflow-init") or {}))
    for name, svc in p.services.items():
        for m in _mounts(svc):
            if m.kind == "volume":
                if m.source not in declared:
                    problems.append(f"{name}: named volume {m.source!r} is not declared under volumes:")
                continue
            host = (p.root / m.source).resolve()
            rel = host.relative_to(p.root.resolve()) if host.is_relative_to(p.root.resolve()) else None
            if host.exists():
                continue
            if rel is not None and str(rel) in RUNTIME_DIRS and "mkdir" in init_script and str(rel) in init_script:
                continue  # created at run time; airflow-init creates and chowns it
            problems.append(f"{name}: mounted host path {m.source!r} does not exist in the repository")
    return problems


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
        if state is None or not any(t in state.parents for t in _named_volume_targets(svc)):
            problems.append(f"{name}: --state-file {state} is not on a named volume")
        if svc.get("image") != p.common.get("image"):
            problems.append(f"{name}: image {svc.get('image')!r} is not the Airflow services' {p.common.get('image')!r}")
        if "/opt/airflow/plugins" not in _env_of(svc).get("PYTHONPATH", "").split(":"):
            problems.append(f"{name}: PYTHONPATH must contain /opt/airflow/plugins")
        source = _host_path(p, svc, f"/opt/airflow/plugins/{module.replace('.', '/')}.py")
        if source is None or not source.is_file():
            problems.append(f"{name}: {module} is not mounted from the repository's plugins/")
    return problems


def check_healthchecks(p: Project) -> list[str]:
    problems = []
    for name, svc in p.services.items():
        if name in ONE_SHOT:
            continue
        if not _healthcheck_text(svc).strip() or (svc.get("healthcheck") or {}).get("disable"):
            problems.append(f"{name}: no healthcheck")
    return problems


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


def check_postgres_init(p: Project) -> list[str]:
    pg = p.services.get("postgres") or {}
    mounts = [m for m in _mounts(pg) if m.target.rstrip("/") == "/docker-entrypoint-initdb.d"]
    if not mounts:
        return ["postgres: no init scripts mounted at /docker-entrypoint-initdb.d"]
    problems = []
    if PurePosixPath(mounts[0].source.rstrip("/")) != PurePosixPath("./docker/postgres-init"):
        problems.append(f"postgres: init scripts come from {mounts[0].source!r}, expected ./docker/postgres-init")
    missing = {"crm", "retention_ledger"} - _postgres_databases_created(p)
    if missing:
        problems.append(f"postgres: the init scripts do not create {sorted(missing)}")
    return problems


def _dockerignore_excludes(text: str, name: str) -> bool:
    """Whether .dockerignore keeps a top-level file out of the build context (last match wins)."""
    import fnmatch

    excluded = False
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        if fnmatch.fnmatch(name, pattern.strip("/")):
            excluded = not negate
    return excluded


def check_dockerfile(p: Project) -> list[str]:
    problems = []
    build = p.common.get("build") or {}
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    if (p.root / context).resolve() != p.root.resolve() or dockerfile != "Dockerfile":
        problems.append(f"the image should build from ./Dockerfile in the repository root, not {context}/{dockerfile}")
    froms = re.findall(r"^\s*FROM\s+(\S+)", p.dockerfile_text, re.MULTILINE | re.IGNORECASE)
    if not froms:
        return [*problems, "Dockerfile has no FROM"]
    airflow = p.requirement_pin("apache-airflow")
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    expected = f"apache/airflow:{airflow}-python{python}"
    if froms[0] != expected:
        problems.append(f"Dockerfile FROM {froms[0]}, expected {expected} (apache-airflow=={airflow} in requirements.txt, tests on Python {python})")
    if p.requirement_pin("apache-airflow", p.constraints_text) != airflow:
        problems.append("constraints.txt and requirements.txt pin different apache-airflow versions")
    for sources in re.findall(r"^\s*COPY\s+(?:--\S+\s+)*(.+)\s+\S+\s*$", p.dockerfile_text, re.MULTILINE | re.IGNORECASE):
        for src in sources.split():
            if not (p.root / src).exists():
                problems.append(f"Dockerfile copies {src}, which does not exist")
            elif _dockerignore_excludes(p.dockerignore_text, src):
                problems.append(f"Dockerfile copies {src}, which .dockerignore keeps out of the build context")
    if "requirements.txt" not in p.dockerfile_text or "constraints.txt" not in p.dockerfile_text:
        problems.append("Dockerfile does not install requirements.txt with constraints.txt")
    for secret in (".env", ".venv", ".git"):
        if not _dockerignore_excludes(p.dockerignore_text, secret):
            problems.append(f".dockerignore lets {secret} into the build context")
    m = re.search(r'^\s*ARG\s+RETENTION_DEV_ONLY="([^"]*)"', p.dockerfile_text, re.MULTILINE)
    dev_only = set(m.group(1).split()) if m else set()
    for name in dev_only:
        if p.requirement_pin(name) is None:
            problems.append(f"RETENTION_DEV_ONLY names {name}, which requirements.txt does not pin")
        module = _norm(name).replace("-", "_").split("_")[0]
        for src in [*(p.root / "plugins").rglob("*.py"), *(p.root / "dags").rglob("*.py")]:
            if re.search(rf"^\s*(import|from)\s+{re.escape(module)}\b", src.read_text(), re.MULTILINE):
                problems.append(f"{src.relative_to(p.root)} imports {module}, but the image leaves {name} out")
                break
    for name in RUNTIME_PACKAGES:
        if p.requirement_pin(name) is None:
            problems.append(f"requirements.txt does not pin {name}")
        if _norm(name) in {_norm(d) for d in dev_only}:
            problems.append(f"the image leaves out {name}, which the pipeline needs")
    return problems


CHECKS: list[Callable[[Project], list[str]]] = [
    check_services,
    check_airflow_common,
    check_airflow_env,
    check_connections,
    check_secrets,
    check_env_example,
    check_mounts,
    check_standins,
    check_healthchecks,
    check_depends_on,
    check_postgres_init,
    check_dockerfile,
]


def all_problems(p: Project) -> list[str]:
    out = []
    for check in CHECKS:
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


def test_files_exist():
    for name in ("docker-compose.yml", "Dockerfile", ".dockerignore", ".env.example", "docker/postgres-init"):
        assert (ROOT / name).exists(), name


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_check(project, check):
    assert check(project) == []


def test_interpolation_follows_compose():
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("$$HOME ${SET} $SET ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} ${SET:+alt} ${UNSET:+alt}", env) == "$HOME v v d d  alt "
    with pytest.raises(InterpolationError, match="in .env"):
        interpolate("${EMPTY:?set it in .env}", env)
    assert interpolate("${EMPTY?msg}", env) == ""


def test_required_secrets_fail_interpolation_without_env(project):
    with pytest.raises(InterpolationError, match="RETENTION_PSEUDONYM_KEY"):
        interpolate_tree(project.raw, {"AIRFLOW__API_AUTH__JWT_SECRET": "x"})


@pytest.mark.parametrize("conn_id", CONNECTIONS)
def test_project_hooks_read_the_connections(project, conn_id, monkeypatch):
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
        assert (url.get_backend_name(), url.host, url.port, url.database) == ("postgresql", "postgres", 5432, "crm")
        hook.get_mapping()  # the mapping file named in the extra loads
    else:
        from retention import config

        monkeypatch.delenv("RETENTION_LEDGER_URL", raising=False)
        url = config.ledger_url()
        assert url.startswith("postgresql://") and url.endswith("@postgres:5432/retention_ledger"), url


def test_airflow_init_script_is_valid_bash(project):
    script = _command(project.services["airflow-init"])
    assert project.services["airflow-init"].get("entrypoint") == "/bin/bash" and script[0] == "-c"
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    out = subprocess.run([bash, "-n", "-c", script[1]], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "RETENTION_PSEUDONYM_KEY" in script[1], "airflow-init should refuse a short pseudonym key"


def test_postgres_init_sql_is_idempotent_text():
    sql = "\n".join(f.read_text() for f in sorted((ROOT / "docker" / "postgres-init").glob("*.sql")))
    for db in ("crm", "retention_ledger"):
        assert re.search(rf"CREATE DATABASE {db}\b", sql)
        assert re.search(rf"datname\s*=\s*'{db}'", sql), f"creating {db} should be guarded by NOT EXISTS"


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


PSEUDO_REF = "${RETENTION_PSEUDONYM_KEY:?set it in .env (see .env.example)}"

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
    "airflow service on another image": (
        lambda p: replace(p, compose_text=_edit(p.compose_text, lambda d: d["services"]["airflow-triggerer"].update(image="apache/airflow:3.3.2"))),
        "airflow-triggerer: image"),
    "airflow service without the common env": (
        lambda p: replace(p, compose_text=_edit(p.compose_text, lambda d: d["services"]["airflow-scheduler"]["environment"].pop("RETENTION_HOME"))),
        "airflow-scheduler: environment RETENTION_HOME"),
    "misspelt airflow option": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "AIRFLOW__CORE__LOAD_EXAMPLES:", "AIRFLOW__CORE__LOAD_EXAMPLE:")),
        "no option [core] load_example"),
    "execution api on the wrong host": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "http://airflow-apiserver:8080/execution/", "http://airflow-webserver:8080/execution/")),
        "EXECUTION_API_SERVER_URL host"),
    "connection to a host that is no service": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "http://zendesk-standin:8082}", "http://zendesk:8082}")), "host 'zendesk' is not a service"),
    "connection port differs from the stand-in": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "http://mailchimp-standin:8081/3.0}", "http://mailchimp-standin:9081/3.0}")),
        "but mailchimp-standin listens on 8081"),
    "mailchimp key differs from the stand-in": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "${MAILCHIMP_API_KEY:-standin-key-us0}", "${MAILCHIMP_API_KEY:-other-key-us0}")),
        "API key differs"),
    "missing connection": (
        lambda p: replace(p, compose_text=_edit(p.compose_text, lambda d: [s.get("environment", {}).pop("AIRFLOW_CONN_RETENTION_CRM", None) for s in [d["x-airflow-common"], *d["services"].values()]])),
        "connection retention_crm is not set"),
    "ledger database not created": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, '"schema": "retention_ledger"', '"schema": "ledger"')), "database 'ledger' is not created"),
    "invalid connection json": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, '"schema": "crm",', '"schema": "crm"')), "not valid JSON"),
    "mounted path missing": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "/include:/opt/airflow/include", "/includes:/opt/airflow/include")),
        "mounted host path './includes' does not exist"),
    "undeclared named volume": (
        lambda p: replace(p, compose_text=_edit(p.compose_text, lambda d: d["volumes"].pop("standin-state"))), "named volume 'standin-state' is not declared"),
    "stand-in module that does not exist": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "- tools.standins.zendesk", "- tools.standins.freshdesk")), "does not exist"),
    "stand-in flag its parser rejects": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "- --members", "- --member-count")), "rejects its arguments"),
    "stand-in listening on localhost": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "- 0.0.0.0", "- 127.0.0.1")), "unreachable from the other containers"),
    "stand-in healthcheck on the wrong path": (
        lambda p: replace(p, compose_text=_sub(p.compose_text, "localhost:8082/_standin/health", "localhost:8082/health")),
        "zendesk-standin: healthcheck does not probe"),
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
    "Dockerfile on another Airflow": (
        lambda p: replace(p, dockerfile_text=_sub(p.dockerfile_text, "apache/airflow:3.3.2-python3.11", "apache/airflow:3.3.1-python3.11")),
        "expected apache/airflow:3.3.2-python3.11"),
    "Dockerfile on another Python": (
        lambda p: replace(p, dockerfile_text=_sub(p.dockerfile_text, "-python3.11", "-python3.12")), "expected apache/airflow:"),
    "requirements pin another Airflow": (
        lambda p: replace(p, requirements_text=_sub(p.requirements_text, "apache-airflow==3.3.2", "apache-airflow==3.3.3")),
        "expected apache/airflow:3.3.3-python"),
    "image leaves out a runtime package": (
        lambda p: replace(p, dockerfile_text=_sub(p.dockerfile_text, 'RETENTION_DEV_ONLY="pytest', 'RETENTION_DEV_ONLY="pyarrow pytest')),
        "leaves out pyarrow"),
    ".dockerignore lets .env in": (
        lambda p: replace(p, dockerignore_text=_sub(p.dockerignore_text, "\n*\n", "\n.venv\n.git\n")), ".dockerignore lets .env"),
    ".dockerignore keeps out a copied file": (
        lambda p: replace(p, dockerignore_text=_sub(p.dockerignore_text, "!constraints.txt", "")), "keeps out of the build context"),
    "not valid YAML": (lambda p: replace(p, compose_text=p.compose_text + "\n  - : ]["), "crashed"),
}


def test_broken_copies_are_real_mutations():
    for name, (mutate, _) in BROKEN.items():
        assert mutate(Project()) != Project(), name


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_checks_catch_broken_copies(case):
    mutate, expected = BROKEN[case]
    problems = all_problems(mutate(Project()))
    assert any(expected in msg for msg in problems), f"no problem mentions {expected!r}: {problems}"


# ----------------------------------------------------------------------------------------------
# Compose's own validation, when a Compose binary is installed (no engine needed)


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], check=False, capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone and subprocess.run([standalone, "version"], check=False, capture_output=True).returncode == 0:
        return [standalone]
    return None


def _compose_config(cmd: list[str], compose_file: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "COMPOSE_"))}
    env.update(TEST_ENV)
    return subprocess.run(
        [*cmd, "--project-directory", str(compose_file.parent), "-f", str(compose_file), "config", "-q"],
        check=False, capture_output=True, text=True, env=env, timeout=120,
    )


def test_compose_config_validates(tmp_path):
    cmd = _compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    out = _compose_config(cmd, ROOT / "docker-compose.yml")
    assert out.returncode == 0, out.stderr
    # ... and the same validation rejects a broken copy.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(_drop_service(Project().compose_text, "airflow-init"))
    out = _compose_config(cmd, broken)
    assert out.returncode != 0 and "airflow-init" in out.stderr, out.stderr
