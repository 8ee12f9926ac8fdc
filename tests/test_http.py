"""The retrying transport (tenacity) and the pacing adapter, against a scripted transport."""

from __future__ import annotations

import email.utils
import logging
import time

import pytest
import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

from retention.systems.http import HTTPError, RetryingSession, retry_after_seconds
from retention.systems.ratelimit import PacedAdapter, Pacer, Route

HASH = "0123456789abcdef0123456789abcdef"  # stands for a subscriber hash: never in a log line


class Scripted(BaseAdapter):
    """Answers each request with the next step: an int status, ``(status, headers)`` or an
    exception instance (raised)."""

    def __init__(self, *steps):
        super().__init__()
        self.steps = list(steps)
        self.sent: list[str] = []

    def send(self, request, **kwargs):
        self.sent.append(request.path_url)
        step = self.steps.pop(0)
        if isinstance(step, BaseException):
            raise step
        status, headers = step if isinstance(step, tuple) else (step, {})
        response = requests.Response()
        response.status_code = status
        response.headers = CaseInsensitiveDict(headers)
        response._content = b'{"title": "Scripted"}'
        response.request = request
        response.url = request.url
        response.reason = "Scripted"
        return response

    def close(self):
        pass


def session(adapter, **kw) -> tuple[RetryingSession, list[float]]:
    slept: list[float] = []
    kw.setdefault("backoff", 0.5)
    return RetryingSession("http://api.test/3.0", adapter=adapter, sleep=slept.append, **kw), slept


def test_retry_after_is_obeyed_on_429_and_503_in_seconds_or_as_a_date():
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    s, slept = session(Scripted((429, {"Retry-After": "3"}), (503, {"Retry-After": later}), 200))
    assert s.request("GET", "/ping", endpoint="ping").status_code == 200
    assert slept[0] == 3 and 25 < slept[1] <= 30
    assert s.stats.as_dict() == {"throttled": 1, "server_errors": 1, "retries": 2}
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: at once
    assert retry_after_seconds("soon") is None


def test_backoff_is_full_jitter_exponential_and_read_live():
    s, slept = session(Scripted(429, 500, 502, 504, 200), backoff=1.0, max_backoff=3.0)
    s.request("GET", "/x")
    assert all(0 <= d <= bound for d, bound in zip(slept, [1, 2, 3, 3], strict=True)), slept
    s.backoff = 0.001  # a live session takes new options
    slept.clear()
    s.session.mount("http://", Scripted(500, 500, 200))
    s.request("GET", "/x")
    assert len(slept) == 2 and max(slept) <= 0.002


def test_out_of_retries_the_last_status_is_raised():
    adapter = Scripted(*[(503, {})] * 3)
    s, slept = session(adapter, max_retries=2)
    with pytest.raises(HTTPError) as err:
        s.request("POST", f"/lists/l/members/{HASH}/actions/delete-permanent", endpoint="delete-permanent")
    assert (err.value.status, err.value.endpoint, err.value.detail) == (503, "delete-permanent", "Scripted")
    assert len(adapter.sent) == 3 and len(slept) == 2
    assert s.stats.as_dict() == {"server_errors": 2, "retries": 2}


def test_dropped_connections_are_retried_then_reported_without_the_url():
    s, _ = session(Scripted(requests.ConnectionError(f"boom /{HASH}"), requests.Timeout(), 204))
    assert s.request("DELETE", "/x").status_code == 204
    assert s.stats.as_dict() == {"connection_errors": 2, "retries": 2}
    s, _ = session(Scripted(*[requests.ConnectionError(f"boom /{HASH}")] * 2), max_retries=1)
    with pytest.raises(HTTPError) as err:
        s.request("GET", f"/m/{HASH}", endpoint="get-member")
    assert err.value.status is None and err.value.detail == "ConnectionError" and HASH not in str(err.value)
    assert s.stats.as_dict() == {"connection_errors": 2, "retries": 1}


def test_ok_accept_and_statuses_that_are_not_retried():
    s, slept = session(Scripted(404, 404, 400, (429, {"Retry-After": "1"})))
    assert s.request("GET", "/x", accept=(404,)).status_code == 404
    with pytest.raises(HTTPError) as err:
        s.request("GET", "/x")
    assert err.value.status == 404
    with pytest.raises(HTTPError):
        s.request("GET", "/x")
    assert s.request("GET", "/x", accept=(429,)).status_code == 429  # accepted, so not retried
    assert slept == [] and s.stats.as_dict() == {}


def test_retries_are_logged_without_identifiers(caplog):
    caplog.set_level(logging.DEBUG, logger="retention")
    s, _ = session(Scripted(429, requests.ConnectionError(f"to /{HASH}"), 503, 204))
    s.request("POST", f"/lists/l/members/{HASH}/actions/delete-permanent", endpoint="delete-permanent")
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("retention")]
    assert lines and all(HASH not in line for line in lines)
    assert [line.split(",")[0] for line in lines] == [
        "POST delete-permanent: HTTP 429",
        "POST delete-permanent: ConnectionError",
        "POST delete-permanent: HTTP 503",
    ]


