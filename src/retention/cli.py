"""The ``retention`` command (also ``python -m retention.cli``): everything an operator does by hand.

    policy validate [FILE]        check a policy file; exit 2 with file/rule/field on error
    hold add --record-type T --record-id ID --reason TEXT [--expires YYYY-MM-DD] [--allow-missing]
                                  put one record on the manual legal-hold list (stored by pseudonym);
                                  the id is checked (042 is 42, an address is its subscriber hash)
                                  and the record must exist in its system
    hold list [--all]             the manual holds in force (id, pseudonym, expiry, reason); --all
                                  adds the lifted ones, with when and why
    hold remove --hold-id N --reason TEXT
                                  lift a manual hold (by its id in hold list); the reason is recorded
    crm init                      create the reference CRM schema where missing (retention_crm)
    pools                         create the providers' Airflow pools (retention_mailchimp,
                                  retention_zendesk) or set them back to their slots; after
                                  `airflow db migrate`; running it again changes nothing
    explain --record-type T (--record-id ID | --record-key KEY) [--as-of ISO]
                                  why one record is or is not planned (reads the system through
                                  its Airflow Connection; erases nothing)
    preview (--old SPEC | --old-rev REV) [--new SPEC] [--systems ...] [--as-of ISO] [--show-keys N]
                                  what a policy change would erase that today's does not, and what
                                  it would stop erasing (reads the systems; erases nothing)
    replay [--systems ...] [--dry-run] [--run-id ID]
                                  after a restore from backup: erase again what the ledger marks
                                  erased and the restore brought back

A user error (a bad policy, a missing setting, an unknown record type, a malformed time) is one
line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import sys
import tempfile
import types

import pandas as pd

from retention import config
from retention.domain.policy import PolicyError, load_policy
from retention.domain.records import RECORD_TYPES, SYSTEMS


def _time(text: str, option: str):
    """An ISO 8601 time from the command line (UTC when it has no offset), or a user error."""
    try:
        ts = pd.Timestamp(text)
    except ValueError:
        raise config.ConfigError(f"{option} {text!r} is not an ISO 8601 time (e.g. 2026-12-01T00:00:00Z)") from None
    return (ts.tz_localize("UTC") if ts.tzinfo is None else ts).to_pydatetime()


def _policy_validate(args) -> int:
    try:
        policy = load_policy(args.file or config.policy_file())
    except PolicyError as exc:
        print(exc, file=sys.stderr)  # one line per problem, each naming file, rule and field
        return 2
    decisions = [r.id for r in policy.rules if r.period_source == "decision"]
    print(f"{policy.source}: valid, {len(policy.rules)} rules, version {policy.version} ({policy.version_label})")
    for r in policy.rules:
        opt = f", {r.period_if_opted_out} if opted out" if r.period_if_opted_out else ""
        fallback = f" (else {'/'.join(r.fallback_clocks)} [decision])" if r.fallback else ""
        print(
            f"  {r.id:<26} clause {r.clause:<10} {r.records:<24} {r.period}{opt} after {'/'.join(r.clocks)}{fallback} "
            f"[{r.period_source}]"
        )
    print(f"  organisation's decisions (not in the notice): {', '.join(decisions)}")
    fallbacks = [r.id for r in policy.rules if r.fallback]
    if fallbacks:
        print(f"  fallback clocks (the organisation's decision): {', '.join(fallbacks)}")
    print(f"  quarantine alarm after {policy.quarantine_alarm_after} nights")
    return 0


# Systems whose record ids are integers (a SQL CRM's keys, Zendesk's ids).
_INTEGER_IDS = ("crm", "ticketing")
_SUBSCRIBER_HASH = re.compile(r"[0-9a-fA-F]{32}")
_DIGITS = re.compile(r"[0-9]+")


def _hold_record_id(record_type: str, text: str, command: str = "hold add") -> str:
    """The id ``text`` names as the record's own system spells it, or a :class:`HoldError`: a
    hold stores the pseudonym of exactly this text, so ``042`` or an address in place of a
    subscriber hash would hold nothing. A newsletter member may be named in one audience,
    ``<list_id>:<hash or address>`` (kept so; :func:`_in_audience` resolves it against the
    Connection). Messages never repeat an address."""
    from retention.domain.addresses import EMAIL_PATTERN
    from retention.store.ledger import HoldError

    system = RECORD_TYPES[record_type].system
    value = text.strip()
    if system in _INTEGER_IDS:
        if not _DIGITS.fullmatch(value) or len(value.lstrip("0")) > 19 or int(value) >= 2**63:
            raise HoldError(f"{command}: a {record_type} is named by an integer id (digits only, as {system} numbers its records)")
        return str(int(value))  # 042 is record 42
    if record_type == "newsletter_member":
        audience, sep, value = value.rpartition(":") if ":" in value else ("", "", value)
        prefix = f"{audience.strip()}:" if sep else ""
        value = value.strip()
        if "@" in value:
            if not re.fullmatch(EMAIL_PATTERN, value):
                raise HoldError(f"{command}: --record-id is neither an e-mail address nor a subscriber hash")
            # Mailchimp's member id: the MD5 of the lower-cased address (the address is not stored).
            return prefix + hashlib.md5(value.lower().encode("utf-8")).hexdigest()
        if not _SUBSCRIBER_HASH.fullmatch(value):
            raise HoldError(
                f"{command}: a newsletter member is named by its subscriber hash (32 hexadecimal characters) "
                "or by its e-mail address, with several audiences as <list_id>:<hash or address>"
            )
        return prefix + value.lower()
    if not value:
        raise HoldError(f"{command}: --record-id is empty")
    return value


def _in_audience(adapter, record_type: str, record_id: str) -> str:
    """A newsletter member's record id as the adapter spells it, from ``[<list_id>:]<hash>``: with
    several audiences the audience must be named (a ``ValueError`` listing them otherwise)."""
    if record_type != "newsletter_member":
        return record_id
    audience, sep, subscriber_hash = record_id.rpartition(":")
    return adapter.audiences.named(audience if sep else None, subscriber_hash)


def _hold_reason(text: str) -> str:
    from retention.store.ledger import HoldError

    reason = (text or "").strip()
    if not reason:
        raise HoldError("hold add: a reason is required (why the record must be kept)")
    if len(reason) > 200:
        raise HoldError(f"hold add: the reason is {len(reason)} characters long; at most 200")
    return reason


def _hold_expiry(text: str | None):
    """The end of the hold: the start of that day in Europe/Stockholm, in UTC; never past."""
    import datetime as dt

    from retention.store.ledger import HoldError

    if not text:
        return None
    try:
        day = dt.date.fromisoformat(text.strip())
    except ValueError:
        raise HoldError(f"hold add: --expires {text!r} is not a date (YYYY-MM-DD)") from None
    expires = pd.Timestamp(day.isoformat(), tz="Europe/Stockholm").tz_convert("UTC").to_pydatetime()
    if expires <= dt.datetime.now(dt.UTC):
        raise HoldError(f"hold add: --expires {day.isoformat()} is in the past: an expired hold holds nothing")
    return expires


def _record_exists(record_type: str, record_id: str) -> tuple[str, bool]:
    """The record's id as its system spells it (a newsletter member's in its audience), and
    whether the system holds it now, asked through the port (``still_present``)."""
    from airflow.sdk.exceptions import AirflowNotFoundException

    from retention.store.ledger import HoldError
    from retention.systems import adapter_for

    system = RECORD_TYPES[record_type].system
    try:
        with _chatter_to_stderr():
            adapter = adapter_for(system)
            try:
                record_id = _in_audience(adapter, record_type, record_id)
                return record_id, record_id in adapter.still_present(record_type, [record_id])
            finally:
                adapter.close()
    except (config.ConfigError, AirflowNotFoundException):
        raise
    except ValueError as exc:  # a Connection that is set up wrong: its one line names the field
        raise HoldError(f"hold add: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback that may echo a URL or an address
        raise HoldError(
            f"hold add: could not ask {system} whether the record exists ({type(exc).__name__}); "
            "try again, or give --allow-missing to add the hold without asking"
        ) from None


@contextlib.contextmanager
def _chatter_to_stderr():
    """File descriptor 1 onto stderr for a while: what hooks log on the way (Airflow's loggers
    write to stdout) goes to stderr, and stdout keeps only the command's result."""
    with _fd_onto(1, 2):
        yield


