"""Request bytes that do not parse: the message names the field and what is wrong with it."""

import pytest

from townhall.core.decoding import enum_problem, has_enums, problem
from townhall.core.wire import varint
from townhall.internal.v1.events_pb2 import PresenceEvent, RelayLoad
from townhall.internal.v1.internal_pb2 import ForwardedCreate
from townhall.v1.common_pb2 import Room
from townhall.v1.rooms_pb2 import CreateRoomRequest

CREATE = CreateRoomRequest.DESCRIPTOR


def field(number: int, wire: int, body: bytes = b"") -> bytes:
    """One field's tag and body, as the wire format has it."""
    return varint(number << 3 | wire) + body


def text(number: int, data: bytes) -> bytes:
    return field(number, 2, varint(len(data)) + data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (text(1, b"\xff\xfe"), "title is not valid UTF-8 (byte 0 of the string)"),
        (text(1, b"ok \xc3\x28"), "title is not valid UTF-8 (byte 3 of the string)"),
        (text(1, b"\xed\xa0\x80"), "title is not valid UTF-8"),  # a UTF-16 surrogate
        (text(1, b"\xc0\xaf"), "title is not valid UTF-8"),  # overlong
        (field(1, 2, varint(5) + b"ab"), "title is truncated: 5 bytes announced, 2 left"),
        (
            field(2, 2, varint(3) + b"\x01\x02\x03"),
            "speaker_ids is packed in 3 bytes, not a whole number of 8",
        ),
        (field(9, 6), "field 9 has wire type 6, which does not exist"),
        (field(1, 4), "title ends a group that never started"),
        (field(7, 3) + field(1, 0, b"\x01"), "field 7: the group never ends"),
        (b"\x00\x01", "field number 0"),
        (field(3, 0, b"\xff" * 11), "varint too long"),
        (b"\x0a", "truncated varint"),
    ],
)
def test_problem_names_the_field(data: bytes, message: str) -> None:
    with pytest.raises(Exception):  # noqa: B017 - protobuf refuses these bytes too
        CreateRoomRequest.FromString(data)
    assert message in problem(CREATE, data)


def test_nested_fields_are_named_by_their_path() -> None:
    data = text(3, text(1, b"\xc3\x28"))
    with pytest.raises(Exception):  # noqa: B017
        ForwardedCreate.FromString(data)
    assert (
        problem(ForwardedCreate.DESCRIPTOR, data) == "request.title is not valid UTF-8 (byte 0 of the string)"
    )


def test_what_protobuf_accepts_is_not_a_problem() -> None:
    # A known field with another wire type, and unknown fields and groups, are kept as unknown fields.
    accepted = field(1, 0, b"\x05") + field(99, 5, b"abcd") + field(7, 3) + field(7, 4)
    CreateRoomRequest.FromString(accepted)
    assert problem(CREATE, accepted) == "it is not valid protobuf wire format"


def test_enums_outside_their_range_are_found_at_any_depth() -> None:
    assert not has_enums(CREATE)
    assert has_enums(Room.DESCRIPTOR)
    assert has_enums(PresenceEvent.DESCRIPTOR)
    assert enum_problem(Room(state=2)) == ""
    assert enum_problem(Room(state=77)).startswith(
        "state is 77, which is not a RoomState (ROOM_STATE_UNSPECIFIED=0"
    )
    assert enum_problem(PresenceEvent(kind=1, role=-3)).startswith("role is -3, which is not a Role")
    assert enum_problem(RelayLoad(rooms={"a": 3})) == ""