def test_paced_adapter_paces_counts_and_is_deferred_by_retry_after(monkeypatch):
    now, waits = [0.0], []

    def pacer_sleep(seconds):
        waits.append(seconds)
        now[0] += seconds

    pacer = Pacer(1000, 1.0, clock=lambda: now[0], sleep=pacer_sleep)
    sent: list[str] = []
    adapter = PacedAdapter(lambda method, path: Route("things.get", (pacer,), 1), max_connections=2, on_send=sent.append)
    answers = iter([(429, {"Retry-After": "2"}), (503, {"Retry-After": "4"}), (200, {})])

    def send(self, request, **kwargs):  # the transport below the pacing
        return Scripted(next(answers)).send(request)

    monkeypatch.setattr("requests.adapters.HTTPAdapter.send", send)
    s, slept = session(adapter)
    assert s.request("GET", "/things").status_code == 200
    assert sent == ["things.get"] * 3  # every attempt paced and counted
    assert slept == [2, 4]  # the retries' own waits
    assert waits == [pytest.approx(2), pytest.approx(4)]  # and the pacer was pushed back as far


# --- a Retry-After beyond the cap is not waited out (issue 10, item 11) ----------------------


class _Throttling:
    """A tiny HTTP server on 127.0.0.1 answering every request 429 with ``Retry-After``."""

    def __init__(self, retry_after: str):
        import http.server
        import threading

        outer = self
        self.hits = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits += 1
                self.send_response(429)
                self.send_header("Retry-After", retry_after)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _within(seconds: float, fn):
    """``fn()``'s exception (or None), failing the test when it takes longer than ``seconds``."""
    import threading

    box: list = []

    def run():
        try:
            fn()
            box.append(None)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            box.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still waiting after {seconds}s: the Retry-After was waited out"
    return box[0]


def test_a_retry_after_of_a_day_fails_the_request_at_once_and_the_session_stays_away(monkeypatch):
    from retention.systems.http import RetryAfterTooLong

    monkeypatch.delenv("RETENTION_MAX_RETRY_AFTER", raising=False)
    server = _Throttling("86400")
    try:
        s = RetryingSession(server.url)
        assert s.max_retry_after == 300
        err = _within(5, lambda: s.request("GET", "/things", endpoint="things"))
        assert isinstance(err, RetryAfterTooLong) and isinstance(err, HTTPError)
        assert err.status == 429 and "86400" in str(err) and server.hits == 1
        # The server said "not before tomorrow": the session's next requests fail unsent.
        err = _within(5, lambda: s.request("GET", "/other", endpoint="other"))
        assert isinstance(err, RetryAfterTooLong) and server.hits == 1
    finally:
        server.close()


def test_the_cap_is_configurable_and_a_shorter_retry_after_is_still_waited_out(monkeypatch):
    from retention.systems.http import RetryAfterTooLong, max_retry_after_setting

    monkeypatch.setenv("RETENTION_MAX_RETRY_AFTER", "2")
    assert max_retry_after_setting() == 2 and max_retry_after_setting(7) == 7
    s, slept = session(Scripted((429, {"Retry-After": "2"}), (429, {"Retry-After": "3"})))
    with pytest.raises(RetryAfterTooLong):
        s.request("GET", "/x", endpoint="x")
    assert slept == [2]  # the 2 s were waited, the 3 s were not
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("RETENTION_MAX_RETRY_AFTER", bad)
        with pytest.raises(ValueError, match="^RETENTION_MAX_RETRY_AFTER must be a number of seconds"):
            max_retry_after_setting()


def test_a_request_that_must_not_be_sent_twice_is_not_resent_once_it_may_have_arrived():
    from retention.systems.http import MaybeSent

    # A read timeout: the server may have acted on it. Not sent again; the caller is told.
    adapter = Scripted(requests.ReadTimeout("late"), 200)
    s, slept = session(adapter)
    with pytest.raises(MaybeSent) as err:
        s.request("DELETE", "/jobs", endpoint="jobs", resend=False)
    assert len(adapter.sent) == 1 and slept == [] and err.value.detail == "ReadTimeout"
    # A connect timeout, a 429 or a 5xx: it did not take effect, so it is sent again.
    adapter = Scripted(requests.ConnectTimeout("no"), (429, {"Retry-After": "1"}), 503, 200)
    s, slept = session(adapter)
    assert s.request("DELETE", "/jobs", endpoint="jobs", resend=False).status_code == 200
    assert len(adapter.sent) == 4
    # Without resend=False a read timeout is retried as before.
    s, _ = session(Scripted(requests.ReadTimeout("late"), 200))
    assert s.request("GET", "/x").status_code == 200