@contextlib.contextmanager
def _chatter_to_stdout():
    """File descriptor 2 onto stdout for a while: a long command's progress (Airflow's own
    start-up lines among it) is its output, and stderr keeps the one line of a user error."""
    with _fd_onto(2, 1):
        yield


@contextlib.contextmanager
def _fd_onto(fd: int, target: int):
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        os.dup2(target, fd)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved, fd)
        os.close(saved)


def _checked_ledger():
    """The ledger, refusing a pseudonym key other than the one its pseudonyms were made with."""
    from retention.store.ledger import Ledger

    key = config.pseudonym_key()
    ledger = Ledger(config.ledger_url())
    ledger.check_key(config.key_fingerprint(key))
    return ledger, key


def _hold_add(args) -> int:
    from retention.domain.pseudonyms import Pseudonymizer
    from retention.store.ledger import HoldError

    if args.record_type not in RECORD_TYPES:
        print(f"unknown record type {args.record_type!r}; known: {', '.join(RECORD_TYPES)}", file=sys.stderr)
        return 2
    # The hooks' info lines ("CRM connection ...") are not the command's output; warnings stay.
    os.environ.setdefault("AIRFLOW__LOGGING__NAMESPACE_LEVELS", "airflow.task.hooks=warning")
    reason = _hold_reason(args.reason)
    expires = _hold_expiry(args.expires)
    record_id = _hold_record_id(args.record_type, args.record_id)
    ledger, key = _checked_ledger()
    system = RECORD_TYPES[args.record_type].system
    shown = "this member" if args.record_type == "newsletter_member" else record_id  # a subscriber hash stays unprinted
    record_id, exists = _record_exists(args.record_type, record_id)
    if not exists:
        if not args.allow_missing:
            raise HoldError(
                f"hold add: {args.record_type} {shown} does not exist in {system}, so a hold on it would hold nothing; "
                "check the id, or give --allow-missing for a record a restore from backup may bring back"
            )
        print(f"hold add: {args.record_type} {shown} does not exist in {system} now; held in case it comes back", file=sys.stderr)
    pseudonym = Pseudonymizer(key).key_for(args.record_type, record_id)
    ledger.add_hold(args.record_type, pseudonym, reason, expires)
    print(f"hold added: {args.record_type} {pseudonym} until {args.expires or 'further notice'}")
    return 0


