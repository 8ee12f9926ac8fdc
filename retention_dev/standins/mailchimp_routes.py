"""The Mailchimp stand-in's API endpoints under ``/3.0`` (for each list it serves): ``ping``, ``lists/{list_id}``,
``lists/{list_id}/members`` (paging, ``status``, ``since_last_changed``, ``fields`` /
``exclude_fields``; POST adds a member), a member's GET, PATCH (a status change, e.g. subscribing again) and DELETE
(archive) and ``actions/delete-permanent``."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs

from retention_dev.standins.mailchimp_audience import MEMBER_FIELDS, Audience
from retention_dev.standins.mailchimp_control import Control
from retention_dev.standins.mailchimp_data import STATUS_CODE
from retention_dev.standins.mailchimp_errors import ApiError, json_object
from retention_dev.standins.mailchimp_fields import field_tree, project

MAX_COUNT = 1000


class MemberRoutes:
    """The API of :class:`~retention_dev.standins.mailchimp_server.StandInServer` (which provides
    ``audience`` and ``control``)."""

    audience: Audience
    audiences: dict[str, Audience]
    control: Control

    def api(self, method: str, parts: list[str], query: str, body: bytes = b"") -> tuple[int, Any]:
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        fields = field_tree(params.get("fields"))
        exclude = field_tree(params.get("exclude_fields"))
        if parts == ["ping"]:
            if method != "GET":
                raise _not_allowed()
            return 200, project({"health_status": "Everything's Chimpy!"}, fields, exclude)
        if len(parts) < 2 or parts[0] != "lists":
            raise ApiError(404, "Resource Not Found", "The requested resource could not be found.")
        aud = self.audiences.get(parts[1])
        if aud is None:
            raise ApiError(404, "Resource Not Found", "The requested resource could not be found.")
        rest = parts[2:]
        if not rest:
            if method != "GET":
                raise _not_allowed()
            counts = aud.counts()
            info = {
                "id": aud.list_id,
                "name": "Stand-in audience",
                "stats": {
                    "member_count": counts["subscribed"],
                    "unsubscribe_count": counts["unsubscribed"],
                    "cleaned_count": counts["cleaned"],
                    "total_contacts": sum(counts.values()),
                },
            }
            return 200, project(info, fields, exclude)
        if rest[0] != "members":
            raise ApiError(404, "Resource Not Found", "The requested resource could not be found.")
        if len(rest) == 1:
            if method == "POST":
                return 200, project(self.add_member(aud, body), fields, exclude)
            if method != "GET":
                raise _not_allowed()
            return 200, self.list_members(params, fields, exclude, aud)
        subscriber_hash = rest[1]
        if len(rest) == 2:
            if method == "GET":
                member = aud.member(subscriber_hash)
                if member is None:
                    raise _member_not_found()
                return 200, project(member, fields, exclude)
            if method == "DELETE":
                archived = aud.archive(subscriber_hash, self.now_seconds())
                if archived is None:  # the real API's answer, word for word
                    raise ApiError(
                        405, "Method Not Allowed",
                        "This list member cannot be removed. Can not archive a contact that is bounced, pending or archived",
                    )
                if not archived:
                    raise _member_not_found()
                self.control.add("archives")
                return 204, None
            if method == "PATCH":
                status = json_object(body).get("status")
                if status not in STATUS_CODE or status == "archived":
                    raise ApiError(400, "Invalid Resource", "Unknown or unsettable status.")
                if not aud.set_status(subscriber_hash, STATUS_CODE[status], self.now_seconds()):
                    raise _member_not_found()
                self.control.add("updates")
                return 200, project(aud.member(subscriber_hash), fields, exclude)
            raise _not_allowed()
        if rest[2:] == ["actions", "delete-permanent"]:
            if method != "POST":
                raise _not_allowed()
            if not aud.delete_permanent(subscriber_hash):
                raise _member_not_found()
            self.control.add("permanent_deletes")
            return 204, None
        raise ApiError(404, "Resource Not Found", "The requested resource could not be found.")

    def now_seconds(self) -> int:
        """The stand-in's clock in whole seconds (Mailchimp keeps ``last_changed`` to the second)."""
        return int(self.now())

    def now(self) -> float:
        return time.time()

    def add_member(self, aud: Audience, body: bytes) -> dict:
        """``POST /lists/{list_id}/members``: ``email_address`` and ``status`` (subscribed,
        unsubscribed, cleaned, pending or transactional), optionally ``merge_fields``."""
        spec = json_object(body)
        email, status = spec.get("email_address"), spec.get("status")
        if not isinstance(email, str) or email.count("@") != 1 or not email.strip():
            raise ApiError(400, "Invalid Resource", "Please provide a valid email address.")
        if status not in STATUS_CODE or status == "archived":
            raise ApiError(400, "Invalid Resource", "Unknown or unsettable status.")
        merge = spec.get("merge_fields") if isinstance(spec.get("merge_fields"), dict) else {}
        try:
            added = aud.add(email, STATUS_CODE[status], self.now_seconds(), str(merge.get("FNAME", "")), str(merge.get("LNAME", "")))
        except ValueError as exc:
            # Neither the address nor the hash in the message (nothing personal in errors).
            raise ApiError(400, "Forgotten Email Not Subscribed" if "permanently" in str(exc) else "Invalid Resource",
                           f"The contact {exc}.") from None
        if added is None:
            raise ApiError(400, "Member Exists", "The contact is already a list member.")
        self.control.add("adds")
        return aud.member(added)

    def list_members(
        self, params: dict[str, str], fields: dict | None, exclude: dict | None, aud: Audience | None = None
    ) -> dict | bytes:
        """The list-members response of ``aud`` (default: the first list): a dict, or
        already-encoded JSON on the fast path."""
        aud = aud or self.audience
        count = _int_param(params, "count", 10)
        offset = _int_param(params, "offset", 0)
        if count < 0 or count > MAX_COUNT:
            raise ApiError(400, "Invalid Resource", f"The count parameter must be between 0 and {MAX_COUNT}.")
        if offset < 0:
            raise ApiError(400, "Invalid Resource", "The offset parameter must be 0 or greater.")
        status = params.get("status") or None
        status_code = None
        if status is not None:
            if status not in STATUS_CODE:
                raise ApiError(400, "Invalid Resource", "Unknown status filter.")
            status_code = STATUS_CODE[status]
        since = params.get("since_last_changed") or None
        since_ts = None
        if since is not None:
            try:
                when = datetime.fromisoformat(since.replace(" ", "+"))
            except ValueError:
                raise ApiError(400, "Invalid Resource", "since_last_changed must be an ISO 8601 time.") from None
            if when.tzinfo is None:
                raise ApiError(400, "Invalid Resource", "since_last_changed needs a UTC offset.")
            since_ts = int(when.timestamp())

        wanted = MEMBER_FIELDS
        members_tree: dict | None = None
        if fields is not None:
            if "members" in fields:
                members_tree = fields["members"]
                if members_tree:
                    wanted = tuple(f for f in MEMBER_FIELDS if f in members_tree)
            else:
                wanted = ()
        if exclude is not None and "members" in exclude and not exclude["members"]:
            wanted = ()
        rows, total = aud.page(status_code, since_ts, offset, count)
        # Sub-fields (members.merge_fields.FNAME) and member exclusions take the general path.
        general = (members_tree and any(members_tree[f] for f in wanted)) or (
            exclude is not None and "members" in exclude
        )

        def include(key: str) -> bool:
            return (fields is None or key in fields) and (exclude is None or key not in exclude or bool(exclude[key]))

        if not general:
            parts = []
            if include("members"):
                members_json = aud.render_json(rows, wanted) if wanted else b""
                parts.append(b'"members":[' + members_json + b"]")
            if include("list_id"):
                parts.append(b'"list_id":' + json.dumps(aud.list_id).encode())
            if include("total_items"):
                parts.append(b'"total_items":%d' % total)
            return b"{" + b",".join(parts) + b"}"
        members = aud.render(rows, wanted) if wanted else []
        members = project(members, members_tree or None, exclude.get("members") if exclude else None)
        response: dict[str, Any] = {"members": members, "list_id": aud.list_id, "total_items": total}
        return {k: v for k, v in response.items() if include(k)}


def _int_param(params: dict[str, str], name: str, default: int) -> int:
    value = params.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, "Invalid Resource", f"The {name} parameter must be an integer.") from None


def _not_allowed() -> ApiError:
    return ApiError(405, "Method Not Allowed", "The requested method and resource are not compatible.")


def _member_not_found() -> ApiError:
    return ApiError(404, "Resource Not Found", "The requested resource could not be found.")
