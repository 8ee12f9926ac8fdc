"""Load and validate the retention policy file (``include/policies/*.yaml``).

A broken policy must fail before anything is erased, with a message naming the file, the rule
and the field. Values that would match nothing are broken too: a ``when`` or ``protections``
value that an enumerated column of the record schema never takes (a typo such as
'unsubscibed'), a period longer than ``durations.MAX_YEARS``. And the policy must state every
protection the code enforces (``RecordType.protected``), so that the notice as published and
the code agree. The policy version is the content hash of the file, recorded with every run.
"""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from retention.domain.durations import Duration
from retention.domain.records import RECORD_TYPES, known_values


class PolicyError(ValueError):
    """The policy file is unusable. The message names the file, the rule and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Clause(_Strict):
    title: str
    quote: str = ""


class PlanGuard(_Strict):
    max_share: float = Field(gt=0, le=1)


class Protection(_Strict):
    records: str
    column: str
    in_: list[Any] = Field(alias="in", min_length=1)
    # Records the protection does not cover: column -> values (a record matching any column).
    unless: dict[str, list[Any]] = Field(default_factory=dict)
    clause: str
    reason: str


def _as_list(clock: str | list[str]) -> list[str]:
    """A clock named alone or a list of clocks, as a list."""
    return [clock] if isinstance(clock, str) else list(clock)


class Fallback(_Strict):
    """The clock a rule falls back on when a record lacks the rule's own clock (Mailchimp members
    added by API have no signup time, say). Not in the notice: the organisation's decision,
    stated with who decided it. A list: the first clock the record has wins."""

    clock: str | list[str]
    source: Literal["decision"]
    decided_by: str | None = None  # required; checked by the rule for a message naming the field

    @property
    def clocks(self) -> list[str]:
        return _as_list(self.clock)


class Rule(_Strict):
    id: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    clause: str
    system: Literal["newsletter", "crm", "ticketing"]
    records: str
    when: dict[str, list[Any]] = Field(default_factory=dict)
    clock: str | list[str]
    clock_align: Literal["none", "next_calendar_year"] = "none"
    fallback: Fallback | None = None
    period: str
    period_source: Literal["notice", "decision", "law"]
    decided_by: str | None = None
    period_if_opted_out: str | None = None
    action: Literal["erase"]
    holds_while_running: str | None = None

    @field_validator("period", "period_if_opted_out")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        if v is not None:
            Duration.parse(v)
        return v

    @field_validator("records")
    @classmethod
    def _records(cls, v: str) -> str:
        if v not in RECORD_TYPES:
            raise ValueError(f"unknown record type {v!r}; known: {', '.join(RECORD_TYPES)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        rt = RECORD_TYPES[self.records]
        if rt.system != self.system:
            raise ValueError(f"field 'system': records {self.records!r} belong to system {rt.system!r}, not {self.system!r}")
        for col in self.clocks:
            if col not in rt.clocks:
                raise ValueError(f"field 'clock': {col!r} is not a clock of {self.records} (one of {', '.join(rt.clocks)})")
        if self.fallback is not None:
            _check_fallback(self, rt)
        for col in self.when:
            if col not in rt.columns:
                raise ValueError(f"field 'when': {col!r} is not a column of {self.records}")
        if self.period_source == "decision" and not self.decided_by:
            raise ValueError("field 'decided_by': period_source 'decision' needs it: who decided the period the notice does not give")
        if self.period_if_opted_out is not None and "opted_out" not in rt.columns:
            raise ValueError(f"field 'period_if_opted_out': given but {self.records} has no opted_out column")
        return self

    @property
    def clocks(self) -> list[str]:
        return _as_list(self.clock)

    @property
    def fallback_clocks(self) -> list[str]:
        return self.fallback.clocks if self.fallback is not None else []

    @property
    def duration(self) -> Duration:
        return Duration.parse(self.period)

    @property
    def opted_out_duration(self) -> Duration | None:
        return Duration.parse(self.period_if_opted_out) if self.period_if_opted_out else None


def _check_fallback(rule: Rule, rt) -> None:
    """A fallback names other clocks of the record type, and who decided it."""
    fallback = rule.fallback
    if not fallback.clocks:
        raise ValueError("field 'fallback.clock': name at least one clock")
    for col in fallback.clocks:
        if col not in rt.clocks:
            raise ValueError(f"field 'fallback.clock': {col!r} is not a clock of {rule.records} (one of {', '.join(rt.clocks)})")
        if col in rule.clocks:
            raise ValueError(f"field 'fallback.clock': {col!r} is the rule's own clock; a fallback is another clock")
    if not (fallback.decided_by or "").strip():
        raise ValueError(
            "field 'fallback.decided_by': a fallback clock is the organisation's decision, not the notice's: "
            "name who decided it"
        )


class Policy(_Strict):
    version_label: str
    timezone: str = "Europe/Stockholm"
    notice: str = ""
    plan_guard: PlanGuard
    # A record quarantined on more than this many nights fails the nightly run's quality gate.
    quarantine_alarm_after: int = Field(default=7, ge=1, le=366)
    clauses: dict[str, Clause]
    protections: list[Protection] = Field(default_factory=list)
    rules: list[Rule] = Field(min_length=1)
    # Filled in by load_policy, not by the file.
    version: str = ""
    source: str = ""

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}") from None
        return v

    def rules_for(self, records: str) -> list[Rule]:
        return [r for r in self.rules if r.records == records]

    def rule(self, rule_id: str) -> Rule:
        for r in self.rules:
            if r.id == rule_id:
                return r
        raise KeyError(rule_id)


def _where(loc: tuple, raw: Any) -> str:
    """'rule 'lead' (rules[3]), field 'period'' from a pydantic error location."""
    parts = list(loc)
    if len(parts) >= 2 and parts[0] == "rules" and isinstance(parts[1], int):
        idx = parts[1]
        rule_id = None
        try:
            rule_id = raw["rules"][idx].get("id")
        except (KeyError, IndexError, TypeError, AttributeError):
            pass
        rest = ".".join(str(p) for p in parts[2:])
        who = f"rule {rule_id!r} (rules[{idx}])" if rule_id else f"rules[{idx}]"
        return f"{who}, field {rest!r}" if rest else who  # rule-level messages name their field
    if parts and parts[0] == "protections" and len(parts) >= 2:
        return f"protections[{parts[1]}], field {'.'.join(str(p) for p in parts[2:]) or '(entry)'!r}"
    return f"field {'.'.join(str(p) for p in parts) or '(top level)'!r}"


def parse_policy(text: str | bytes, source: str = "<string>") -> Policy:
    data = text.encode() if isinstance(text, str) else text
    try:
        raw = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        # One line: the position and the problem, not PyYAML's multi-line excerpt of the file.
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise PolicyError(f"{source}: not valid YAML{at}: {problem}") from None
    if not isinstance(raw, dict):
        raise PolicyError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        policy = Policy.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {_where(err['loc'], raw)}: {msg}")
        raise PolicyError("\n".join(lines)) from None
    problems = _cross_checks(policy, raw)
    if problems:
        raise PolicyError("\n".join(f"{source}: {p}" for p in problems))
    version = hashlib.sha256(data).hexdigest()[:16]
    return policy.model_copy(update={"version": version, "source": source})


def _show(value: Any) -> str:
    """A policy value as the file would write it: true/false bare, text quoted."""
    return ("true" if value else "false") if isinstance(value, bool) else repr(value)


def _plain(values) -> str:
    return ", ".join(("true" if v else "false") if isinstance(v, bool) else str(v) for v in values)


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same type: YAML's ``1`` is not a flag's ``true``, ``'false'`` is not ``false``."""
    return type(a) is type(b) and a == b


