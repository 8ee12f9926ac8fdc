"""The demo's two stand-ins, started from the demo's state and written into the Connections file.

``python -m retention_dev.standins start`` starts them in the background (they outlive the
command; pid and log files under ``$RETENTION_HOME/demo``), ``stop`` stops them (each saves its
state first), ``status`` says whether they run, and ``serve`` keeps them in the foreground until
Ctrl-C. The demo (``retention_dev.demo``) starts them as its own children.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from retention_dev import environment as envmod
from retention_dev.standins.process import PROJECT_ROOT, StandIn


def mailchimp_args(members: int = 5000, seed: int = 42) -> list[str]:
    return [
        "--state-file", str(envmod.mailchimp_state()), "--members", str(members), "--seed", str(seed),
        "--list-id", envmod.LIST_ID, "--api-key", envmod.MAILCHIMP_KEY,
    ]


def zendesk_args(tickets: int = 3000, seed: int = 42) -> list[str]:
    return ["--state-file", str(envmod.zendesk_state()), "--tickets", str(tickets), "--seed", str(seed), *envmod.ZENDESK_ARGS]


def start_children(*, members: int = 5000, tickets: int = 3000, seed: int = 42) -> tuple[StandIn, StandIn]:
    """Both stand-ins as children of this process, the Connections file pointing at them."""
    mailchimp = StandIn("mailchimp", "--port", "0", *mailchimp_args(members, seed)).start()
    try:
        zendesk = StandIn("zendesk", "--port", "0", *zendesk_args(tickets, seed)).start()
    except BaseException:
        mailchimp.stop()
        raise
    envmod.write_connections(mailchimp_url=mailchimp.base_url, zendesk_url=zendesk.base_url)
    return mailchimp, zendesk


# --- in the background ---------------------------------------------------------------------


@dataclass
class Background:
    name: str

    @property
    def pid_file(self) -> Path:
        return envmod.demo_dir() / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return envmod.demo_dir() / f"{self.name}.log"

    def pid(self) -> int | None:
        """The pid of this stand-in when it runs (a stale pid file, or a pid now used by another
        program, counts as not running)."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return None
        return pid if f"retention_dev.standins.{self.name}".encode() in cmdline else None

    def url(self) -> str | None:
        try:
            return self.pid_file.read_text().split()[1]
        except (OSError, IndexError):
            return None

    def start(self, args: list[str], timeout: float = 120.0) -> str:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        with open(self.log_file, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"retention_dev.standins.{self.name}", "--host", "127.0.0.1", "--port", "0", *args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,  # not stopped by the shell's Ctrl-C: `stop` stops it
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_file.read_text()
            if text.startswith("LISTENING "):
                url = f"http://127.0.0.1:{int(text.split()[1])}"
                self.pid_file.write_text(f"{proc.pid} {url}\n")
                return url
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
        raise RuntimeError(f"the {self.name} stand-in did not start: see {self.log_file}")

    def stop(self, timeout: float = 60.0) -> bool:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)  # the stand-in saves its state, then exits
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            if _zombie(pid):
                break
            time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)
        return True


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True


BACKGROUND = (Background("mailchimp"), Background("zendesk"))


def running() -> bool:
    return any(b.pid() for b in BACKGROUND)


def start_background() -> dict[str, str]:
    """Start both stand-ins in the background (or keep the ones already running) and write
    their addresses into the Connections file."""
    urls = {}
    for server, args in zip(BACKGROUND, (mailchimp_args(), zendesk_args()), strict=True):
        urls[server.name] = server.url() if server.pid() else server.start(args)
    for name, url in urls.items():
        requests.get(f"{url}/_standin/health", timeout=10).raise_for_status()
        del name
    envmod.write_connections(mailchimp_url=urls["mailchimp"], zendesk_url=urls["zendesk"])
    return urls


def stop_background() -> list[str]:
    """Stop the background stand-ins; the names of those that ran."""
    return [b.name for b in BACKGROUND if b.stop()]
