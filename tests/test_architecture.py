"""The layout's rules, read from the code itself (every import, also those inside functions).

- the domain imports nothing of the project but the domain;
- store and checks build on the domain only; systems on the domain and their shared transport;
- runs reach a system only through the port (``retention.systems`` / ``systems.base``), never a
  hook or a client;
- the runtime package never imports the development tooling (``retention_dev``);
- the ledger is written in one place (the erasure engine), reports in one place (the report
  writer).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "retention"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it, resolved to absolute names."""
    tree = ast.parse(path.read_text(), str(path))
    if path.is_relative_to(SRC):
        package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    else:
        package = ""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def project_imports(module: str) -> set[str]:
    return {i for i in imports_of(MODULES[module]) if i.split(".")[0] in ("retention", "retention_dev") and i in MODULES or i.startswith("retention_dev")}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


ALLOWED = {
    "domain": {"domain"},
    "store": {"domain", "store", "config"},
    "checks": {"domain", "checks"},
    "systems": {"domain", "systems", "config", "progress"},
    "runs": {"domain", "store", "checks", "systems", "runs", "config", "progress"},
    "airflow": {"domain", "runs", "systems", "store", "airflow", "config"},
}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) in ALLOWED))
def test_layers_import_only_downwards(module):
    bad = sorted(i for i in project_imports(module) if layer(i) not in ALLOWED[layer(module)] and i != "retention")
    assert not bad, f"{module} imports {bad}: the {layer(module)} layer may use {sorted(ALLOWED[layer(module)])}"


def test_the_domain_imports_nothing_else_of_the_project():
    domain = [m for m in MODULES if layer(m) == "domain"]
    assert len(domain) >= 10
    for module in domain:
        others = {i for i in project_imports(module) if layer(i) != "domain"}
        assert not others, f"{module} imports {others}"


def test_runs_reach_systems_only_through_the_port():
    port = {"retention.systems", "retention.systems.base"}
    for module in (m for m in MODULES if layer(m) == "runs"):
        direct = {i for i in project_imports(module) if layer(i) == "systems" and i not in port and not i.startswith("retention.systems.base.")}
        assert not direct, f"{module} reaches a system past the port: {direct}"


def test_the_runtime_package_never_imports_the_development_tools():
    for module, path in MODULES.items():
        tools = {i for i in imports_of(path) if i == "retention_dev" or i.startswith("retention_dev.")}
        assert not tools, f"{module} imports development tooling {tools}: a production install has no retention_dev/"


def calls_to(attr: str) -> set[str]:
    """Modules that call ``<something>.<attr>(...)``."""
    out = set()
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr:
                out.add(module)
    return out


def test_the_ledger_is_written_by_the_erasure_engine_only():
    assert calls_to("write_ahead") == {"retention.runs.erasing"}
    # Completions: the engine; the ledger's own methods call nothing of that name on others.
    assert {m for m in calls_to("complete") if layer(m) != "store"} == {"retention.runs.erasing"}


def test_reports_are_written_by_the_report_writer_only():
    assert calls_to("write_report") <= {m for m in MODULES if layer(m) == "runs"}
    assert calls_to("close_run") == {"retention.store.reports"}
    assert calls_to("reports_dir") == {"retention.store.reports"}


def test_dags_only_wire():
    """DAG files reach the project through runs, the Airflow glue and the domain's light
    constants; never a system, the store or the tooling directly (imports inside tasks included)."""
    allowed = ("retention.runs", "retention.airflow", "retention.domain.records", "retention.domain.addresses",
               "retention.checks.validation", "retention.store.ledger")
    for dag in (ROOT / "dags").glob("*.py"):
        ours = {i for i in imports_of(dag) if i.startswith(("retention", "retention_dev"))}
        bad = {i for i in ours if not i.startswith(allowed)}
        assert not bad, f"{dag.name} imports {bad}"


def test_parsing_the_dags_loads_no_pandas():
    """The DAG processor parses every DAG file every few seconds: pandas, numpy and the HTTP and
    database drivers are loaded by the tasks that use them, never at parse time."""
    import subprocess
    import sys

    code = (
        "import sys; sys.path.insert(0, 'dags')\n"
        "import retention_nightly, erasure_request, replay_erasures, policy_preview\n"
        "print(sorted(m for m in ('pandas', 'numpy', 'pyarrow', 'great_expectations', 'psycopg2') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
