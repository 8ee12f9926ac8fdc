"""The params the DAGs share and the check of a run's conf against its DAG's params: one place for
all four DAGs, light enough to import at parse time.

What Airflow 3.3 refuses by itself, before it creates a run (the REST API and so the UI's trigger
form, ``airflow dags trigger``, backfills, ``dag.test``: all end in ``SerializedDAG.create_dagrun``,
which validates ``params.deep_merge(conf)``): a value its param's JSON schema refuses, answered
with HTTP 400 / ``ParamValidationError``. What it accepts: a conf key that is no param (it becomes a
param without a schema, valid whatever it holds), and NaN where a schema says ``type: number``
with ``minimum``/``maximum`` (every comparison with NaN is false, so no bound is broken).

So the schemas here say all that JSON schema can (``minItems``, ``uniqueItems``, ``enum``, bounds,
NaN refused through a ``not``), and :func:`checked_context`, the first thing the first task and
the final task of every DAG call, refuses the rest with one line and without a retry: a key the DAG
has no param for (naming it, what it may have meant and the known keys), NaN or Infinity anywhere,
and a conf value that did not reach the params (``[core] dag_run_conf_overrides_params`` off).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from typing import Any

from airflow.sdk import Param

from retention.domain.records import SYSTEMS

SAFETY = "Safety"
SCOPE = "Scope"


def systems_param(description: str, *, section: str | None = SCOPE) -> Param:
    """Some of the systems, at least one, each once (default: all)."""
    return Param(
        list(SYSTEMS), description=description, title="Systems", type="array",
        items={"type": "string", "enum": list(SYSTEMS)}, minItems=1, uniqueItems=True, **_section(section),
    )


def dry_run_param(description: str, *, section: str | None = SAFETY) -> Param:
    return Param(False, description=description, title="Dry run", type="boolean", **_section(section))


def reconcile_param(description: str, *, section: str | None = SCOPE) -> Param:
    return Param(False, description=description, title="Reconcile", type="boolean", **_section(section))


def share_param(*, title: str, description: str, section: str | None = SAFETY) -> Param:
    """Empty, or a share of more than 0 and at most 1. ``exclusiveMinimum``/``maximum`` let NaN
    through (NaN <= 0 and NaN > 1 are both false); ``not`` a number at most 0 refuses it, because
    NaN is "at most 0" for JSON schema as well."""
    return Param(
        None, description=description, title=title, type=["null", "number"], exclusiveMinimum=0, maximum=1,
        **{"not": {"description": "NaN, or a share of 0 or less", "type": "number", "maximum": 0}}, **_section(section),
    )


def _section(section: str | None) -> dict[str, str]:
    return {"section": section} if section else {}


# --- the check of a run's conf -------------------------------------------------------------------


def checked_context() -> Mapping[str, Any]:
    """The running task's context, once the run's conf is known to be what the DAG's params
    accept; otherwise the task fails at once, without retry, with one line (nothing else runs)."""
    from airflow.sdk import get_current_context
    from airflow.sdk.exceptions import AirflowFailException

    ctx = get_current_context()
    problem = conf_problem(ctx["dag"].dag_id, ctx["dag_run"].conf, ctx["dag"].params, ctx["params"])
    if problem:
        raise AirflowFailException(problem)
    return ctx


def conf_problem(dag_id: str, conf: Any, known: Iterable[str], params: Mapping[str, Any]) -> str | None:
    """What is wrong with a run's ``conf`` for a DAG whose params are ``known`` and resolved to
    ``params``, in one line; None when nothing is. Names keys, never values (a value may be an
    e-mail address)."""
    if conf is None:
        return None
    if not isinstance(conf, Mapping):
        return f"{dag_id}: the run's conf must be a JSON object of params, got {type(conf).__name__}; nothing ran"
    known = sorted(known)
    unknown = sorted(k for k in conf if k not in known)
    if unknown:
        named = ", ".join(_named(k, known) for k in unknown)
        s = "s" if len(unknown) > 1 else ""
        return (
            f"{dag_id}: unknown conf key{s} {named}; the known keys are {', '.join(known)}. "
            f"Nothing ran: trigger the run again with the right key{s}"
        )
    for key, value in conf.items():
        if not _finite(value):
            return f"{dag_id}: conf key {key!r} holds NaN or Infinity, which no param accepts; nothing ran"
    for key, value in conf.items():
        if key in params and params[key] != value:
            return (
                f"{dag_id}: conf key {key!r} did not reach the run's params (is [core] dag_run_conf_overrides_params "
                "off?); nothing ran rather than run with other values than those asked for"
            )
    return None


def _named(key: Any, known: list[str]) -> str:
    if not isinstance(key, str) or "@" in key or len(key) > 60:
        return "<a key that is no param name>"  # never echo what may be an address
    shown = repr(key)
    norm = {_norm(k): k for k in known}
    guess = norm.get(_norm(key)) or next(iter(difflib.get_close_matches(key, known, n=1, cutoff=0.6)), None)
    return f"{shown} (did you mean {guess!r}?)" if guess else shown


def _norm(key: str) -> str:
    return "".join(c for c in key.lower() if c.isalnum())


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, Mapping):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    return True
