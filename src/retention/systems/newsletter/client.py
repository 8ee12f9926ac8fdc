"""A client for the parts of the Mailchimp Marketing API v3 that retention enforcement needs.

Reading: offset paging over ``GET /lists/{list_id}/members`` (at most 1000 a page), the first
page alone, then the remaining offsets concurrently and yielded in offset order.

Erasing: ``POST /lists/{list_id}/members/{hash}/actions/delete-permanent`` only. The plain
``DELETE /lists/{list_id}/members/{hash}`` merely *archives* a member (the data stays with
Mailchimp), so this client never sends it.

Limits honoured: Mailchimp allows 10 simultaneous connections per user and answers excess with
429 (no ``Retry-After``); the underlying :class:`~retention.systems.http.RetryingSession` caps
connections at ``max_connections`` (its pool blocks rather than opening more) and every
concurrent method here uses at most ``max_connections`` worker threads, so no more than
``max_connections`` requests are ever in flight. 429, 5xx and dropped connections are retried
with jittered exponential backoff.

Nothing personal is logged or put in exceptions: log lines carry counts, endpoint families
and statuses, never addresses or subscriber hashes.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from operator import attrgetter
from typing import Any, Self, TypeVar
from urllib.parse import quote

import msgspec
import pyarrow as pa
import pyarrow.json as pa_json

from retention.systems.http import HTTPError, RetryingSession

log = logging.getLogger(__name__)

MAX_PAGE = 1000
DEFAULT_MEMBER_FIELDS = ("id", "email_address", "status", "last_changed", "timestamp_signup", "timestamp_opt")

ERASED = "erased"
ALREADY_GONE = "already_gone"
FAILED = "failed"

T = TypeVar("T")
R = TypeVar("R")


def base_url_for_key(api_key: str) -> str:
    """``https://{dc}.api.mailchimp.com/3.0`` from the data-centre suffix of an API key."""
    _, sep, dc = api_key.strip().rpartition("-")
    if not sep or not dc or not dc.isalnum():
        # Never echo the key itself.
        raise ValueError("Mailchimp API key has no data-centre suffix (expected '<key>-<dc>', e.g. '...-us21')")
    return f"https://{dc.lower()}.api.mailchimp.com/3.0"