def _hold_list(args) -> int:
    ledger, _ = _checked_ledger()
    for h in ledger.holds(include_lifted=args.all):
        lifted = f"  [lifted {h['lifted_at']:%Y-%m-%d %H:%M}: {h['lifted_reason']}]" if h.get("lifted_at") else ""
        print(f"{h['id']:>6}  {h['record_type']:<24} {h['record_key']} {h['expires_at'] or 'no expiry'}  {h['reason']}{lifted}")
    return 0


def _hold_remove(args) -> int:
    from retention.store.ledger import HoldError

    ledger, _ = _checked_ledger()
    try:
        h = ledger.lift_hold(args.hold_id, args.reason)
    except HoldError as exc:
        print(f"hold remove: {exc}", file=sys.stderr)
        return 2
    print(f"hold {h['id']} lifted: {h['record_type']} {h['record_key']} ({h['lifted_reason']})")
    return 0


def _explain(args) -> int:
    import json

    from retention.domain.records import RECORD_TYPES
    from retention.runs.explain import explain
    from retention.systems import adapter_for

    if args.record_type not in RECORD_TYPES:
        print(f"unknown record type {args.record_type!r}; known: {', '.join(RECORD_TYPES)}", file=sys.stderr)
        return 2
    try:
        policy = load_policy(args.policy or config.policy_file())
    except PolicyError as exc:
        print(exc, file=sys.stderr)  # one line per problem, each naming file, rule and field
        return 2
    as_of = _time(args.as_of, "--as-of") if args.as_of else None
    if args.record_id is not None and args.record_type == "newsletter_member":  # an address becomes its hash
        member_id = _hold_record_id(args.record_type, args.record_id, "explain")
    with _logs_aside() as logs:  # stdout is the JSON alone: `retention explain ... | jq` works
        adapter = adapter_for(RECORD_TYPES[args.record_type].system)
        try:
            if args.record_id is not None and args.record_type == "newsletter_member":
                try:
                    args.record_id = _in_audience(adapter, args.record_type, member_id)
                except ValueError as exc:
                    print(f"explain: {exc}", file=sys.stderr)
                    return 2
            result = explain(adapter, policy, args.record_type, record_id=args.record_id, record_key=args.record_key, as_of=as_of)
        finally:
            adapter.close()
        logs.shown = True
    print(json.dumps(result, indent=2, default=str))
    return 0


