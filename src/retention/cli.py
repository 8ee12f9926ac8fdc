"""Command line: ``python -m retention.cli <command>`` (with ``plugins`` on PYTHONPATH).

    policy validate [FILE]        check a policy file; exit 2 with file/rule/field on error
    hold add --record-type T --record-id ID --reason TEXT [--expires YYYY-MM-DD]
                                  put one record on the manual legal-hold list (stored by pseudonym)
    hold list                     the manual holds (pseudonyms, reasons, expiry)
    crm init [--demo-contacts N]  create the reference CRM schema where missing (retention_crm), and
                                  seed N synthetic contacts into an empty CRM (demo / compose)
    explain --record-type T (--record-id ID | --record-key KEY) [--as-of ISO]
                                  why one record is or is not planned (reads the system through
                                  its Airflow Connection; erases nothing)
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC

import pandas as pd

from retention import config
from retention.domain.policy import PolicyError, load_policy
from retention.domain.records import RECORD_TYPES


def _policy_validate(args) -> int:
    try:
        policy = load_policy(args.file or config.policy_file())
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    decisions = [r.id for r in policy.rules if r.period_source == "decision"]
    print(f"{policy.source}: valid, {len(policy.rules)} rules, version {policy.version} ({policy.version_label})")
    for r in policy.rules:
        opt = f", {r.period_if_opted_out} if opted out" if r.period_if_opted_out else ""
        print(f"  {r.id:<26} clause {r.clause:<10} {r.records:<24} {r.period}{opt} after {'/'.join(r.clocks)} [{r.period_source}]")
    print(f"  organisation's decisions (not in the notice): {', '.join(decisions)}")
    return 0


def _hold_add(args) -> int:
    from retention.store.ledger import Ledger
    from retention.domain.pseudonyms import Pseudonymizer

    if args.record_type not in RECORD_TYPES:
        print(f"unknown record type {args.record_type!r}; known: {', '.join(RECORD_TYPES)}", file=sys.stderr)
        return 2
    expires = pd.Timestamp(args.expires, tz="Europe/Stockholm").tz_convert("UTC").to_pydatetime() if args.expires else None
    key = Pseudonymizer(config.pseudonym_key()).key_for(args.record_type, args.record_id)
    Ledger(config.ledger_url()).add_hold(args.record_type, key, args.reason, expires)
    print(f"hold added: {args.record_type} {key} until {args.expires or 'further notice'}")
    return 0


def _hold_list(args) -> int:
    from retention.store.ledger import Ledger

    for h in Ledger(config.ledger_url()).holds():
        print(f"{h['record_type']:<24} {h['record_key']} {h['expires_at'] or 'no expiry'}  {h['reason']}")
    return 0


def _explain(args) -> int:
    import json

    from retention.runs.explain import explain
    from retention.domain.records import RECORD_TYPES
    from retention.systems import build_adapter

    if args.record_type not in RECORD_TYPES:
        print(f"unknown record type {args.record_type!r}; known: {', '.join(RECORD_TYPES)}", file=sys.stderr)
        return 2
    try:
        policy = load_policy(args.policy or config.policy_file())
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    adapter = build_adapter(RECORD_TYPES[args.record_type].system)
    try:
        as_of = pd.Timestamp(args.as_of).to_pydatetime() if args.as_of else None
        result = explain(adapter, policy, args.record_type, record_id=args.record_id, record_key=args.record_key, as_of=as_of)
    finally:
        adapter.close()
    print(json.dumps(result, indent=2, default=str))
    return 0


def _crm_init(args) -> int:
    from datetime import datetime

    import sqlalchemy as sa

    from retention.systems.crm import schema
    from tools.synthetic.crm import generate
    from retention.systems.crm.hook import CrmHook

    engine = CrmHook().get_engine()
    schema.create_schema(engine)
    with engine.connect() as conn:
        contacts = conn.execute(sa.select(sa.func.count()).select_from(schema.contact)).scalar()
    print(f"CRM schema ready ({contacts} contacts)")
    if args.demo_contacts and not contacts:
        counts = generate(engine, contacts=args.demo_contacts, seed=args.seed, now=datetime.now(UTC))
        print(f"seeded synthetic CRM: {counts}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retention", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    pol = sub.add_parser("policy").add_subparsers(dest="action", required=True)
    v = pol.add_parser("validate", help="validate a policy file")
    v.add_argument("file", nargs="?")
    v.set_defaults(func=_policy_validate)
    hold = sub.add_parser("hold").add_subparsers(dest="action", required=True)
    a = hold.add_parser("add", help="add a manual legal hold")
    a.add_argument("--record-type", required=True)
    a.add_argument("--record-id", required=True)
    a.add_argument("--reason", required=True)
    a.add_argument("--expires", help="date (Europe/Stockholm) the hold ends; none = until lifted")
    a.set_defaults(func=_hold_add)
    lst = hold.add_parser("list", help="list manual holds")
    lst.set_defaults(func=_hold_list)
    crm = sub.add_parser("crm").add_subparsers(dest="action", required=True)
    ci = crm.add_parser("init", help="create the CRM schema where missing; optionally seed demo data")
    ci.add_argument("--demo-contacts", type=int, default=0)
    ci.add_argument("--seed", type=int, default=42)
    ci.set_defaults(func=_crm_init)
    ex = sub.add_parser("explain", help="why one record is or is not planned")
    ex.add_argument("--record-type", required=True)
    who = ex.add_mutually_exclusive_group(required=True)
    who.add_argument("--record-id", help="the record's id in its system")
    who.add_argument("--record-key", help="the pseudonymous key from the ledger or a report")
    ex.add_argument("--as-of", help="ISO 8601 time to evaluate at (default: now)")
    ex.add_argument("--policy", help="policy file (default: the configured one)")
    ex.set_defaults(func=_explain)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except config.ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
