"""Checks for every field that crosses the wire; each failure names the field and the rule."""

from __future__ import annotations

import re
from collections.abc import Iterable

from google.protobuf.descriptor import EnumDescriptor

from townhall.core.errors import InvalidArgument
from townhall.v1.common_pb2 import Room, RoomState

ROOM_ID_MAX = 32
TITLE_MAX = 200
USER_ID_MAX = 2**63 - 1
REQUEST_ID_MAX = 64
_ROOM_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Characters that make a title show something else than it says: bidirectional controls (a "Trojan
# Source" title reads backwards), zero-width characters (two titles that look the same differ, words
# hide inside others), line and paragraph separators. Each is named in the refusal.
_INVISIBLE = {
    "\u061c": "ARABIC LETTER MARK",
    "\u180e": "MONGOLIAN VOWEL SEPARATOR",
    "\u200b": "ZERO WIDTH SPACE",
    "\u200c": "ZERO WIDTH NON-JOINER",
    "\u200d": "ZERO WIDTH JOINER",
    "\u200e": "LEFT-TO-RIGHT MARK",
    "\u200f": "RIGHT-TO-LEFT MARK",
    "\u2028": "LINE SEPARATOR",
    "\u2029": "PARAGRAPH SEPARATOR",
    "\u202a": "LEFT-TO-RIGHT EMBEDDING",
    "\u202b": "RIGHT-TO-LEFT EMBEDDING",
    "\u202c": "POP DIRECTIONAL FORMATTING",
    "\u202d": "LEFT-TO-RIGHT OVERRIDE",
    "\u202e": "RIGHT-TO-LEFT OVERRIDE",
    "\u2060": "WORD JOINER",
    "\u2061": "FUNCTION APPLICATION",
    "\u2062": "INVISIBLE TIMES",
    "\u2063": "INVISIBLE SEPARATOR",
    "\u2064": "INVISIBLE PLUS",
    "\u2066": "LEFT-TO-RIGHT ISOLATE",
    "\u2067": "RIGHT-TO-LEFT ISOLATE",
    "\u2068": "FIRST STRONG ISOLATE",
    "\u2069": "POP DIRECTIONAL ISOLATE",
    "\ufeff": "ZERO WIDTH NO-BREAK SPACE",
}
_INVISIBLE_RE = re.compile("[" + "".join(_INVISIBLE) + "]")
_ZWJ = "\u200d"
ADDRESS_MAX = 255
# What a room may hold (common.proto): every list is bounded, so a room-state record stays small.
MAX_SPEAKERS = 12
MAX_COHOSTS = 2
MAX_HANDS = 100
MAX_INVITES = 20
MAX_BANS = 1_000
MAX_REMOVALS = 256
MAX_LISTENER_LIMIT = 10_000_000
# Rooms a relay's load report may name as lost (RelayLoad.lost): the relay keeps the latest ones.
MAX_LOST_ROOMS = 1_000
_ROOM_LISTS = (
    ("speaker_ids", MAX_SPEAKERS),
    ("cohost_ids", MAX_COHOSTS),
    ("muted_ids", 1 + MAX_COHOSTS + MAX_SPEAKERS),
    ("hand_ids", MAX_HANDS),
    ("invited_ids", MAX_INVITES),
    ("banned_ids", MAX_BANS),
)
_ADDRESS = re.compile(r"[A-Za-z0-9._\-\[\]:]+:[0-9]{1,5}")


def room_id(value: str, field: str = "room_id") -> str:
    """A room id: 1..32 characters of [A-Za-z0-9_-]."""
    if not value:
        raise InvalidArgument(f"{field} is required", field)
    if len(value) > ROOM_ID_MAX:
        raise InvalidArgument(f"{field} is {len(value)} characters; at most {ROOM_ID_MAX} allowed", field)
    if not _ROOM_ID.fullmatch(value):
        raise InvalidArgument(f"{field} may only contain letters, digits, '_' and '-'", field)
    return value


def request_id(value: str, field: str = "request_id") -> str:
    """An optional idempotency key: empty, or 1..64 characters of [A-Za-z0-9_-]."""
    if len(value) > REQUEST_ID_MAX:
        raise InvalidArgument(f"{field} is {len(value)} characters; at most {REQUEST_ID_MAX} allowed", field)
    if value and not _REQUEST_ID.fullmatch(value):
        raise InvalidArgument(f"{field} may only contain letters, digits, '_' and '-'", field)
    return value


def user_id(value: int, field: str = "user_id") -> int:
    """A user id: 1..2^63-1."""
    if value == 0:
        raise InvalidArgument(f"{field} is required (1..{USER_ID_MAX})", field)
    if not 0 < value <= USER_ID_MAX:
        raise InvalidArgument(f"{field} must be within 1..{USER_ID_MAX}, not {value}", field)
    return value


def user_ids(values: Iterable[int], field: str, limit: int) -> list[int]:
    """Distinct user ids, at most `limit` of them."""
    ids = list(values)
    if len(ids) > limit:
        raise InvalidArgument(f"{field} has {len(ids)} entries; at most {limit} allowed", field)
    if ids and not (min(ids) > 0 and max(ids) <= USER_ID_MAX):  # else name the first one out of range
        for index, value in enumerate(ids):
            user_id(value, f"{field}[{index}]")
    if len(set(ids)) != len(ids):
        raise InvalidArgument(f"{field} has duplicate user ids", field)
    return ids


def title(value: str, field: str = "title") -> str:
    """Free text shown to users: 1..200 characters, no control, bidirectional or zero-width characters
    (a zero width joiner only inside an emoji sequence, as in 👩‍💻)."""
    if not value.strip():
        raise InvalidArgument(f"{field} is required", field)
    if len(value) > TITLE_MAX:
        raise InvalidArgument(f"{field} is {len(value)} characters; at most {TITLE_MAX} allowed", field)
    if _CONTROL.search(value):
        raise InvalidArgument(f"{field} must not contain control characters", field)
    for found in _INVISIBLE_RE.finditer(value):
        at = found.start()
        if found.group() == _ZWJ and _emoji_joined(value, at):
            continue
        raise InvalidArgument(
            f"{field} must not contain bidirectional or invisible characters: "
            f"U+{ord(found.group()):04X} {_INVISIBLE[found.group()]} at position {at}",
            field,
        )
    return value


def _emoji(char: str) -> bool:
    """Whether `char` can be part of an emoji ZWJ sequence (pictographs, symbols, VS16, skin tones)."""
    code = ord(char)
    return code >= 0x1F000 or 0x2600 <= code <= 0x27BF or code in (0xFE0F, 0x2640, 0x2642, 0x2695)


def _emoji_joined(value: str, at: int) -> bool:
    """Whether the zero width joiner at `at` joins two emoji (👨‍👩‍👧), its one legitimate use in a title."""
    return 0 < at < len(value) - 1 and _emoji(value[at - 1]) and _emoji(value[at + 1])


def bounded(value: int, field: str, low: int, high: int) -> int:
    """An integer within low..high."""
    if not low <= value <= high:
        raise InvalidArgument(f"{field} must be within {low}..{high}, not {value}", field)
    return value


def enum_value(value: int, enum: EnumDescriptor, field: str) -> int:
    """A value the proto enum names (an unknown one from a newer client is refused, not guessed at)."""
    if value not in enum.values_by_number:
        names = ", ".join(v.name for v in enum.values)
        raise InvalidArgument(f"{field} is {value}, not one of {names}", field)
    return value


def address(value: str, field: str) -> str:
    """A member's host:port (1..255 characters; host a name, an IPv4 or a bracketed IPv6 address)."""
    if not value:
        raise InvalidArgument(f"{field} is required (host:port)", field)
    if len(value) > ADDRESS_MAX:
        raise InvalidArgument(f"{field} is {len(value)} characters; at most {ADDRESS_MAX} allowed", field)
    if not _ADDRESS.fullmatch(value) or int(value.rpartition(":")[2]) > 65535:
        raise InvalidArgument(f"{field} must be host:port, not {value[:40]!r}", field)
    return value


def stored_room(room: Room) -> Room:
    """A room version read from the room-state topic, checked against what the rules can produce.

    Sizes and ranges only (the title's length, not the rules a new title must meet today), so a room
    written by an earlier version that passed its own checks is never refused.
    """
    room_id(room.room_id, "room_id")
    user_id(room.host_id, "host_id")
    if room.state not in RoomState.values() or room.state == RoomState.ROOM_STATE_UNSPECIFIED:
        raise InvalidArgument(f"state {room.state} is not a room state", "state")
    if room.version < 1:
        raise InvalidArgument("version must be at least 1", "version")
    if len(room.title) > TITLE_MAX:
        raise InvalidArgument(f"title is {len(room.title)} characters; at most {TITLE_MAX} allowed", "title")
    bounded(room.listener_limit, "listener_limit", 0, MAX_LISTENER_LIMIT)
    for name in ("created_at_ms", "started_at_ms", "ended_at_ms", "scheduled_start_ms"):
        if getattr(room, name) < 0:
            raise InvalidArgument(f"{name} must not be negative", name)
    for name, limit in _ROOM_LISTS:
        user_ids(getattr(room, name), name, limit)
    if len(room.removals) > MAX_REMOVALS:
        raise InvalidArgument(
            f"removals has {len(room.removals)} entries; at most {MAX_REMOVALS} allowed", "removals"
        )
    for index, removal in enumerate(room.removals):
        user_id(removal.user_id, f"removals[{index}].user_id")
        bounded(removal.version, f"removals[{index}].version", 1, room.version)
    return room
