"""Checks for every field that crosses the wire; each failure names the field and the rule."""

from __future__ import annotations

import re
from collections.abc import Iterable

from townhall.core.errors import InvalidArgument

ROOM_ID_MAX = 32
TITLE_MAX = 200
USER_ID_MAX = 2**63 - 1
REQUEST_ID_MAX = 64
_ROOM_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
ADDRESS_MAX = 255
_ADDRESS = re.compile(r"[A-Za-z0-9._\-\[\]:]+:[0-9]{1,5}")


def room_id(value: str, field: str = "room_id") -> str:
    """A room id: 1..32 characters of [A-Za-z0-9_-]."""
    if not value:
        raise InvalidArgument(f"{field} is required")
    if len(value) > ROOM_ID_MAX:
        raise InvalidArgument(f"{field} is {len(value)} characters; at most {ROOM_ID_MAX} allowed")
    if not _ROOM_ID.fullmatch(value):
        raise InvalidArgument(f"{field} may only contain letters, digits, '_' and '-'")
    return value


def request_id(value: str, field: str = "request_id") -> str:
    """An optional idempotency key: empty, or 1..64 characters of [A-Za-z0-9_-]."""
    if len(value) > REQUEST_ID_MAX:
        raise InvalidArgument(f"{field} is {len(value)} characters; at most {REQUEST_ID_MAX} allowed")
    if value and not _REQUEST_ID.fullmatch(value):
        raise InvalidArgument(f"{field} may only contain letters, digits, '_' and '-'")
    return value


def user_id(value: int, field: str = "user_id") -> int:
    """A user id: 1..2^63-1."""
    if value == 0:
        raise InvalidArgument(f"{field} is required (1..{USER_ID_MAX})")
    if not 0 < value <= USER_ID_MAX:
        raise InvalidArgument(f"{field} must be within 1..{USER_ID_MAX}, not {value}")
    return value


def user_ids(values: Iterable[int], field: str, limit: int) -> list[int]:
    """Distinct user ids, at most `limit` of them."""
    ids = list(values)
    if len(ids) > limit:
        raise InvalidArgument(f"{field} has {len(ids)} entries; at most {limit} allowed")
    for index, value in enumerate(ids):
        user_id(value, f"{field}[{index}]")
    if len(set(ids)) != len(ids):
        raise InvalidArgument(f"{field} has duplicate user ids")
    return ids


def title(value: str, field: str = "title") -> str:
    """Free text shown to users: 1..200 characters, no control characters."""
    if not value.strip():
        raise InvalidArgument(f"{field} is required")
    if len(value) > TITLE_MAX:
        raise InvalidArgument(f"{field} is {len(value)} characters; at most {TITLE_MAX} allowed")
    if _CONTROL.search(value):
        raise InvalidArgument(f"{field} must not contain control characters")
    return value


def bounded(value: int, field: str, low: int, high: int) -> int:
    """An integer within low..high."""
    if not low <= value <= high:
        raise InvalidArgument(f"{field} must be within {low}..{high}, not {value}")
    return value


def address(value: str, field: str) -> str:
    """A member's host:port (1..255 characters; host a name, an IPv4 or a bracketed IPv6 address)."""
    if not value:
        raise InvalidArgument(f"{field} is required (host:port)")
    if len(value) > ADDRESS_MAX:
        raise InvalidArgument(f"{field} is {len(value)} characters; at most {ADDRESS_MAX} allowed")
    if not _ADDRESS.fullmatch(value) or int(value.rpartition(":")[2]) > 65535:
        raise InvalidArgument(f"{field} must be host:port, not {value[:40]!r}")
    return value
