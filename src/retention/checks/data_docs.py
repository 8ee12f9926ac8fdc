"""Great Expectations as its users know it: each run's suites and validation results are kept in
a file-backed GX project per run and system, with its Data Docs.

``<root>/<stem>/<system>/gx/`` is an ordinary GX project (``gx.get_context(project_root_dir=
<root>/<stem>/<system>)`` opens it): ``expectations/`` holds the suites, ``uncommitted/validations/``
the results, ``uncommitted/data_docs/local_site/index.html`` the Data Docs. ``<stem>`` is the
run's report stem, so a run's documents sit beside its report, outlive its staging (removed when
the run succeeds) and are built once, when the run validates: a night builds its own pages,
never an earlier run's. :func:`prune` removes those of runs older than a number of days.

No personal data: the results kept are those the suites were run with (``validation``): pass or
fail only for a passing suite, counts for a failing one, and never the unexpected values, rows
or indexes GX would otherwise list (record ids, addresses). Data Docs render only these results.

GX is imported only when something is kept; :func:`prune` needs none of it.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

SITE = Path("gx", "uncommitted", "data_docs", "local_site")
#: GX's static files (styles, fonts, images: 4 MB), one copy per GX version under the root;
#: each site gets hard links to it rather than a copy of its own every night.
STATIC = "_static"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def keep(outcomes: Iterable, root: Path, stem: str, system: str) -> str:
    """Keep the suites and results of ``outcomes`` (``validation.ValidationOutcome``) in the
    run's GX project for ``system`` and build its Data Docs. Returns the index page's path
    relative to ``root``."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context import set_context
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    from retention.checks.validation import gx_context, hush_gx

    project = root / _safe(stem) / _safe(system)
    project.mkdir(parents=True, exist_ok=True)
    ctx = gx.get_context(mode="file", project_root_dir=project)
    # get_context makes the new context GX's current project; the validation's own context stays it.
    set_context(gx_context())
    run_id = RunIdentifier(run_name=_safe(stem), run_time=datetime.now(UTC))
    keys = []
    for outcome in outcomes:
        if outcome.suite is None or outcome.result is None:
            continue
        ctx.suites.add_or_update(outcome.suite)
        result = outcome.result
        # Our own meta: GX's names the shared in-memory asset ("frame") for every suite.
        result.meta = {
            "great_expectations_version": gx.__version__,
            "run_id": run_id,
            "validation_time": run_id.run_time,
            "active_batch_definition": {
                "datasource_name": "retention", "data_connector_name": "fluent",
                "data_asset_name": f"{system} {outcome.name}", "batch_identifiers": {},
            },
            "batch_spec": {"data_asset_name": f"{system} {outcome.name}", "batch_data": "PandasDataFrame"},
        }
        key = ValidationResultIdentifier(ExpectationSuiteIdentifier(name=outcome.suite.name), run_id, outcome.name)
        ctx.validation_results_store.set(key, result)
        keys.append(key)
    _build(ctx, project / SITE, root / STATIC / f"gx-{gx.__version__}")
    hush_gx()  # the renderers' modules, loaded just now
    return (project / SITE / "index.html").relative_to(root).as_posix()


def _build(ctx, site: Path, static: Path) -> None:
    """The project's Data Docs: every page of its suites and results (this run's only), the
    static files linked, not copied."""
    from great_expectations.render.renderer.site_builder import SiteBuilder

    _compile_templates_once()

    builder = SiteBuilder(
        data_context=ctx,
        store_backend={"class_name": "TupleFilesystemStoreBackend", "base_directory": str(site)},
        site_name="local_site",
        site_index_builder={"class_name": "DefaultSiteIndexBuilder", "show_cta_footer": False},
        show_how_to_buttons=False,
        site_section_builders={"profiling": "None"},  # no profiling results are kept
    )
    builder.target_store.copy_static_assets = lambda *_, **__: _link_static(static, site / "static")
    builder.build()


def _compile_templates_once() -> None:
    """GX makes a new Jinja environment for every page it renders, and so compiles its ~50
    templates again for each (0.2 s a page: seconds for a system of many record types). A
    bytecode cache shared by those environments compiles each template once per process."""
    import jinja2
    from great_expectations.render.view import view

    if not isinstance(view.Environment, functools.partial):
        view.Environment = functools.partial(jinja2.Environment, bytecode_cache=_TemplateCode())


class _TemplateCode:
    """Jinja's ``BytecodeCache`` in memory (made a subclass when first used: Jinja loads with GX)."""

    def __new__(cls):
        import jinja2

        class Memory(jinja2.BytecodeCache):
            def __init__(self) -> None:
                self.code: dict[str, object] = {}

            def load_bytecode(self, bucket) -> None:
                if bucket.key in self.code:
                    bucket.code = self.code[bucket.key]

            def dump_bytecode(self, bucket) -> None:
                self.code[bucket.key] = bucket.code

        return Memory()


def _link_static(shared: Path, target: Path) -> None:
    if not shared.exists():
        import great_expectations

        source = Path(great_expectations.__file__).parent / "render" / "view" / "static"
        # Copied whole, then renamed into place: two runs at once never see half a copy.
        shared.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".static-", dir=shared.parent))
        shutil.copytree(source, tmp / "static")
        try:
            (tmp / "static").rename(shared)
        except OSError:  # another run put its copy there first
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    for file in shared.rglob("*"):
        if file.is_dir():
            continue
        to = target / file.relative_to(shared)
        to.parent.mkdir(parents=True, exist_ok=True)
        to.unlink(missing_ok=True)
        try:
            os.link(file, to)
        except OSError:  # a file system without hard links
            shutil.copyfile(file, to)


def prune(root: Path, days: float, *, keep: str | None = None) -> int:
    """Remove the GX projects of every run (the ``<stem>`` directories under ``root``) none of
    whose files changed for ``days`` days; ``keep`` (the calling run's stem) stays. Returns
    how many runs' went."""
    if not root.exists():
        return 0
    cutoff = time.time() - days * 86400
    purged = 0
    for run_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        if keep is not None and run_dir.name == _safe(keep):
            continue
        if _newest_change(run_dir) < cutoff:
            shutil.rmtree(run_dir, ignore_errors=True)
            purged += 1
    if purged:
        log.info("data docs: purged those of %d earlier run(s), unchanged for more than %g days", purged, days)
    return purged


def _newest_change(path: Path) -> float:
    # The hard-linked static files carry the shared copy's time, never a later one.
    return max((p.lstat().st_mtime for p in path.rglob("*")), default=path.stat().st_mtime)
