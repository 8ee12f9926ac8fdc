"""The nightly benchmark's systems: each one's set-up, limits, change and request counting,
and the step processes' adapters (``prepare``). See ``nightly_benchmark``."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import time
from pathlib import Path

import numpy as np
import requests
from harness import Bench, Hooks

SYSTEMS = ("crm", "newsletter", "ticketing")
# The DAG runs index beside plan, validate and erase; here, as the steps run one after another, after extract.
STEPS = ("extract", "index", "plan", "validate", "erase", "verify")
DAG_ID = "bench_nightly"
MC_KEY = "standin-key-us0"
MC_LIST = "bench-list"
ZD_EMAIL = "agent@example.org"
ZD_TOKEN = "bench-token"
CRM_DB = "retention_bench_nightly_crm"
# Zendesk's documented limits (the stand-in's defaults too), and its exports' lag: they leave
# out what changed in the last minute (the stand-in's default lag is 0, so it is passed).
ZD_REAL = {"requests": 700, "incremental": 10, "user_deletes": 700, "deleted_list": 10, "export_lag": 60}
QUIET = ("retention.systems.ticketing.client", "retention.systems.crm.client", "retention.systems.newsletter.client")


# ---------------------------------------------------------------------- the step process
def prepare(step: str, env: dict) -> Hooks:
    """The adapter of ``BENCH_SYSTEM``, built as the pipeline's hooks build it; for the CRM,
    the statements sent on its engine."""
    if step not in ("extract", "erase", "verify"):
        return Hooks()
    system = env["BENCH_SYSTEM"]
    if system == "newsletter":
        from retention.systems.newsletter.adapter import NewsletterAdapter
        from retention.systems.newsletter.client import MailchimpClient

        return Hooks(adapter=NewsletterAdapter(MailchimpClient(MC_KEY, base_url=env["BENCH_BASE_URL"] + "/3.0"), MC_LIST))
    if system == "ticketing":
        from retention.systems.ticketing.adapter import TicketingAdapter
        from retention.systems.ticketing.client import ZendeskClient

        client = ZendeskClient(
            base_url=env["BENCH_BASE_URL"], email=ZD_EMAIL, api_token=ZD_TOKEN,
            requests_per_minute=int(env["BENCH_ZD_REQUESTS"]), incremental_per_minute=int(env["BENCH_ZD_INCREMENTAL"]),
            user_deletes_per_10min=int(env["BENCH_ZD_USER_DELETES"]), deleted_list_per_minute=int(env["BENCH_ZD_DELETED_LIST"]),
        )
        return Hooks(adapter=TicketingAdapter(client), after=lambda start, end: {"client": client.stats()})
    import sqlalchemy as sa

    from retention.systems.crm.adapter import CrmAdapter
    from retention.systems.crm.client import CrmConnector

    engine = sa.create_engine(env["BENCH_CRM_URL"])
    statements = [0]

    @sa.event.listens_for(engine, "before_cursor_execute")
    def count(conn, cursor, statement, parameters, context, executemany):
        statements[0] += 1

    return Hooks(adapter=CrmAdapter(CrmConnector(engine)), after=lambda start, end: {"statements": statements[0]})


# ---------------------------------------------------------------------- the systems
class Standin:
    """A stand-in's process over a state file, started with some limits, stopped (saving its
    state) to be changed or restarted with others."""

    def __init__(self, bench: Bench, module: str, state: Path, base_args: list[str]):
        self.bench, self.module, self.state, self.base_args = bench, module, state, base_args
        self.proc = None

    def start(self, args: list[str], what: str) -> str:
        self.proc = self.bench.standin(self.module, "--port", "0", "--state-file", str(self.state), *self.base_args, *args, what=what)
        return self.proc.base_url

    def stop(self) -> None:
        if self.proc is not None:
            t = time.perf_counter()
            self.proc.stop(timeout=600)
            self.bench.standins.remove(self.proc)
            self.proc = None
            print(f"  {self.module} stand-in stopped, state saved ({time.perf_counter() - t:.1f}s)", flush=True)

    def stats(self) -> dict:
        return requests.get(f"{self.proc.base_url}/_standin/stats", timeout=60).json()


class System:
    """One system's set-up, limits, change and request counting; subclasses per system."""

    name = ""
    unit = "requests"

    def __init__(self, bench: Bench, args: argparse.Namespace):
        self.bench, self.args = bench, args
        self.bench.env["BENCH_SYSTEM"] = self.name

    def setup(self) -> None: ...
    def start(self, real: bool) -> None: ...
    def stop(self) -> None: ...
    def change(self, n: int, rng: np.random.Generator) -> dict: ...
    def counter(self) -> dict: ...
    def limits(self, real: bool) -> str: ...

    def export_lag(self, real: bool) -> int:
        """Seconds a change stays out of the system's change feed (0: none)."""
        return 0

    def step_requests(self, out: dict, before: dict, after: dict) -> int:
        return after["requests"] - before["requests"]


