"""``python -m retention_dev.standins start|stop|status|serve``: the demo's stand-ins after the demo.

``start`` starts the Mailchimp and Zendesk stand-ins in the background from the state the demo
left (``./scripts/demo.sh`` seeds it) and points the Connections file at them, so the README's
commands (``retention explain``, ``retention preview``, ``airflow dags test erasure_request``,
...) reach them; ``stop`` stops them, saving their state; ``serve`` runs them until Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys

from retention_dev import environment as envmod
from retention_dev.standins import demo_servers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m retention_dev.standins", description=__doc__)
    p.add_argument("command", choices=("start", "stop", "status", "serve"))
    args = p.parse_args(argv)
    if args.command == "stop":
        stopped = demo_servers.stop_background()
        print(f"stopped: {', '.join(stopped)}" if stopped else "no stand-in was running")
        return 0
    if args.command == "status":
        for server in demo_servers.BACKGROUND:
            print(f"{server.name}: " + (f"running at {server.url()}" if server.pid() else "not running"))
        return 0
    if not envmod.seeded():
        print(f"no demo systems under {envmod.demo_dir()}: run ./scripts/demo.sh first", file=sys.stderr)
        return 2
    if args.command == "start":
        urls = demo_servers.start_background()
        for name, url in urls.items():
            print(f"{name} stand-in: {url}")
        print(f"Connections: {envmod.connections_file()}")
        return 0
    if demo_servers.running():
        print("the stand-ins already run in the background: python -m retention_dev.standins stop", file=sys.stderr)
        return 2
    mailchimp, zendesk = demo_servers.start_children()
    try:
        print(f"mailchimp stand-in: {mailchimp.base_url}\nzendesk stand-in: {zendesk.base_url}", flush=True)
        print(f"Connections: {envmod.connections_file()}; Ctrl-C stops them", flush=True)
        # Blocked only now, after the children started (they inherit the mask).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        mailchimp.stop()
        zendesk.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