class MailchimpClient:
    """Mailchimp Marketing API v3 client for reading audiences and erasing members.

    ``base_url`` defaults to the data centre named by the key's suffix (``abc-us21`` ->
    ``https://us21.api.mailchimp.com/3.0``); point it at the stand-in with e.g.
    ``http://127.0.0.1:8081/3.0``. Thread-safe: one client may be shared by threads, and all
    of them together still stay within ``max_connections``.
    """

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str | None = None,
        max_connections: int = 10,
        max_retries: int = 10,
        backoff: float = 0.25,
        timeout: float = 60.0,
    ):
        if not api_key:
            raise ValueError("Mailchimp API key is empty")
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.base_url = (base_url or base_url_for_key(api_key)).rstrip("/")
        self.max_connections = max_connections
        self._attempts = threading.local()
        self.session = RetryingSession(
            self.base_url,
            auth=("anystring", api_key),
            headers={"Accept": "application/json", "User-Agent": "retention-enforcement/1"},
            max_connections=max_connections,
            max_retries=max_retries,
            backoff=backoff,
            timeout=timeout,
        )
        self._freeze_environment()
        self._watch_attempts()

    def __repr__(self) -> str:  # never show the key
        return f"MailchimpClient(base_url={self.base_url!r}, max_connections={self.max_connections})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    # -- helpers -----------------------------------------------------------------------------
    def _freeze_environment(self) -> None:
        """Read proxy and CA-bundle settings from the environment once, not per request.

        With ``trust_env`` on, ``requests`` re-reads every environment variable on each call
        (a third of its CPU cost per request here); the base URL is fixed, so resolve the
        settings for it now and switch the per-request lookup off.
        """
        inner = self.session.session
        env = inner.merge_environment_settings(self.base_url, {}, None, None, None)
        inner.proxies.update(env.get("proxies") or {})
        inner.verify = env.get("verify", True)
        inner.trust_env = False

    def _watch_attempts(self) -> None:
        """Note, per thread, when an attempt ended ambiguously (5xx or a lost connection).

        After such an attempt the server may or may not have applied the request; after a 429
        it has not (Mailchimp refuses before doing anything). :meth:`delete_permanent` uses
        this to read a 404 on a retry. Wraps the inner ``requests.Session.request`` that
        :class:`~retention.systems.http.RetryingSession` calls once per attempt.
        """
        inner = self.session.session
        send = inner.request
        attempts = self._attempts

        def request(*args: Any, **kwargs: Any) -> Any:
            try:
                response = send(*args, **kwargs)
            except Exception:
                attempts.ambiguous = True
                raise
            if response.status_code >= 500:
                attempts.ambiguous = True
            return response

        inner.request = request

    @staticmethod
    def subscriber_hash(email: str) -> str:
        """Mailchimp's member id: the MD5 hex digest of the lower-cased address."""
        return hashlib.md5(email.strip().lower().encode("utf-8")).hexdigest()

    @staticmethod
    def _members_path(list_id: str) -> str:
        return f"/lists/{quote(list_id, safe='')}/members"

    def _member_path(self, list_id: str, subscriber_hash: str) -> str:
        return f"{self._members_path(list_id)}/{quote(subscriber_hash, safe='')}"

    def ping(self) -> bool:
        """True when the API answers ``GET /ping`` (credentials and base URL are right)."""
        self.session.request("GET", "/ping", endpoint="ping", ok=(200,))
        return True

    def clock(self) -> datetime:
        """A time no later than Mailchimp's clock now, to the whole second: the earlier of this
        machine's clock (read before asking) and the ``Date`` of a ``GET /ping`` answer.

        A change cursor must be on the clock that stamps ``last_changed``; the server's own
        ``Date`` keeps it right when this machine's clock runs ahead. Taking the earlier of the
        two errs towards reading a change twice, never towards missing one.
        """
        local = datetime.now(UTC).replace(microsecond=0)
        response = self.session.request("GET", "/ping", endpoint="ping", ok=(200,))
        response.close()
        try:
            server = parsedate_to_datetime(response.headers.get("Date") or "")
        except (TypeError, ValueError):
            return local  # no (readable) Date: this machine's clock alone
        if server.tzinfo is None:
            return local
        return min(local, server.astimezone(UTC).replace(microsecond=0))

    # -- reading -----------------------------------------------------------------------------
    def _members_params(
        self,
        *,
        fields: Sequence[str] | None,
        status: str | None,
        since_last_changed: str | None,
        count: int,
        offset: int,
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"count": count, "offset": offset}
        if fields is not None:
            params["fields"] = ",".join([*(f"members.{f}" for f in fields), "total_items"])
        if status:
            params["status"] = status
        if since_last_changed:
            params["since_last_changed"] = since_last_changed
        return params

    def _get_page(self, list_id: str, params: dict[str, Any]) -> dict:
        response = self.session.request(
            "GET", self._members_path(list_id), endpoint="list-members", ok=(200,), params=params
        )
        return response.json()

    def total_members(self, list_id: str, status: str | None = None) -> int:
        """``total_items`` of the list (optionally of one status)."""
        params: dict[str, Any] = {"count": 1, "offset": 0, "fields": "total_items"}
        if status:
            params["status"] = status
        return int(self._get_page(list_id, params)["total_items"])

    def iter_member_pages(
        self,
        list_id: str,
        *,
        fields: Sequence[str] = DEFAULT_MEMBER_FIELDS,
        status: str | None = None,
        since_last_changed: str | None = None,
        count: int = MAX_PAGE,
    ) -> Iterator[list[dict]]:
        """Every member of the list, a page (a list of member dicts) at a time, in offset order.

        The first page is fetched alone to learn ``total_items``; the remaining offsets are
        then fetched by up to ``max_connections`` threads and yielded in offset order. At most
        ``2 * max_connections`` pages are held ahead of the consumer, so memory stays bounded
        however long the list. Closing the generator early cancels what was not yet fetched.

        Offset paging is not a snapshot: members erased *during* the scan shift later members
        to lower offsets, which the scan may then miss (they are found by the next run). Don't
        erase from the list while scanning it; read first, then erase. Members added during
        the scan are picked up when the list grew (``total_items`` is re-read on every page).
        """
        fields = tuple(fields)

        def fetch(offset: int) -> tuple[list[dict], int, int]:
            params = self._members_params(
                fields=fields, status=status, since_last_changed=since_last_changed, count=count, offset=offset
            )
            page = self._get_page(list_id, params)
            members = page.get("members", [])
            return members, len(members), int(page.get("total_items", 0))

        return self._paged(fetch, count)

    def iter_member_columns(
        self,
        list_id: str,
        *,
        fields: Sequence[str] = DEFAULT_MEMBER_FIELDS,
        status: str | None = None,
        since_last_changed: str | None = None,
        count: int = MAX_PAGE,
    ) -> Iterator[dict[str, list]]:
        """As :meth:`iter_member_pages`, but each page as columns: ``{field: [value, ...]}``.

        For bulk reads: the response is decoded by ``msgspec`` straight into the requested
        fields (a field a member lacks is ``None``), several times cheaper than building a
        dict per member, which matters at a million members. Only top-level member fields.
        """
        fields = tuple(fields)
        decoder = _columns_decoder(fields)
        fetch = self._page_bodies(list_id, fields, status, since_last_changed, count)
        # Decoded by the consumer, not by the fetching threads: ten threads decoding at once
        # mostly wait for each other (Python's GIL), and that slowed the reads by a sixth.
        return self._paged(fetch, count, lambda content: _decode_columns(content, fields, decoder))

    def iter_member_arrays(
        self,
        list_id: str,
        *,
        fields: Sequence[str] = DEFAULT_MEMBER_FIELDS,
        status: str | None = None,
        since_last_changed: str | None = None,
        count: int = MAX_PAGE,
    ) -> Iterator[dict[str, pa.Array]]:
        """As :meth:`iter_member_columns`, but each page's fields as Arrow text arrays.

        For the full read of a million members: Arrow's JSON reader turns a page into columns
        in C++ (about five times cheaper than decoding it and building the arrays from Python
        values), and does so without Python's lock, so the pages are parsed by the fetching
        threads. A page Arrow will not read as text columns (a value that is not text, a
        surprising shape) is decoded as :meth:`iter_member_columns` decodes it, values that are
        not text kept as their text, and a page that is not a members page is refused the same
        way.
        """
        fields = tuple(fields)
        options = _arrow_page_options(fields)
        body = self._page_bodies(list_id, fields, status, since_last_changed, count)
        return self._paged(lambda offset: _page_arrays(body(offset), fields, options), count)

    def _page_bodies(
        self, list_id: str, fields: tuple[str, ...], status: str | None, since_last_changed: str | None, count: int
    ) -> Callable[[int], bytes]:
        """The body of the list-members page at an offset, undecoded."""

        def fetch(offset: int) -> bytes:
            params = self._members_params(
                fields=fields, status=status, since_last_changed=since_last_changed, count=count, offset=offset
            )
            response = self.session.request(
                "GET", self._members_path(list_id), endpoint="list-members", ok=(200,), params=params
            )
            return response.content

        return fetch

    def _paged(self, fetch: Callable[[int], Any], count: int, parse: Callable[[Any], tuple[T, int, int]] | None = None) -> Iterator[T]:
        """Offset paging, pages in order: ``parse(fetch(offset)) -> (page, members in it,
        total_items)``; ``fetch`` runs on worker threads, ``parse`` in the consumer's thread."""
        if not 1 <= count <= MAX_PAGE:
            raise ValueError(f"count must be within 1..{MAX_PAGE}")
        parse = parse or (lambda fetched: fetched)
        first, n, total = parse(fetch(0))
        if n:
            yield first
        if total <= count:
            return

        window = 2 * self.max_connections
        next_offset = count
        seen_total = total
        pending: dict[int, Future] = {}
        pool = ThreadPoolExecutor(
            max_workers=min(self.max_connections, -(-(total - count) // count)),
            thread_name_prefix="mailchimp-page",
        )
        try:

            def top_up() -> None:
                nonlocal next_offset
                while len(pending) < window and next_offset < seen_total:
                    pending[next_offset] = pool.submit(fetch, next_offset)
                    next_offset += count

            top_up()
            offset = count
            while offset in pending:
                page, n, page_total = parse(pending.pop(offset).result())
                seen_total = max(seen_total, page_total)
                if n:
                    yield page
                offset += count
                top_up()
            if seen_total != total:
                log.info("list-members: total_items moved from %d to %d during the scan", total, seen_total)
        finally:
            for future in pending.values():
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def get_member(self, list_id: str, subscriber_hash: str, *, fields: Sequence[str] | None = None) -> dict | None:
        """The member, or None when Mailchimp does not know it (404, including erased ones)."""
        params = {"fields": ",".join(fields)} if fields else None
        response = self.session.request(
            "GET",
            self._member_path(list_id, subscriber_hash),
            endpoint="get-member",
            ok=(200,),
            accept=(404,),
            params=params,
        )
        if response.status_code == 404:
            return None
        return response.json()

    # -- erasing -----------------------------------------------------------------------------
    def delete_permanent(self, list_id: str, subscriber_hash: str) -> str:
        """Erase one member for good: ``"erased"`` (204) or ``"already_gone"`` (404).

        A 404 means the member is not (any longer) there. It is reported as
        ``"already_gone"``, unless an earlier attempt of this same call ended ambiguously (a
        5xx or a lost connection, after which the erasure may have been applied with only its
        response lost): then it is reported as ``"erased"``, since the usual cause is that our
        own earlier attempt went through. A 404 after 429s only is ``"already_gone"`` (a 429
        is refused before anything happens). Callers treat both outcomes as success. Raises
        :class:`~retention.systems.http.HTTPError` when the call fails for good.
        """
        self._attempts.ambiguous = False
        try:
            response = self.session.request(
                "POST",
                f"{self._member_path(list_id, subscriber_hash)}/actions/delete-permanent",
                endpoint="delete-permanent",
                ok=(204, 200),
                accept=(404,),
            )
            ambiguous = getattr(self._attempts, "ambiguous", False)
        finally:
            self._attempts.ambiguous = False
        response.close()
        if response.status_code == 404:
            return ERASED if ambiguous else ALREADY_GONE
        return ERASED

    def delete_permanent_many(
        self,
        list_id: str,
        hashes: Iterable[str],
        *,
        on_result: Callable[[str, str], None] | None = None,
    ) -> dict[str, str]:
        """Erase many members concurrently; the outcome per hash.

        Outcomes: ``"erased"``, ``"already_gone"`` (both success, see
        :meth:`delete_permanent`) or ``"failed"`` (out of retries or a non-retryable status;
        the failure of one hash never stops the others). Duplicate hashes are erased once.
        Up to ``max_connections`` requests run at once, fed lazily from ``hashes``.

        ``on_result(hash, outcome)`` is called as each hash finishes, **always from the
        calling thread** (never from a worker), one call at a time, so it may write to a
        ledger connection that is bound to the caller's thread. If it raises, no further
        deletes are started, those in flight are awaited, and the exception propagates.
        """
        results: dict[str, str] = {}

        def erase(subscriber_hash: str) -> str:
            try:
                return self.delete_permanent(list_id, subscriber_hash)
            except HTTPError as exc:
                log.warning("delete-permanent failed for good: status %s (%s)", exc.status, exc.detail)
                return FAILED
            except Exception as exc:  # noqa: BLE001 - one failure must not stop the others
                log.warning("delete-permanent failed for good: %s", type(exc).__name__)
                return FAILED

        def done(subscriber_hash: str, outcome: str) -> None:
            results[subscriber_hash] = outcome
            if on_result is not None:
                on_result(subscriber_hash, outcome)

        self._run_bounded(erase, _unique(hashes), done, thread_name="mailchimp-erase")
        counts: dict[str, int] = {}
        for outcome in results.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        log.info("delete-permanent: %s", ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "nothing to do")
        return results

    def exists_many(self, list_id: str, hashes: Iterable[str]) -> dict[str, bool]:
        """Whether each member is still known to Mailchimp (concurrent GETs; for verification).

        An archived member still exists (its data is kept); an erased one does not. Raises
        :class:`~retention.systems.http.HTTPError` if any lookup fails for good: a verification that
        could not look is not a pass.
        """
        results: dict[str, bool] = {}

        def exists(subscriber_hash: str) -> bool:
            return self.get_member(list_id, subscriber_hash, fields=("id",)) is not None

        def done(subscriber_hash: str, value: bool) -> None:
            results[subscriber_hash] = value

        self._run_bounded(exists, _unique(hashes), done, thread_name="mailchimp-verify")
        return results

    def _run_bounded(
        self,
        fn: Callable[[T], R],
        items: Iterable[T],
        on_done: Callable[[T, R], None],
        *,
        thread_name: str,
    ) -> None:
        """``fn`` over ``items`` on ``max_connections`` threads, ``on_done`` in this thread.

        Items are pulled lazily and at most ``2 * max_connections`` are queued at once. An
        exception from ``fn`` or ``on_done`` stops new submissions, lets the running calls
        finish and is then raised.
        """
        workers = self.max_connections
        iterator = iter(items)
        pending: dict[Future, T] = {}
        error: BaseException | None = None
        exhausted = False
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=thread_name) as pool:
            try:
                while True:
                    while not exhausted and error is None and len(pending) < 2 * workers:
                        try:
                            item = next(iterator)
                        except StopIteration:
                            exhausted = True
                            break
                        pending[pool.submit(fn, item)] = item
                    if not pending:
                        break
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        item = pending.pop(future)
                        if error is not None:
                            continue
                        try:
                            on_done(item, future.result())
                        except BaseException as exc:  # noqa: BLE001 - re-raised below
                            error = exc
                            for other in pending:
                                other.cancel()
            except BaseException:  # KeyboardInterrupt while waiting
                for other in pending:
                    other.cancel()
                raise
        if error is not None:
            raise error


@functools.cache
def _columns_decoder(fields: tuple[str, ...]) -> msgspec.json.Decoder:
    """A decoder of a list-members page that keeps only ``fields`` of each member."""
    member = msgspec.defstruct("Member", [(f, Any, None) for f in fields])
    page = msgspec.defstruct("MembersPage", [("members", list[member], []), ("total_items", int, 0)])
    return msgspec.json.Decoder(page)


def text_array(values: list) -> pa.Array:
    """Values as an Arrow text array; a value that is not text is kept as its text."""
    try:
        return pa.array(values, type=pa.string())
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def _arrow_page_options(fields: tuple[str, ...]) -> tuple[pa_json.ReadOptions, pa_json.ParseOptions]:
    """Arrow's JSON reader set to read a list-members page as one row: its members' ``fields``
    as text (a member without one has it null) and ``total_items``; anything else ignored."""
    member = pa.struct([(f, pa.string()) for f in fields])
    schema = pa.schema([("members", pa.list_(member)), ("total_items", pa.int64())])
    # One block for the whole page (a page of a thousand members is a few hundred kB), and
    # newlines allowed anywhere, since a page is one JSON document, not one per line.
    read = pa_json.ReadOptions(use_threads=False, block_size=1 << 24)
    parse = pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore", newlines_in_values=True)
    return read, parse


def _page_arrays(
    content: bytes, fields: tuple[str, ...], options: tuple[pa_json.ReadOptions, pa_json.ParseOptions]
) -> tuple[dict[str, pa.Array], int, int]:
    """A list-members page as ({field: text array}, members, total_items)."""
    try:
        table = pa_json.read_json(pa.BufferReader(content), read_options=options[0], parse_options=options[1])
        if table.num_rows == 1 and table.column("members").null_count == 0:
            members = table.column("members").combine_chunks().flatten()
            # A member that is null is no member: refused below, as value by value.
            if members.null_count == 0:
                total = table.column("total_items")[0].as_py() or 0
                return {f: members.field(f) for f in fields}, len(members), int(total)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    # Not text throughout, or not the shape Arrow was told: decoded value by value, as
    # iter_member_columns does (a page that is no members page is refused there). A decoder of
    # its own: this runs in the fetching threads, and such a page is rare.
    columns, n, total = _decode_columns(content, fields, _columns_decoder(fields))
    return {f: text_array(values) for f, values in columns.items()}, n, total


def _decode_columns(content: bytes, fields: tuple[str, ...], decoder: msgspec.json.Decoder) -> tuple[dict[str, list], int, int]:
    """A list-members page decoded value by value: ({field: values}, members, total_items)."""
    try:
        page = decoder.decode(content)
    except msgspec.DecodeError as exc:
        # The message names the JSON path, never the value.
        raise HTTPError("GET", "list-members", 200, f"unexpected page shape: {exc}") from None
    members = page.members
    return {f: list(map(attrgetter(f), members)) for f in fields}, len(members), page.total_items


def _unique(items: Iterable[str]) -> Iterator[str]:
    seen: set[str] = set()
    for item in items:
        if item not in seen:
            seen.add(item)
            yield item


__all__ = [
    "ALREADY_GONE",
    "DEFAULT_MEMBER_FIELDS",
    "ERASED",
    "FAILED",
    "MAX_PAGE",
    "HTTPError",
    "MailchimpClient",
    "base_url_for_key",
]