class Newsletter(System):
    name = "newsletter"

    def setup(self) -> None:
        a = self.args
        self.si = Standin(self.bench, "mailchimp", self.bench.work / "mailchimp.npz",
                          ["--list-id", MC_LIST, "--api-key", MC_KEY, "--members", str(a.records), "--seed", str(a.seed),
                           "--erase-share", str(a.due_share)])

    def start(self, real: bool) -> None:
        self.bench.env["BENCH_BASE_URL"] = self.si.start([], f"{self.args.records:,} members, 10 connections")

    def stop(self) -> None:
        self.si.stop()

    def limits(self, real: bool) -> str:
        return "10 connections (Mailchimp's limit; the same in both nights)"

    def counter(self) -> dict:
        s = self.si.stats()
        return {"requests": s["requests"], "by_kind": s.get("requests_by_kind", {})}

    def change(self, n: int, rng: np.random.Generator) -> dict:
        """Status changes (subscribed -> unsubscribed or cleaned, last_changed now), new
        members (subscribed now) and a few permanent deletions made in Mailchimp's own UI."""
        from retention_dev.standins.mailchimp_audience import Audience
        from retention_dev.standins.mailchimp_data import STATUS_CODE, MemberColumns, generate_columns

        aud = Audience.load(self.si.state, MC_LIST)
        cols = aud.cols.as_dict()
        now = int(time.time()) - 1
        n_status, n_new = int(n * 0.5), int(n * 0.4)
        n_gone = n - n_status - n_new
        subscribed = np.flatnonzero(cols["status"] == STATUS_CODE["subscribed"])
        picked = rng.choice(subscribed, n_status + n_gone, replace=False)
        changed, gone = picked[:n_status], picked[n_status:]
        cols["status"][changed] = np.where(
            rng.random(len(changed)) < 0.8, STATUS_CODE["unsubscribed"], STATUS_CODE["cleaned"]
        ).astype(cols["status"].dtype)
        cols["last_changed"][changed] = now
        keep = np.ones(len(cols["ids"]), dtype=bool)
        keep[gone] = False
        deleted = set(aud.deleted) | {bytes(x) for x in cols["ids"][gone]}
        fresh = generate_columns(n_new * 2, seed=self.args.seed + 1000, now=dt.datetime.now(dt.UTC), erase_share=0.0).as_dict()
        new = np.flatnonzero(~np.isin(fresh["ids"], cols["ids"]) & (fresh["status"] == STATUS_CODE["subscribed"]))[:n_new]
        fresh["timestamp_signup"][new] = now
        fresh["timestamp_opt"][new] = now
        fresh["last_changed"][new] = now
        merged = {}
        for k, v in cols.items():
            extra = fresh[k][new]
            width = max(v.dtype.itemsize, extra.dtype.itemsize) if v.dtype.kind == "S" else None
            dtype = np.dtype(f"S{width}") if width else v.dtype
            merged[k] = np.concatenate([v[keep].astype(dtype), extra.astype(dtype)])
        Audience(MemberColumns(**merged), MC_LIST, deleted).save(self.si.state)
        return {"status changed": len(changed), "new": len(new), "deleted": len(gone)}