def _unknown_values(values: list, records: str, column: str) -> list[str]:
    """Why each of ``values`` can match no record of ``records`` (empty when all can)."""
    known = known_values(records, column)
    if known is None:
        return []
    out = []
    for value in values:
        if any(_same(value, k) for k in known):
            continue
        why = f"{_show(value)} is not a known value of {records}.{column} (known: {_plain(known)})"
        close = difflib.get_close_matches(str(value).lower(), [_plain([k]) for k in known], n=1, cutoff=0.75)
        if close:
            why += f"; did you mean {_show(next(k for k in known if _plain([k]) == close[0]))}?"
        out.append(why)
    return out


def _missing_protections(policy: Policy) -> list[str]:
    """Every protection the code enforces must be in the policy: same records and column, at least those values."""
    problems = []
    for rt in RECORD_TYPES.values():
        for column, values in rt.protected.items():
            listed = [v for p in policy.protections if p.records == rt.name and p.column == column for v in p.in_]
            missing = [v for v in values if not any(_same(v, x) for x in listed)]
            if not missing:
                continue
            enforced = f"the code protects {rt.name}.{column} in [{_plain(values)}]"
            if not listed:
                problems.append(
                    f"field 'protections': {enforced}, but no entry of 'protections' lists it: add "
                    f"{{records: {rt.name}, column: {column}, in: [{_plain(values)}], clause: ..., reason: ...}}"
                )
            else:
                problems.append(
                    f"field 'protections': {enforced}, but 'protections' lists only [{_plain(listed)}]: add {_plain(missing)}"
                )
    return problems