@contextlib.contextmanager
def _logs_aside():
    """What is written to stdout meanwhile is set aside: Airflow's logging writes to the stdout
    it found when it was configured (the hooks' "connection ..." lines, progress lines), so the
    file descriptor itself is redirected, not only ``sys.stdout``. The lines go to stderr when
    the caller sets ``shown``; after a user error they are dropped, which stays its one line."""
    sys.stdout.flush()
    saved = os.dup(1)
    logs = types.SimpleNamespace(shown=False)
    with tempfile.TemporaryFile() as aside:
        os.dup2(aside.fileno(), 1)
        try:
            yield logs
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            if logs.shown:
                aside.seek(0)
                sys.stderr.write(aside.read().decode(errors="replace"))
                sys.stderr.flush()


def _pools(args) -> int:
    import sqlalchemy as sa

    from retention.airflow.pools import ensure_pools

    try:
        pools = ensure_pools()
    except sa.exc.SQLAlchemyError as exc:
        # One line, and never the database URL (it may carry a password).
        print(f"cannot create the pools in Airflow's metadata database ({type(exc).__name__}): run `airflow db migrate` first, "
              "and check AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", file=sys.stderr)
        return 2
    for pool in pools:
        print(f"pool {pool.name}: {pool.slots} slots")
    return 0


def _crm_init(args) -> int:
    import sqlalchemy as sa

    from retention.systems.crm import schema
    from retention.systems.crm.hook import CrmHook

    engine = CrmHook().get_engine()
    schema.create_schema(engine)
    with engine.connect() as conn:
        contacts = conn.execute(sa.select(sa.func.count()).select_from(schema.contact)).scalar()
    print(f"CRM schema ready ({contacts} contacts)")
    return 0


def _preview(args) -> int:
    from pathlib import Path

    from retention.runs.preview import old_rev_spec, run_preview

    new_spec = args.new or str(config.policy_file())
    old_spec = args.old or old_rev_spec(args.old_rev, new_spec, args.repo)
    summary = run_preview(
        old_spec, new_spec, systems=args.systems, as_of=args.as_of, repo=args.repo, show_keys=max(0, args.show_keys),
    )
    print(Path(summary["text"]).read_text())
    print(f"\nwritten: {summary['json']}")
    return 0


