"""Table/column mapping between the connector's logical CRM model and a real database.

The logical model is the reference schema (``retention.systems.crm.schema``). An existing CRM whose
tables or columns are named differently is connected by editing ``include/crm_mapping.yaml``,
never the code::

    version: 1
    schema: null            # optional database schema (namespace) for every table
    tables:
      contact:              # logical table (fixed vocabulary)
        table: person       # physical table name
        schema: crm         # optional, overrides the top-level schema for this table
        columns:
          email: e_mail     # logical column: physical column
          workplace: null   # optional columns the connector never reads may be absent

Everything omitted keeps its reference name, so an empty file is the identity mapping.
Unknown logical tables or columns, a required column mapped to ``null`` and (when checked
against an engine) a physical table or column that does not exist are reported with the file,
the logical table and the column.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml

from retention.config import SettingError
from retention.systems.crm import schema as reference

#: Logical tables and their logical columns, in reference-schema order.
LOGICAL: dict[str, tuple[str, ...]] = {
    t.name: tuple(c.name for c in t.columns) for t in reference.metadata.tables.values()
}

#: Columns the connector reads or writes; all others may be mapped to ``null`` (absent).
REQUIRED: dict[str, frozenset[str]] = {
    "organisation": frozenset(),
    "membership": frozenset({"organisation_id", "ends_on"}),
    "contact": frozenset(
        {"id", "organisation_id", "kind", "email", "last_interaction_at", "opted_out", "created_at"}
    ),
    "communication_note": frozenset({"contact_id"}),
    "event_participation": frozenset({"id", "contact_id", "event_date"}),
    "course_registration": frozenset({"id", "contact_id", "course_end"}),
    "survey_response": frozenset({"id", "contact_id", "survey_closed_at"}),
    "invoice": frozenset({"id", "contact_id", "financial_year_end"}),
    "legal_hold": frozenset({"record_type", "record_id", "reason", "expires_at"}),
}


class MappingError(SettingError):
    """The mapping file is invalid or does not match the database (a user error, and a
    ``ValueError``)."""


class _Columns:
    """Attribute/item access to a mapped table's columns by *logical* name."""

    def __init__(self, table: sa.sql.expression.FromClause, columns: Mapping[str, str | None]):
        self._table = table
        self._columns = columns

    def __getitem__(self, logical: str) -> sa.ColumnElement:
        physical = self._columns.get(logical)
        if physical is None:
            raise KeyError(f"logical column {logical!r} is not mapped")
        return self._table.c[physical]

    def __getattr__(self, logical: str) -> sa.ColumnElement:
        try:
            return self[logical]
        except KeyError as exc:
            raise AttributeError(str(exc)) from None


@dataclass(frozen=True)
class MappedTable:
    """One logical table bound to its physical table (a lightweight ``sqlalchemy.table()``)."""

    logical: str
    name: str
    schema: str | None
    columns: Mapping[str, str | None]
    table: Any = field(compare=False)

    @classmethod
    def build(cls, logical: str, name: str, schema: str | None, columns: Mapping[str, str | None]):
        tc = sa.table(name, *(sa.column(p) for p in columns.values() if p is not None), schema=schema)
        return cls(logical, name, schema, dict(columns), tc)

    @property
    def c(self) -> _Columns:
        return _Columns(self.table, self.columns)

    def alias(self, name: str) -> _Aliased:
        return _Aliased(self, self.table.alias(name))

    def through(self, from_clause: Any) -> _Aliased:
        """The logical columns read through ``from_clause``: a subquery of this table that keeps
        the physical names of the columns it selects."""
        return _Aliased(self, from_clause)


@dataclass(frozen=True)
class _Aliased:
    mapped: MappedTable
    table: Any

    @property
    def c(self) -> _Columns:
        return _Columns(self.table, self.mapped.columns)


