"""Request bytes a server refuses before any servicer sees them, with a message naming the field.

protobuf's own parse error says only "Error parsing message" (bad UTF-8, a truncated field or a
corrupt tag all read the same); `problem` walks the wire format of bytes that failed to parse and
says which field is wrong and how. It runs only on the error path. `enum_problem` checks what proto3
accepts silently: an enum field holding a number its enum does not define.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from townhall.core.wire import read_varint

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
_MAX_DEPTH = 32
# The wire types a field of each type may arrive as (packed repeated scalars come as LEN).
_FIXED64 = {FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64, FieldDescriptor.TYPE_DOUBLE}
_FIXED32 = {FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_FLOAT}


def problem(descriptor: Descriptor, data: bytes) -> str:
    """Why `data` is not a valid `descriptor` message, naming the field where it can."""
    try:
        found = _walk(descriptor, bytes(data), "", 0)
    except DecodeError as exc:
        found = f"the wire format is corrupt ({exc})"
    return found or "it is not valid protobuf wire format"


def _walk(descriptor: Descriptor | None, data: bytes, prefix: str, depth: int) -> str:
    """The first problem in `data` read as a `descriptor` message (None: an unknown group's fields)."""
    if depth > _MAX_DEPTH:
        return f"messages are nested more than {_MAX_DEPTH} deep at {prefix.rstrip('.') or 'the top'}"
    pos = 0
    while pos < len(data):
        tag, pos = read_varint(data, pos)
        number, wire = tag >> 3, tag & 7
        field = descriptor.fields_by_number.get(number) if descriptor is not None else None
        name = f"{prefix}{field.name}" if field else f"{prefix}field {number}"
        if number == 0:
            return f"a tag names field number 0 (corrupt) at byte {pos}"
        if wire in (VARINT, I64, I32):
            pos = _skip_scalar(data, pos, wire)
        elif wire == LEN:
            size, pos = read_varint(data, pos)
            if pos + size > len(data):
                return f"{name} is truncated: {size} bytes announced, {len(data) - pos} left"
            # A known field that arrives with another wire type is kept as an unknown field.
            found = _length_delimited(field, data[pos : pos + size], name, depth) if field else ""
            if found:
                return found
            pos += size
        elif wire == SGROUP:
            end = _group_end(data, pos, number, depth + 1)
            if isinstance(end, str):
                return f"{name}: {end}"
            pos = end
        elif wire == EGROUP:
            return f"{name} ends a group that never started"
        else:
            return f"{name} has wire type {wire}, which does not exist"
        if pos > len(data):
            return f"{name} is truncated"
    return ""


def _skip_scalar(data: bytes, pos: int, wire: int) -> int:
    """The position after a varint or fixed-width value."""
    if wire == VARINT:
        return read_varint(data, pos)[1]
    return pos + (8 if wire == I64 else 4)


def _length_delimited(field: FieldDescriptor, value: bytes, name: str, depth: int) -> str:
    if field.type == FieldDescriptor.TYPE_STRING:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"{name} is not valid UTF-8 (byte {exc.start} of the string)"
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        return _walk(field.message_type, value, f"{name}.", depth + 1)
    elif not field.is_repeated or field.type == FieldDescriptor.TYPE_BYTES:
        return ""  # a singular scalar as LEN is kept as an unknown field
    elif field.type in _FIXED64 and len(value) % 8:
        return f"{name} is packed in {len(value)} bytes, not a whole number of 8-byte values"
    elif field.type in _FIXED32 and len(value) % 4:
        return f"{name} is packed in {len(value)} bytes, not a whole number of 4-byte values"
    elif field.type not in _FIXED64 | _FIXED32:
        pos = 0
        while pos < len(value):
            try:
                _, pos = read_varint(value, pos)
            except DecodeError:
                return f"{name} is packed with a truncated or overlong varint"
    return ""


def _group_end(data: bytes, pos: int, number: int, depth: int) -> int | str:
    """The position after the end of the group that started before `pos`, or what is wrong with it."""
    if depth > _MAX_DEPTH:
        return f"groups are nested more than {_MAX_DEPTH} deep"
    while pos < len(data):
        tag, pos = read_varint(data, pos)
        inner, wire = tag >> 3, tag & 7
        if wire == EGROUP:
            return pos if inner == number else f"the group ends with field {inner}'s end tag"
        if wire in (VARINT, I64, I32):
            pos = _skip_scalar(data, pos, wire)
        elif wire == LEN:
            size, pos = read_varint(data, pos)
            pos += size
        elif wire == SGROUP:
            end = _group_end(data, pos, inner, depth + 1)
            if isinstance(end, str):
                return end
            pos = end
        else:
            return f"wire type {wire} does not exist"
    return "the group never ends (truncated)"


def has_enums(descriptor: Descriptor, _seen: frozenset[str] = frozenset()) -> bool:
    """Whether a message of this type can hold an enum field (at any depth)."""
    if descriptor.full_name in _seen:
        return False
    seen = _seen | {descriptor.full_name}
    for field in descriptor.fields:
        if field.enum_type is not None:
            return True
        if field.message_type is not None and has_enums(field.message_type, seen):
            return True
    return False


def enum_problem(message: Message, prefix: str = "", depth: int = 0) -> str:
    """The first enum field holding a number its enum does not define ("" if none)."""
    if depth > _MAX_DEPTH:
        return ""
    for field, value in message.ListFields():
        name = f"{prefix}{field.name}"
        repeated = field.is_repeated
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            field = field.message_type.fields_by_name["value"]
            values = list(value.values())
        else:
            values = list(value) if repeated else [value]
        if field.enum_type is not None:
            for item in values:
                if item not in field.enum_type.values_by_number:
                    enum = field.enum_type
                    return f"{name} is {item}, which is not a {enum.name} ({_names(enum)})"
        elif field.message_type is not None:
            for item in values:
                found = enum_problem(item, f"{name}.", depth + 1)
                if found:
                    return found
    return ""


def _names(enum: EnumDescriptor) -> str:
    return ", ".join(f"{v.name}={v.number}" for v in enum.values)
