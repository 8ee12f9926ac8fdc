"""A local stand-in for the Mailchimp Marketing API v3, with synthetic data and fault injection.

Run it with ``python -m retention_dev.standins.mailchimp --port 0 --state-file PATH``; it prints
``LISTENING <port>`` once it accepts connections, and on SIGTERM saves its state atomically and
exits 0. See ``--help`` for the options.

What it speaks (under ``/3.0``, Basic auth with any user name and the ``--api-key``; errors
are Mailchimp problem documents ``{"type", "title", "status", "detail", "instance"}``):

* ``GET /3.0/ping``, ``GET /3.0/lists/{list_id}`` (every list the stand-in serves: ``--list-id``
  and each ``--also-list``; any other list id is 404, like the real API)
* ``GET /3.0/lists/{list_id}/members``: ``count`` (default 10, at most 1000), ``offset``,
  ``status``, ``since_last_changed``, ``fields`` / ``exclude_fields`` (dotted paths such as
  ``members.id``); members come in insertion order; paging is O(page) at any offset.
  ``since_last_changed`` lists the members whose ``last_changed`` is strictly after it, compared
  in whole seconds (a fraction is dropped), archived members included (status ``archived``).
* ``POST /3.0/lists/{list_id}/members`` with ``email_address``, ``status`` (not ``archived``) and
  optionally ``merge_fields``: adds a member, 200 with it; like the real API it has no signup
  time, 400 ``Member Exists`` for a member, ``Forgotten Email Not Subscribed`` for an address
  erased for good.
* ``GET /3.0/lists/{list_id}/members/{subscriber_hash}`` (404 when unknown or erased; the
  path segment may also be the address itself, as Mailchimp allows)
* ``DELETE /3.0/lists/{list_id}/members/{subscriber_hash}``: *archives* (status ``archived``,
  data kept, ``last_changed`` now), 204; 405 for a cleaned, pending or archived member, as the
  real API answers. ``PATCH`` with ``{"status": ...}`` changes the status
  (``last_changed`` now, when it changed).
* Every answer has a ``Date`` header (the server's clock), as the real API's do.
* ``POST /3.0/lists/{list_id}/members/{subscriber_hash}/actions/delete-permanent``: erases the
  member for good (its data is blanked at once, only the hash is remembered), 204; 404 when
  absent.
* More than ``--max-connections`` requests in flight for one API key get 429 (no
  ``Retry-After``, like the real service).

Admin endpoints (no auth, not under ``/3.0``):

* ``GET /_standin/health``
* ``GET /_standin/stats``: member counts (``total``, one key per status and ``statuses``),
  ``deleted_hashes_count`` (members erased since the audience was generated), and counters
  since start or the last reset: ``requests``, ``requests_by_kind``, ``permanent_deletes``,
  ``archives``, ``throttled`` (all 429s), ``throttled_injected``, ``errors_injected``,
  ``drops``, ``max_in_flight``, ``in_flight``.
* ``POST /_standin/faults`` with JSON, all keys optional: ``throttle_next``, ``error_next``,
  ``error_status`` (default 503), ``drop_next``, ``slow_ms``, ``match`` (a substring of
  ``"METHOD /path?query"``; default: every API request). The next N matching API requests get a 429,
  a 5xx or a dropped connection (in that order of precedence); a drop happens *after* the
  request took effect and before the response is written (a delete-permanent is applied, then
  the connection is cut). ``slow_ms`` delays every matching response until cleared. ``{}``
  clears all faults.
* ``POST /_standin/reset-stats``, ``POST /_standin/save``.
* ``POST /_standin/clock`` with ``{"now": "<ISO 8601 with offset>"}`` freezes the stand-in's clock
  (``last_changed`` of every change, the ``Date`` header) at that instant; ``{"now": null}`` lets
  it run again. Tests of the change feed use it to change members within one given second.

This module is the command line; the parts live next to it: ``mailchimp_audience`` (the
members, their state file), ``mailchimp_routes`` (the API), ``mailchimp_fields`` (``fields`` /
``exclude_fields``), ``mailchimp_control`` (faults, the connection limit, counters),
``mailchimp_server`` (HTTP, admin endpoints), ``mailchimp_errors`` (problem documents).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from datetime import datetime
from pathlib import Path

from retention_dev.standins.mailchimp_audience import ARCHIVED, MEMBER_FIELDS, Audience, check_json_safe, list_state_file
from retention_dev.standins.mailchimp_control import Control
from retention_dev.standins.mailchimp_data import (
    STATUS_CODE,
    STATUSES,
    MemberColumns,
    default_now,
    generate_columns,
    iso,
    iso_column,
)
from retention_dev.standins.mailchimp_errors import ERROR_DOC, ApiError, problem
from retention_dev.standins.mailchimp_fields import project
from retention_dev.standins.mailchimp_routes import MAX_COUNT
from retention_dev.standins.mailchimp_server import REASONS, DropConnection, Handler, StandInServer

__all__ = [
    "ARCHIVED", "ERROR_DOC", "MAX_COUNT", "MEMBER_FIELDS", "REASONS", "STATUSES", "STATUS_CODE", "ApiError", "Audience",
    "Control", "DropConnection", "Handler", "MemberColumns", "StandInServer", "build_audience", "build_audiences", "check_json_safe",
    "default_now", "generate_columns", "iso", "iso_column", "list_state_file", "main", "parse_args", "problem", "project",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m retention_dev.standins.mailchimp", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--state-file", type=Path, default=None, help="load from / save to this file")
    p.add_argument("--list-id", default="demo-list")
    p.add_argument(
        "--also-list", action="append", default=[], metavar="LIST_ID",
        help="serve another audience too (repeatable): the same generated people, kept in a state file of its own "
        "beside --state-file (<name>.<list id><suffix>)",
    )
    p.add_argument("--api-key", default="standin-key-us0")
    p.add_argument("--members", type=int, default=1000, help="members to generate when there is no state file")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--erase-share", type=float, default=0.10)
    p.add_argument("--now", default=None, help="reference time for generation (ISO 8601); default: now")
    p.add_argument("--max-connections", type=int, default=10)
    return p.parse_args(argv)


def build_audience(args: argparse.Namespace, list_id: str | None = None) -> Audience:
    list_id = list_id or args.list_id
    state_file = list_state_file(args.state_file, list_id, args.list_id)
    if state_file is not None and state_file.exists():
        return Audience.load(state_file, list_id)
    now = datetime.fromisoformat(args.now) if args.now else default_now()
    cols = generate_columns(args.members, seed=args.seed, now=now, erase_share=args.erase_share)
    return Audience(cols, list_id)


def build_audiences(args: argparse.Namespace) -> dict[str, Audience]:
    """Every list served, the first (``--list-id``) first."""
    ids = list(dict.fromkeys([args.list_id, *args.also_list]))
    return {list_id: build_audience(args, list_id) for list_id in ids}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    args = parse_args(argv)
    audiences = build_audiences(args)
    server = StandInServer(
        (args.host, args.port),
        audiences,
        api_key=args.api_key,
        max_connections=args.max_connections,
        state_file=args.state_file,
    )
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    print(f"LISTENING {server.server_address[1]}", flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    server.save()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