class CrmMapping:
    """Logical → physical names for every CRM table the connector touches."""

    def __init__(self, tables: Mapping[str, MappedTable], source: str = "<default mapping>"):
        self.tables = dict(tables)
        self.source = source

    # -- construction -------------------------------------------------------------------
    @classmethod
    def default(cls) -> CrmMapping:
        """The identity mapping onto the reference schema."""
        return cls.from_dict({}, source="<default mapping>")

    @classmethod
    def load(cls, path: str | Path, engine: sa.Engine | None = None) -> CrmMapping:
        """Read and validate a YAML mapping; with ``engine`` also check it against the database."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise MappingError(f"{path}: cannot read mapping file ({exc.strerror})") from exc
        except yaml.YAMLError as exc:
            raise MappingError(f"{path}: not valid YAML ({exc})") from exc
        mapping = cls.from_dict(data or {}, source=str(path))
        if engine is not None:
            mapping.check(engine)
        return mapping

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> CrmMapping:
        if not isinstance(data, Mapping):
            raise MappingError(f"{source}: top level must be a mapping")
        unknown = set(data) - {"version", "schema", "tables"}
        if unknown:
            raise MappingError(f"{source}: unknown top-level key(s) {sorted(unknown)}")
        if data.get("version", 1) != 1:
            raise MappingError(f"{source}: unsupported mapping version {data.get('version')!r}")
        default_schema = _opt_name(data.get("schema"), f"{source}: schema")
        given = data.get("tables") or {}
        if not isinstance(given, Mapping):
            raise MappingError(f"{source}: 'tables' must be a mapping of logical table names")
        for logical in given:
            if logical not in LOGICAL:
                raise MappingError(
                    f"{source}: table {logical!r}: unknown logical table "
                    f"(known: {', '.join(LOGICAL)})"
                )
        tables: dict[str, MappedTable] = {}
        for logical, logical_columns in LOGICAL.items():
            spec = given.get(logical) or {}
            where = f"{source}: table {logical!r}"
            if not isinstance(spec, Mapping):
                raise MappingError(f"{where}: must be a mapping with 'table' and/or 'columns'")
            bad = set(spec) - {"table", "schema", "columns"}
            if bad:
                raise MappingError(f"{where}: unknown key(s) {sorted(bad)}")
            name = _opt_name(spec.get("table", logical), f"{where}: table name")
            if name is None:
                raise MappingError(f"{where}: physical table name must not be empty")
            tschema = _opt_name(spec.get("schema", default_schema), f"{where}: schema")
            cols_given = spec.get("columns") or {}
            if not isinstance(cols_given, Mapping):
                raise MappingError(f"{where}: 'columns' must be a mapping")
            columns: dict[str, str | None] = {}
            for col in cols_given:
                if col not in logical_columns:
                    raise MappingError(
                        f"{where}: column {col!r}: unknown logical column "
                        f"(known: {', '.join(logical_columns)})"
                    )
            for col in logical_columns:
                physical = _opt_name(cols_given.get(col, col), f"{where}: column {col!r}")
                if physical is None and col in REQUIRED[logical]:
                    raise MappingError(
                        f"{where}: column {col!r}: required by the connector, cannot be null"
                    )
                columns[col] = physical
            seen: dict[str, str] = {}
            for col, physical in columns.items():
                if physical is not None and physical in seen:
                    raise MappingError(
                        f"{where}: column {col!r}: physical column {physical!r} is already "
                        f"used for {seen[physical]!r}"
                    )
                if physical is not None:
                    seen[physical] = col
            tables[logical] = MappedTable.build(logical, name, tschema, columns)
        return cls(tables, source=source)

    # -- use ------------------------------------------------------------------------------
    def __getitem__(self, logical: str) -> MappedTable:
        return self.tables[logical]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "tables": {
                lt: {"table": t.name, "schema": t.schema, "columns": copy.deepcopy(dict(t.columns))}
                for lt, t in self.tables.items()
            },
        }

    def check(self, engine: sa.Engine) -> None:
        """Raise ``MappingError`` unless every mapped table and column exists in ``engine``."""
        inspector = sa.inspect(engine)
        for logical, mt in self.tables.items():
            wanted = {lc: pc for lc, pc in mt.columns.items() if pc is not None}
            if not wanted:
                continue
            where = f"{self.source}: table {logical!r} (physical {mt.name!r})"
            try:
                present = {c["name"] for c in inspector.get_columns(mt.name, schema=mt.schema)}
            except sa.exc.NoSuchTableError:
                present = None
            if not present:
                raise MappingError(f"{where}: physical table does not exist in the database")
            for lc, pc in wanted.items():
                if pc not in present:
                    raise MappingError(
                        f"{where}: column {lc!r}: physical column {pc!r} does not exist "
                        f"in the database"
                    )


def _opt_name(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise MappingError(f"{where}: expected a non-empty name or null, got {value!r}")
    return value