class Ticketing(System):
    name = "ticketing"

    def setup(self) -> None:
        a = self.args
        self.si = Standin(self.bench, "zendesk", self.bench.work / "zendesk.npz",
                          ["--tickets", str(a.records), "--seed", str(a.seed), "--due-share", str(a.due_share), "--token", ZD_TOKEN])

    def _limits(self, real: bool) -> dict:
        if real:
            return dict(ZD_REAL, requests=self.args.requests_per_minute)
        lim = self.args.setup_limit
        return {"requests": lim, "incremental": lim, "user_deletes": lim, "deleted_list": lim, "export_lag": 0}

    def export_lag(self, real: bool) -> int:
        return self._limits(real)["export_lag"]

    def limits(self, real: bool) -> str:
        lim = self._limits(real)
        return (
            f"{'REAL' if real else 'RELAXED (set-up only)'} limits: {lim['requests']} requests/min, incremental export "
            f"{lim['incremental']}/min, permanent user deletions {lim['user_deletes']}/10 min, deleted tickets listing "
            f"{lim['deleted_list']}/min, exports leave out the last {lim['export_lag']} s"
        )

    def start(self, real: bool) -> None:
        lim = self._limits(real)
        self.bench.env.update(
            BENCH_ZD_REQUESTS=str(lim["requests"]), BENCH_ZD_INCREMENTAL=str(lim["incremental"]),
            BENCH_ZD_USER_DELETES=str(lim["user_deletes"]), BENCH_ZD_DELETED_LIST=str(lim["deleted_list"]),
        )
        self.bench.env["BENCH_BASE_URL"] = self.si.start(
            ["--requests-per-minute", str(lim["requests"]), "--incremental-per-minute", str(lim["incremental"]),
             "--user-deletes-per-10min", str(lim["user_deletes"]), "--deleted-list-per-minute", str(lim["deleted_list"]),
             "--export-lag-seconds", str(lim["export_lag"])],
            self.limits(real),
        )

    def stop(self) -> None:
        self.si.stop()

    def counter(self) -> dict:
        s = self.si.stats()
        return {"requests": s["requests"], "by_kind": s.get("requests_by_endpoint", {})}

    def change(self, n: int, rng: np.random.Generator) -> dict:
        """Status changes (open tickets solved, closed ones reopened), new tickets by existing
        requesters and a few tickets deleted by an agent (soft deletion); ``updated_at`` now."""
        from retention_dev.standins import zendesk_data as zd
        from retention_dev.standins.zendesk_common import DELETED

        path = self.si.state
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name].copy() for name in data.files}
        now = int(time.time()) - 1
        st = arrays["t_status"]
        n_status, n_new = int(n * 0.5), int(n * 0.4)
        n_gone = n - n_status - n_new
        live = np.flatnonzero(st < DELETED)
        picked = rng.choice(live, n_status + n_gone, replace=False)
        changed, gone = picked[:n_status], picked[n_status:]
        open_ = np.isin(st[changed], zd.OPEN_CODES)
        arrays["t_prev"][changed] = st[changed]
        st[changed[open_]] = zd.STATUS_CODE["solved"]
        arrays["t_solved"][changed[open_]] = now
        st[changed[~open_]] = zd.STATUS_CODE["open"]
        arrays["t_solved"][changed[~open_]] = zd.NO_TIME
        arrays["t_prev"][gone] = st[gone]
        st[gone] = DELETED
        arrays["t_deleted_at"][gone] = now
        arrays["t_updated"][picked] = now
        requesters = rng.choice(np.unique(arrays["t_requester"][6:]), n_new)
        new = {
            "t_status": np.full(n_new, zd.STATUS_CODE["open"], dtype=st.dtype),
            "t_prev": np.full(n_new, zd.STATUS_CODE["open"], dtype=st.dtype),
            "t_requester": requesters.astype(np.int64),
            "t_created": np.full(n_new, now, dtype=np.int64),
            "t_updated": np.full(n_new, now, dtype=np.int64),
            "t_solved": np.full(n_new, zd.NO_TIME, dtype=np.int64),
            "t_deleted_at": np.full(n_new, zd.NO_TIME, dtype=np.int64),
        }
        for k, v in new.items():
            arrays[k] = np.concatenate([arrays[k], v.astype(arrays[k].dtype)])
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
        return {"status changed": len(changed), "new": n_new, "deleted": len(gone)}