def _replay(args) -> int:
    import json
    import logging
    from pathlib import Path

    from retention.runs.replay import render_report, run_replay

    # Progress is the command's output (stdout); stderr keeps the one line of a user error.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    with _chatter_to_stdout():
        result = run_replay(args.systems, dry_run=args.dry_run, run_id=args.run_id)
    print(render_report(json.loads(Path(result["report"]).read_text())))
    print(f"report: {result['report']}")
    if result.get("user_errors"):
        print(f"configuration error: {'; '.join(result['user_errors'])}", file=sys.stderr)
        return 2
    return 0 if result["state"] == "success" else 1


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean the input or the set-up is wrong: one line, no traceback."""
    from airflow.sdk.exceptions import AirflowNotFoundException  # a Connection that is not defined

    from retention.domain.addresses import InvalidRequest
    from retention.runs.preview import PreviewError
    from retention.store.ledger import HoldError

    return (config.ConfigError, PolicyError, PreviewError, InvalidRequest, HoldError, AirflowNotFoundException)


class _Parser(argparse.ArgumentParser):
    """argparse, whose refusal of the command line is one line (not the usage and then the
    error): what is wrong and where to read more. Sub-commands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def one_line(exc: BaseException) -> str:
    """A user error's message on one line: several problems joined by "; ", the prefix they
    share (a file) said once. (``policy validate`` and ``explain`` list a policy's problems one
    per line instead, each naming file, rule and field.)"""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(exc).__name__
    prefix = lines[0].split(": ", 1)[0] + ": "
    if all(line.startswith(prefix) for line in lines):
        return prefix + "; ".join(line.removeprefix(prefix) for line in lines)
    return "; ".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="retention", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    pol = sub.add_parser("policy").add_subparsers(dest="action", required=True)
    v = pol.add_parser("validate", help="validate a policy file")
    v.add_argument("file", nargs="?")
    v.set_defaults(func=_policy_validate)
    hold = sub.add_parser("hold").add_subparsers(dest="action", required=True)
    a = hold.add_parser("add", help="add a manual legal hold")
    a.add_argument("--record-type", required=True)
    a.add_argument(
        "--record-id", required=True,
        help="the record's id in its system: an integer for the CRM and Zendesk (042 is 42); for a newsletter member "
        "its subscriber hash or its e-mail address (stored as the hash, never as the address), and where the "
        "Connection names several audiences <list_id>:<hash or address>",
    )
    a.add_argument("--reason", required=True, help="why the record must be kept (not empty, at most 200 characters)")
    a.add_argument("--expires", help="date (YYYY-MM-DD, Europe/Stockholm, not past) the hold ends; none = until lifted")
    a.add_argument(
        "--allow-missing", action="store_true",
        help="add the hold although the record is not in its system now: for a record a restore from backup may "
        "bring back (a replay would erase it again)",
    )
    a.set_defaults(func=_hold_add)
    lst = hold.add_parser("list", help="list manual holds")
    lst.add_argument("--all", action="store_true", help="lifted holds too")
    lst.set_defaults(func=_hold_list)
    rm = hold.add_parser("remove", help="lift a manual legal hold, recording why")
    rm.add_argument("--hold-id", type=int, required=True, help="the hold's id (hold list)")
    rm.add_argument("--reason", required=True, help="why the hold ends (recorded in the ledger)")
    rm.set_defaults(func=_hold_remove)
    crm = sub.add_parser("crm").add_subparsers(dest="action", required=True)
    ci = crm.add_parser("init", help="create the reference CRM schema where missing")
    ci.set_defaults(func=_crm_init)
    sub.add_parser("pools", help="create the providers' Airflow pools (idempotent)").set_defaults(func=_pools)
    ex = sub.add_parser("explain", help="why one record is or is not planned")
    ex.add_argument("--record-type", required=True)
    who = ex.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--record-id", help="the record's id in its system (a newsletter member: as for hold add, [<list_id>:]<hash or address>)"
    )
    who.add_argument("--record-key", help="the pseudonymous key from the ledger or a report")
    ex.add_argument("--as-of", help="ISO 8601 time to evaluate at (default: now)")
    ex.add_argument("--policy", help="policy file (default: the configured one)")
    ex.set_defaults(func=_explain)
    systems = SYSTEMS
    pv = sub.add_parser("preview", help="what a policy change would erase, and stop erasing (erases nothing)")
    old = pv.add_mutually_exclusive_group(required=True)
    old.add_argument("--old", help="the current policy: a file, or REV:PATH (git)")
    old.add_argument("--old-rev", metavar="REV", help="the new policy's file (or the project's policy) as of git revision REV")
    pv.add_argument("--new", help="the proposed policy: a file, or REV:PATH (default: the configured policy file)")
    pv.add_argument("--systems", nargs="+", choices=systems, default=list(systems))
    pv.add_argument("--as-of", help="ISO 8601 time both policies are evaluated at (default: now; UTC if no offset)")
    pv.add_argument("--repo", help="git repository for REV:PATH (default: RETENTION_POLICY_REPO, else the project)")
    pv.add_argument("--show-keys", type=int, default=0, metavar="N", help="print up to N pseudonymous keys per row")
    pv.set_defaults(func=_preview)
    rp = sub.add_parser("replay", help="erase again what a restored backup brought back")
    rp.add_argument("--systems", nargs="+", choices=systems, default=list(systems), help="systems to replay (default: all)")
    rp.add_argument("--dry-run", action="store_true", help="find and count, erase nothing, write no ledger entry")
    rp.add_argument("--run-id", help="resume this replay run (default: a new replay__<time>)")
    rp.set_defaults(func=_replay)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (`retention policy validate | head -1`): not an error of ours.
        # Point stdout at nothing, so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except _user_errors() as exc:
        prefix = "configuration error: " if isinstance(exc, config.ConfigError) else ""
        print(f"{prefix}{one_line(exc)}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
