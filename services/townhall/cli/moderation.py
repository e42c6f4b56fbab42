"""`townhall mod`: the stage and moderation of a room (hands, invitations, roles, mute, remove, ban)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from rich.console import Console
from rich.table import Table

from townhall.cli.output import print_json
from townhall.client import Client
from townhall.v1.common_pb2 import ROLE_COHOST, ROLE_LISTENER, ROLE_SPEAKER, Room

console = Console()

# Actions on yourself, and actions on another user (who is then required).
OWN = ("raise-hand", "lower-hand", "accept", "leave-stage")
ON_USER = ("invite", "role", "mute", "unmute", "remove", "ban", "unban")
ROLES = {"cohost": ROLE_COHOST, "speaker": ROLE_SPEAKER, "listener": ROLE_LISTENER}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers `townhall mod ACTION ROOM [TARGET]`."""
    mod = sub.add_parser(
        "mod",
        help="the stage and moderation of a room: hands, invitations, roles, mute, remove, ban",
        description="raise-hand, lower-hand, accept (an invitation), leave-stage: for yourself; "
        "invite, role (--role), mute, unmute, remove, ban, unban: on TARGET (host and co-hosts)",
    )
    mod.add_argument("action", choices=(*OWN, *ON_USER))
    mod.add_argument("room", help="the room id")
    mod.add_argument("target", nargs="?", type=int, help="the user acted on (invite, role, mute, ...)")
    mod.add_argument("--user", type=int, required=True, help="your user id")
    mod.add_argument("--role", choices=tuple(ROLES), help="the new role (role)")


async def run(client: Client, args: argparse.Namespace) -> int:
    """Makes the change and prints the room's stage as it is now."""
    action, room_id = args.action, args.room
    if action in ON_USER and args.target is None:
        console.print(f"[red]mod {action} needs the user to act on (TARGET)[/red]")
        return 2
    if action == "role" and args.role is None:
        console.print("[red]mod role needs --role cohost, speaker or listener[/red]")
        return 2
    target: int = args.target or 0
    calls = {
        "raise-hand": lambda: client.raise_hand(room_id),
        "lower-hand": lambda: client.lower_hand(room_id),
        "accept": lambda: client.accept_invite(room_id),
        "leave-stage": lambda: client.leave_stage(room_id),
        "invite": lambda: client.invite(room_id, target),
        "role": lambda: client.set_role(room_id, target, ROLES[args.role or "listener"]),
        "mute": lambda: client.mute(room_id, target, True),
        "unmute": lambda: client.mute(room_id, target, False),
        "remove": lambda: client.remove(room_id, target),
        "ban": lambda: client.remove(room_id, target, ban=True),
        "unban": lambda: client.unban(room_id, target),
    }
    room = await calls[action]()
    if args.json:
        print_json(room)
    else:
        show(room)
    return 0


def show(room: Room) -> None:
    """The stage of a room as a table."""
    table = Table("room", room.room_id, title=f"{room.title} (version {room.version})")

    def ids(values: Iterable[int]) -> str:
        return ", ".join(str(v) for v in values) or "-"

    table.add_row("host", str(room.host_id))
    table.add_row("co-hosts", ids(room.cohost_ids))
    table.add_row("speakers", ids(room.speaker_ids))
    table.add_row("muted", ids(room.muted_ids))
    table.add_row("raised hands", ids(room.hand_ids))
    table.add_row("invited", ids(room.invited_ids))
    table.add_row("banned", ids(room.banned_ids))
    console.print(table)