class Crm(System):
    name = "crm"
    unit = "statements"

    def setup(self) -> None:
        import sqlalchemy as sa

        from retention_dev.synthetic import crm as synthetic

        a = self.args
        self.url = self.bench.env["BENCH_CRM_URL"] = self.bench.pg.database(CRM_DB)
        print(f"generating {a.records:,} contacts (seed {a.seed}, {a.due_share:.0%} due) into {CRM_DB}...", flush=True)
        t = time.perf_counter()
        engine = sa.create_engine(self.url)
        rows = synthetic.generate(engine, contacts=a.records, seed=a.seed, now=dt.datetime.now(dt.UTC), due_share=a.due_share)
        engine.dispose()
        print(f"  {sum(rows.values()):,} rows in {time.perf_counter() - t:.1f}s", flush=True)
        self.engine = sa.create_engine(self.url, isolation_level="AUTOCOMMIT")

    def limits(self, real: bool) -> str:
        return "PostgreSQL on this machine (no limit)"

    def counter(self) -> dict:
        with self.engine.connect() as c:
            c.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
            row = c.exec_driver_sql(
                "SELECT tup_returned + tup_fetched FROM pg_stat_database WHERE datname = current_database()"
            ).scalar()
        return {"rows_read": int(row)}

    def step_requests(self, out: dict, before: dict, after: dict) -> int:
        return int(out.get("statements", 0))

    def change(self, n: int, rng: np.random.Generator) -> dict:
        """Contacts whose last interaction moves back (to before the retention period: due) or
        forward (now: no longer due), opt-outs, new contacts (copies of existing rows under new
        ids, created now) and a few contacts deleted with their notes by hand."""
        n_back, n_now, n_opt = int(n * 0.2), int(n * 0.2), int(n * 0.1)
        n_new = int(n * 0.4)
        n_gone = n - n_back - n_now - n_opt - n_new
        with self.engine.begin() as c:
            ids = np.array([r[0] for r in c.exec_driver_sql("SELECT id FROM contact")], dtype=np.int64)
            picked = [int(x) for x in rng.choice(ids, n_back + n_now + n_opt + n_gone, replace=False)]
            back, now_, opt = picked[:n_back], picked[n_back:n_back + n_now], picked[n_back + n_now:n_back + n_now + n_opt]
            gone = picked[n_back + n_now + n_opt:]
            c.exec_driver_sql(
                "UPDATE contact SET last_interaction_at = now() - interval '6 years' WHERE id = ANY(%(ids)s)", {"ids": back}
            )
            c.exec_driver_sql("UPDATE contact SET last_interaction_at = now() WHERE id = ANY(%(ids)s)", {"ids": now_})
            c.exec_driver_sql("UPDATE contact SET opted_out = true WHERE id = ANY(%(ids)s)", {"ids": opt})
            for table in ("communication_note", "event_participation", "course_registration", "survey_response"):
                c.exec_driver_sql(f"DELETE FROM {table} WHERE contact_id = ANY(%(ids)s)", {"ids": gone})
            c.exec_driver_sql("UPDATE invoice SET contact_id = NULL WHERE contact_id = ANY(%(ids)s)", {"ids": gone})
            c.exec_driver_sql("DELETE FROM contact WHERE id = ANY(%(ids)s)", {"ids": gone})
            top = int(c.exec_driver_sql("SELECT max(id) FROM contact").scalar())
            cols = [r[0] for r in c.exec_driver_sql(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'contact' AND column_name NOT IN "
                "('id', 'created_at', 'last_interaction_at') ORDER BY ordinal_position"
            )]
            source = [int(x) for x in rng.choice(ids[~np.isin(ids, picked)], n_new, replace=False)]
            listed = ", ".join(cols)
            c.exec_driver_sql(
                f"INSERT INTO contact (id, created_at, last_interaction_at, {listed}) "
                f"SELECT %(top)s + row_number() OVER (ORDER BY id), now(), now(), {listed} FROM contact WHERE id = ANY(%(ids)s)",
                {"top": top, "ids": source},
            )
        return {"last interaction moved back (due)": n_back, "last interaction now": n_now, "opted out": n_opt,
                "new": n_new, "deleted": n_gone}


DRIVERS = {"crm": Crm, "newsletter": Newsletter, "ticketing": Ticketing}


