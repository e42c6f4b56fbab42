"""Manual use: `townhall room|mod|follow|unfollow|followers|inbox|speak|listen` (`room watch`: live
counts and stage)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime

import grpc
from rich.console import Console
from rich.table import Table

from townhall.cli import audio, moderation
from townhall.cli.endpoints import resolve, tokens
from townhall.cli.output import emit, print_json
from townhall.client import Client, Endpoints, InboxCursor
from townhall.core.auth import GRANTS
from townhall.core.errors import reason
from townhall.live import Listener, Speaker
from townhall.v1.common_pb2 import Role, Room, RoomState
from townhall.v1.inbox_pb2 import NOTIFICATION_KIND_CONNECTED, NOTIFICATION_KIND_MISSED
from townhall.v1.rooms_pb2 import RoomEvent

console = Console()


def run(args: argparse.Namespace) -> int:
    """Runs one manual command; gRPC errors are printed with their status and reason, exit code 1."""
    endpoints = resolve(args.root / "topology.json", args.admission, args.notifier, args.config, args.crowd)
    handler = {
        "room": _room,
        "mod": moderation.run,
        "follow": _follow,
        "unfollow": _unfollow,
        "followers": _followers,
        "inbox": _inbox,
        "speak": _speak,
        "listen": _listen,
    }[args.command]
    try:
        return asyncio.run(_closing(endpoints, args, handler))
    except grpc.aio.AioRpcError as exc:
        why = reason(exc)  # the ErrorInfo reason (docs/errors.md), when the server gave one
        console.print(f"[red]{exc.code().name}[/red]{f' ({why})' if why else ''}: {exc.details()}")
        return 1


async def _closing(
    endpoints: Endpoints,
    args: argparse.Namespace,
    handler: Callable[[Client, argparse.Namespace], Awaitable[int]],
) -> int:
    # The client's channels are made inside the event loop that uses them (grpc.aio binds them to it).
    client = Client(endpoints, args.user, args.token or tokens(args.config).mint(args.user))
    try:
        return await handler(client, args)
    finally:
        await client.close()


def print_token(args: argparse.Namespace) -> int:
    """`townhall token`: a development token for --user with --grants, signed with auth.keys[0]."""
    grants = {g.strip() for g in args.grants.split(",") if g.strip()}
    unknown = grants - GRANTS
    if unknown:
        console.print(f"[red]unknown grants {sorted(unknown)}; grants are {', '.join(sorted(GRANTS))}[/red]")
        return 2
    if not 0 < args.user < 2**63:
        console.print("[red]--user must be within 1..2^63-1[/red]")
        return 2
    print(tokens(args.config, args.ttl_s).mint(args.user, grants))
    return 0


def _show(args: argparse.Namespace, room: Room) -> None:
    emit(args, room)


def start_at_ms(at: str | None, in_s: float | None, now_s: float | None = None) -> int:
    """`room schedule`'s start time in Unix milliseconds, from --at (ISO 8601, local time unless it
    names a zone) or --in-s; ValueError saying what is wrong."""
    if (at is None) == (in_s is None):
        raise ValueError("room schedule needs either --at TIME or --in-s SECONDS")
    if in_s is not None:
        return int(((time.time() if now_s is None else now_s) + in_s) * 1000)
    try:
        when = datetime.fromisoformat(str(at))
    except ValueError:
        raise ValueError(f"--at {at!r} is not an ISO 8601 time such as 2026-12-24T18:00") from None
    return int(when.astimezone().timestamp() * 1000)


async def _room(client: Client, args: argparse.Namespace) -> int:
    if args.action == "list":
        rooms = await client.live_rooms()
        if args.json:
            print_json(rooms)
            return 0
        table = Table("room", "title", "host", "started")
        for room in rooms:
            started = time.strftime("%H:%M:%S", time.localtime(room.started_at_ms / 1000))
            table.add_row(room.room_id, room.title, str(room.host_id), started)
        console.print(table)
        return 0
    if not args.arg:
        console.print(
            f"[red]room {args.action} needs {'a title' if args.action == 'create' else 'a room id'}"
        )
        return 2
    if args.action == "create":
        _show(args, await client.create_room(args.arg, args.speaker))
    elif args.action == "schedule":
        try:
            at_ms = start_at_ms(args.at, args.in_s)
        except ValueError as exc:
            console.print(f"[red]{exc}[/red]")
            return 2
        _show(args, await client.schedule_room(args.arg, at_ms))
    elif args.action == "start":
        _show(args, await client.start_room(args.arg))
    elif args.action == "end":
        _show(args, await client.end_room(args.arg))
    elif args.action == "watch":
        return await _watch(client, args.arg, args.seconds, as_json=args.json)
    else:
        _show(args, await client.get_room(args.arg))
    return 0


async def _watch(client: Client, room_id: str, seconds: float, *, as_json: bool = False) -> int:
    """Prints the room's live counts, stage and events as WatchRoom sends them (docs/live-state.md); with
    --json, each update as one line of JSON (its protobuf JSON mapping), as it comes."""
    call = client.watch_room(room_id)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds or None):
            async for update in call:
                if as_json:
                    print_json(update)
                    continue
                at = time.strftime("%H:%M:%S")
                counts = f"{update.counts.listeners} listening, {update.counts.speakers} on stage"
                if update.HasField("room"):
                    state = RoomState.Name(update.room.state).removeprefix("ROOM_STATE_").lower()
                    room = update.room
                    stage = f"host {room.host_id}, co-hosts {_ids(room.cohost_ids)}"
                    stage += f", speakers {_ids(room.speaker_ids)}"
                    extra = " (resync)" if update.resync else ""
                    console.print(f"{at} [bold]{state}[/bold]{extra}: {counts}; {stage}")
                else:
                    console.print(f"{at} {counts}")
                for event in update.events:
                    console.print(f"{at}   {_event(event)}")
    call.cancel()
    return 0


def _ids(ids: Iterable[int]) -> str:
    return ",".join(map(str, ids)) or "-"


def _event(event: RoomEvent) -> str:
    kind = RoomEvent.Kind.Name(event.kind).removeprefix("KIND_").lower().replace("_", " ")
    if event.kind == RoomEvent.KIND_STATE:
        return f"{kind}: {RoomState.Name(event.state).removeprefix('ROOM_STATE_').lower()}"
    if event.kind == RoomEvent.KIND_ROLE:
        return f"user {event.user_id} is now {Role.Name(event.role).removeprefix('ROLE_').lower()}"
    return f"{kind}: user {event.user_id}"


async def _follow(client: Client, args: argparse.Namespace) -> int:
    created = await client.follow(args.followee)
    console.print(f"user {args.user} {'now follows' if created else 'already follows'} {args.followee}")
    return 0


async def _unfollow(client: Client, args: argparse.Namespace) -> int:
    removed = await client.unfollow(args.followee)
    console.print(f"user {args.user} {'no longer follows' if removed else 'did not follow'} {args.followee}")
    return 0


# The most follower ids `townhall followers` prints: more is an export, not a look.
MAX_FOLLOWERS_SHOWN = 100_000
# The largest page ListFollowers serves.
MAX_PAGE = 10_000


async def _followers(client: Client, args: argparse.Namespace) -> int:
    if not 0 <= args.limit <= MAX_FOLLOWERS_SHOWN:
        console.print(f"[red]--limit must be within 0..{MAX_FOLLOWERS_SHOWN:,}[/red]")
        return 2
    count = await client.count_followers(args.user)
    ids: list[int] = []
    if args.limit:
        async for page in client.followers(min(args.limit, MAX_PAGE)):
            ids += page[: args.limit - len(ids)]
            if len(ids) >= args.limit:
                break
    if args.json:
        print_json({"user_id": args.user, "count": count, "follower_ids": ids})
        return 0
    console.print(f"user {args.user} has {count:,} followers")
    if ids:
        more = f" (the first {len(ids):,})" if len(ids) < count else ""
        console.print(f"{', '.join(map(str, ids))}{more}")
    return 0


async def _inbox(client: Client, args: argparse.Namespace) -> int:
    cursor = InboxCursor(args.resume)
    call = client.notifications(args.resume, send_start=True)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(args.seconds):
            async for note in call:
                if not cursor.fresh(note):
                    continue
                if args.json:  # every notification, markers too (their kind says), as it arrives
                    print_json(note)
                elif note.kind == NOTIFICATION_KIND_CONNECTED:
                    continue
                elif note.kind == NOTIFICATION_KIND_MISSED:
                    console.print(
                        "[yellow]some notifications sent while you were away are no longer kept[/yellow]"
                    )
                else:
                    console.print(f"[bold]{note.title}[/bold] room={note.room_id} host={note.host_id}")
    call.cancel()
    if cursor.cursor and not args.json:
        console.print(f"to resume from here: --resume {cursor.cursor}")
    return 0


async def _speak(client: Client, args: argparse.Namespace) -> int:
    packets = audio.encode_opus(audio.read_wav(args.file))
    seconds = len(packets) * audio.FRAME_MS / 1000
    speaker = Speaker(client, args.room)
    console.print(f"speaking {len(packets)} frames ({seconds:.1f} s) into room {args.room}")
    await speaker.speak(packets)
    moves = f", moved relay {len(speaker.moves)} times" if speaker.moves else ""
    console.print(f"relays accepted {speaker.accepted} frames (last: {speaker.relay}){moves}")
    return 0 if speaker.lost == 0 else 1


async def _listen(client: Client, args: argparse.Namespace) -> int:
    listener = Listener(client, args.room)
    by_speaker: dict[int, list[bytes]] = {}
    chunks = gaps = 0
    last = (0, 0)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(args.seconds), contextlib.aclosing(listener.chunks()) as stream:
            async for chunk in stream:
                chunks += 1
                gaps += int(last[1] != 0 and chunk.epoch == last[0] and chunk.sequence != last[1] + 1)
                last = (chunk.epoch, chunk.sequence)
                for frame in chunk.frames:
                    by_speaker.setdefault(frame.speaker_id, []).append(frame.payload)
    pcm = audio.mix([audio.OpusDecoder().decode(p) for p in by_speaker.values()])
    audio.write_wav(args.out, pcm)
    frames = sum(len(p) for p in by_speaker.values())
    seconds = len(pcm) / audio.SAMPLE_RATE
    moves = f", {len(listener.moves)} relay moves" if listener.moves else ""
    console.print(f"{chunks} chunks, {frames} frames, {gaps} gaps{moves} -> {args.out} ({seconds:.1f} s)")
    return 0
