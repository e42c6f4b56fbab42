"""The `townhall` command's parsing: global flags after the command, --json, room schedule's time."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from townhall.cli.main import _parser
from townhall.cli.manual import start_at_ms
from townhall.cli.output import print_json
from townhall.v1.common_pb2 import ROOM_STATE_LIVE, Room


def test_global_flags_are_taken_after_the_command() -> None:
    args = _parser().parse_args(
        ["room", "get", "r1", "--user", "5", "--admission", "10.0.0.1:50051", "--json", "--root", "/tmp/th"]
    )
    assert (args.command, args.action, args.arg, args.user) == ("room", "get", "r1", 5)
    assert args.admission == "10.0.0.1:50051" and args.json is True and args.root == Path("/tmp/th")


def test_global_flags_before_the_command_are_kept() -> None:
    """A flag given before the command is not reset by the command's copy of it."""
    args = _parser().parse_args(["--admission", "a:1", "--json", "followers", "--user", "5"])
    assert args.admission == "a:1" and args.json is True and args.limit == 100
    plain = _parser().parse_args(["followers", "--user", "5"])
    assert plain.admission is None and plain.json is False and plain.root == Path(".townhall")


def test_nested_commands_take_global_flags_too() -> None:
    args = _parser().parse_args(["graph", "import", "pairs.bin", "--config", "t.toml"])
    assert (args.action, args.config) == ("import", "t.toml")


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "--json", "--root", "/tmp/th"],
        ["inbox", "--user", "3", "--json"],
        ["room", "list", "--user", "3", "--json"],
        ["mod", "raise-hand", "r1", "--user", "3", "--token", "t"],
    ],
)
def test_every_command_accepts_the_global_flags(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    assert args.command == argv[0]


def test_room_schedule_start_time() -> None:
    now = 1_800_000_000.0
    assert start_at_ms(None, 90, now) == 1_800_000_090_000
    at = datetime(2027, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert start_at_ms(at.isoformat(), None) == int(at.timestamp() * 1000)
    local = datetime(2027, 1, 2, 3, 4, 5)  # no zone: local time
    assert start_at_ms(local.isoformat(), None) == int(local.timestamp() * 1000)
    with pytest.raises(ValueError, match="either --at"):
        start_at_ms(None, None)
    with pytest.raises(ValueError, match="either --at"):
        start_at_ms("2027-01-02", 5)
    with pytest.raises(ValueError, match="not an ISO 8601"):
        start_at_ms("tomorrow", None)


def test_json_output_is_one_line_with_messages_as_their_json_mapping(
    capsys: pytest.CaptureFixture[str],
) -> None:
    room = Room(room_id="r1", host_id=5, speaker_ids=[7], state=ROOM_STATE_LIVE)
    print_json({"rooms": [room], "count": 1})
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert json.loads(out) == {
        "rooms": [{"roomId": "r1", "hostId": "5", "speakerIds": ["7"], "state": "ROOM_STATE_LIVE"}],
        "count": 1,
    }