def _lifted_too_far(policy: Policy) -> list[str]:
    """A policy's ``unless`` may lift a protection the code enforces only where the code lifts
    it too (the record schema's ``unprotected_when``): an exception for more records drops the
    protection for them."""
    problems = []
    for i, prot in enumerate(policy.protections):
        rt = RECORD_TYPES.get(prot.records)
        if rt is None or prot.column not in rt.protected or not prot.unless:
            continue
        code = rt.unprotected_when
        wider = {
            col: [v for v in vals if not any(_same(v, x) for x in code.get(col, ()))] for col, vals in prot.unless.items()
        }
        wider = {col: vals for col, vals in wider.items() if vals}
        if wider:
            allowed = ", ".join(f"{c}: [{_plain(v)}]" for c, v in code.items()) or "none"
            shown = ", ".join(f"{c}: [{_plain(v)}]" for c, v in wider.items())
            problems.append(
                f"protections[{i}], field 'unless': lifts the protection of {rt.name}.{prot.column} the code enforces "
                f"for {{{shown}}}; the code lifts it only for {{{allowed}}}"
            )
    return problems


def _cross_checks(policy: Policy, raw: dict) -> list[str]:
    problems = []
    seen: set[str] = set()
    for i, rule in enumerate(policy.rules):
        where = f"rule {rule.id!r} (rules[{i}])"
        if rule.id in seen:
            problems.append(f"{where}, field 'id': duplicate rule id")
        seen.add(rule.id)
        for part in (p.strip() for p in rule.clause.split(",")):
            if part not in policy.clauses:
                problems.append(f"{where}, field 'clause': clause {part!r} is not defined under 'clauses'")
        for column, values in rule.when.items():
            if not values:
                problems.append(f"{where}, field 'when.{column}': an empty list matches no record")
            problems.extend(f"{where}, field 'when.{column}': {why}" for why in _unknown_values(values, rule.records, column))
    for i, prot in enumerate(policy.protections):
        rt = RECORD_TYPES.get(prot.records)
        if rt is None:
            problems.append(f"protections[{i}], field 'records': unknown record type {prot.records!r}")
        elif prot.column not in rt.columns:
            problems.append(f"protections[{i}], field 'column': {prot.column!r} is not a column of {prot.records}")
        else:
            problems.extend(f"protections[{i}], field 'in': {why}" for why in _unknown_values(prot.in_, prot.records, prot.column))
            for column, values in prot.unless.items():
                if column not in rt.columns:
                    problems.append(f"protections[{i}], field 'unless.{column}': {column!r} is not a column of {prot.records}")
                elif not values:
                    problems.append(f"protections[{i}], field 'unless.{column}': an empty list matches no record")
                else:
                    problems.extend(
                        f"protections[{i}], field 'unless.{column}': {why}" for why in _unknown_values(values, prot.records, column)
                    )
        for part in (p.strip() for p in prot.clause.split(",")):
            if part not in policy.clauses:
                problems.append(f"protections[{i}], field 'clause': clause {part!r} is not defined under 'clauses'")
    problems.extend(_missing_protections(policy))
    problems.extend(_lifted_too_far(policy))
    return problems


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy file: {exc.strerror}") from None
    return parse_policy(data, source=str(path))
