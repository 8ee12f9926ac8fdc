"""A local stand-in for the parts of the Zendesk Support API the retention project uses.

Run ``python -m retention_dev.standins.zendesk --host 127.0.0.1 --port 0 --state-file PATH
--tickets 1000 --seed 1``. It prints ``LISTENING <port>`` once it accepts connections, saves its
state atomically on SIGTERM (and on ``POST /_standin/save``) and exits 0. With an existing state
file the data comes from the file and ``--tickets/--seed/--due-share/--now`` are ignored.

What it mirrors of real Zendesk (see the Zendesk Support API reference):

* ``GET /api/v2/incremental/tickets/cursor.json?start_time=|cursor=`` (and ``users``): ordered
  by ``updated_at``, up to 1000 per page (``per_page``), ``after_cursor``/``after_url``,
  ``end_of_stream``; ``include=metric_sets`` sideloads ``metric_sets`` (with ``solved_at``);
  soft-deleted tickets appear with status ``"deleted"``, soft-deleted users with
  ``active: false``. Limited to ``--incremental-per-minute`` (10) requests per rolling minute.
* ``GET /api/v2/tickets/show_many?ids=`` (<= 100, live tickets only), ``GET|PUT
  /api/v2/tickets/{id}`` (PUT changes ``status``; used to close a ticket), ``DELETE
  /api/v2/tickets/{id}`` (single soft delete, 204).
* ``DELETE /api/v2/tickets/destroy_many?ids=`` (<= 100, else 400): soft delete as a job.
  ``GET /api/v2/deleted_tickets`` lists soft-deleted tickets (cursor ``page[size]``/``page[after]``
  or offset ``page``/``per_page``; <= 100 a page; ``--deleted-list-per-minute`` (10) requests a
  minute) until ``DELETE /api/v2/deleted_tickets/destroy_many?ids=`` (<= 100) removes them for
  good, again as a job. ``GET /api/v2/job_statuses/{id}`` (and ``/job_statuses/show_many?ids=``,
  comma-separated job ids, <= 100; unknown ids are left out): ``queued`` -> ``working`` ->
  ``completed``/``failed`` over ``--job-seconds``; ``results`` lists one entry per id
  (``{"id", "action", "success", "status"}``, or ``"error": "RecordNotFound"``). At most
  ``--max-jobs`` (30) jobs queued or working at once, beyond that 429.
  (Real Zendesk reports only ``{"success": true}`` for a permanent-deletion job; the stand-in is
  more detailed, the client copes with both.)
* ``DELETE /api/v2/users/{id}`` soft-deletes; refused with 422 while the user is requester of a
  ticket that is not closed (new/open/pending/hold/solved; soft-deleted tickets do not count).
  ``DELETE /api/v2/deleted_users/{id}`` deletes a soft-deleted user for good, at most
  ``--user-deletes-per-10min`` (700) per rolling 10 minutes (429 with ``Retry-After``).
  ``GET /api/v2/users/{id}``, ``/users/show_many``, ``/deleted_users/{id}`` (soft-deleted users
  only), ``/deleted_users`` (soft and permanently deleted users, the latter named "Permanently
  Deleted User" with no e-mail; cursor or offset pagination, <= 100 a page) and
  ``/deleted_users/count`` (``{"count": {"value", "refreshed_at"}}``).
* ``GET /api/v2/users/search?query=email:{address}`` (``query`` may also be the bare address):
  the active users with that address (case-insensitive); users' addresses are the placeholders
  ``user{id}@example.org``. Other search syntax is refused with 400 (not modelled).
  ``GET /api/v2/users/{id}/tickets/requested``: the user's live (not soft-deleted) tickets,
  by id, cursor (``page[size]``/``page[after]``) or offset (``page``/``per_page``) pagination,
  <= 100 a page; 404 for an unknown or deleted user.
* All API requests: ``--requests-per-minute`` per rolling minute (``--window-seconds``, 60, sets
  the length of that "minute" so that tests need not wait for real minutes), 429 + ``Retry-After`` beyond,
  ``X-Rate-Limit``/``X-Rate-Limit-Remaining``/``ratelimit-*`` headers; 404 for unknown records.
  Optional ``--token``: Basic ``{email}/token:{token}`` or ``Bearer {token}``, else 401.

Admin (never throttled, faulted or counted): ``GET /_standin/health``, ``GET /_standin/stats``,
``POST /_standin/save``, ``POST /_standin/faults`` with JSON ``{"throttle_next": N,
"retry_after": S, "error_next": N, "error_status": 503, "slow_ms": M, "slow_after_ms": M,
"fail_job_next": N, "fail_job_after": K, "match": "destroy_many"}`` (``match``: substring of the
path the faults apply to; ``slow_after_ms`` delays the answer after the request took effect;
``{}`` clears).

Nothing is printed after ``LISTENING``; nothing personal is logged.

This module is the server and its command line; the parts live next to it: ``zendesk_state``
(the data, its state file, the JSON shapes), ``zendesk_jobs`` (the background jobs),
``zendesk_limits`` (rate limits and injected faults), ``zendesk_api`` (request entry, admin,
routing), ``zendesk_tickets`` and ``zendesk_users`` (the endpoint families), ``zendesk_paging``
(parameters, listings, incremental exports), ``zendesk_common`` (codes, times, the API error).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from retention_dev.standins import zendesk_data as zd
from retention_dev.standins.zendesk_api import App
from retention_dev.standins.zendesk_common import (
    ACTIVE,
    CLOSED,
    DELETED,
    GONE,
    SOFT_DELETED,
    USER_GONE,
    ApiError,
    iso,
    iso_many,
)
from retention_dev.standins.zendesk_jobs import JOB_RETENTION_SECONDS, MAX_FINISHED_JOBS
from retention_dev.standins.zendesk_limits import RollingWindow
from retention_dev.standins.zendesk_paging import MAX_EXPORT_PAGE, MAX_IDS
from retention_dev.standins.zendesk_state import STATE_VERSION, State

log = logging.getLogger("retention_dev.standins.zendesk")

__all__ = [
    "ACTIVE", "CLOSED", "DELETED", "GONE", "JOB_RETENTION_SECONDS", "MAX_EXPORT_PAGE", "MAX_FINISHED_JOBS", "MAX_IDS",
    "SOFT_DELETED", "STATE_VERSION", "USER_GONE", "ApiError", "App", "Handler", "RollingWindow", "State", "build_state",
    "iso", "iso_many", "main", "parse_args", "serve",
]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ZendeskStandIn/1"
    app: App  # set on the subclass made in serve()

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle's algorithm and the
        # client's delayed ACK add ~40 ms to every keep-alive response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):
        pass

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            status, headers, payload = self.app.handle(method, self.path, self.headers, body)
        except Exception:  # a bug in the stand-in: answer 500, keep serving
            log.exception("stand-in error on %s", method)
            status, headers, payload = 500, {}, {"error": "InternalError"}
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if payload is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PUT(self):
        self._dispatch("PUT")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m retention_dev.standins.zendesk", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port")
    p.add_argument("--state-file", default=None)
    p.add_argument("--tickets", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--due-share", type=float, default=0.2)
    p.add_argument("--now", default=None, help="ISO time the synthetic data is generated against (default: now)")
    p.add_argument("--requests-per-minute", type=int, default=700)
    p.add_argument("--incremental-per-minute", type=int, default=10)
    p.add_argument("--deleted-list-per-minute", type=int, default=10)
    p.add_argument("--user-deletes-per-10min", type=int, default=700)
    p.add_argument("--max-jobs", type=int, default=30)
    p.add_argument("--job-seconds", type=float, default=0.5)
    p.add_argument(
        "--window-seconds",
        type=float,
        default=60.0,
        help="length of a rate-limit 'minute' (the user-delete window is 10 of them); tests shorten it",
    )
    p.add_argument("--export-lag-seconds", type=int, default=0,
                   help="hide changes younger than this from incremental exports (real Zendesk: 60)")
    p.add_argument("--token", default=None, help="require this API token (Basic email/token or Bearer)")
    return p.parse_args(argv)


def build_state(args: argparse.Namespace) -> State:
    path = Path(args.state_file) if args.state_file else None
    if path is not None and path.exists():
        return State.load(path, job_seconds=args.job_seconds)
    now = datetime.fromisoformat(args.now) if args.now else zd.default_now()
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return State.generate(args.tickets, args.seed, args.due_share, now, job_seconds=args.job_seconds)


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    state = build_state(args)
    app = App(state, args)
    handler = type("BoundHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((args.host, args.port), handler)
    server.daemon_threads = True
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    jobs = threading.Thread(target=app.job_loop, name="jobs", daemon=True)
    jobs.start()
    web = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True)
    web.start()
    print(f"LISTENING {server.server_address[1]}", flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    app.stop_event.set()
    with state.job_cond:
        state.job_cond.notify_all()
    jobs.join(timeout=5)
    if args.state_file:
        state.save(Path(args.state_file))
    server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return serve(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
