"""Room-change latency through RoomStore on a real broker: changes of one room (the room's producer
claimed), then rooms created (each a room's first change: a claim and a catch-up). docs/ownership.md.

`python -m townhall_tools.bench.room_changes --changes 200` (a broker of its own unless --bootstrap).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from townhall.admission.store import RoomStore
from townhall.core.config import DEV_ENV, KafkaConfig, load
from townhall.core.kafka import ensure_topics, producer
from townhall.core.provenance import ADMISSION, RecordSigner, Writer
from townhall.core.room_records import AnyOwner, RoomRecords
from townhall.v1.common_pb2 import Room
from townhall_tools.bench.stats import percentile
from townhall_tools.devtools.kafka_broker import Broker, free_port

HOST = 7_000


def _ms(values: list[float]) -> dict[str, float | None]:
    return {
        f"p{round(q * 100)}_ms": round(v, 2) if (v := percentile(values, q)) is not None else None
        for q in (0.5, 0.99)
    }


async def measure(bootstrap: str, changes: int, creates: int) -> dict[str, Any]:
    """Times `changes` changes of one room, then `creates` new rooms, on a fresh topic prefix."""
    auth = load(env=DEV_ENV).auth
    kafka = KafkaConfig(bootstrap=bootstrap, topic_prefix=f"bench-room-changes-{time.time_ns()}")
    await ensure_topics(kafka)
    shared = producer(kafka, client_id="bench-room-changes")
    await shared.start()
    store = RoomStore(
        kafka, shared, RecordSigner(auth, Writer(ADMISSION, "bench")), RoomRecords(kafka, auth, AnyOwner())
    )
    try:
        await store.load()
        await store.follow()
        room_id = (await store.create(HOST, "bench", [], 0, "bench-room")).room_id

        def retitled(room: Room) -> Room:
            changed = Room()
            changed.CopyFrom(room)
            changed.version, changed.title = room.version + 1, f"bench {room.version + 1}"
            return changed

        changed: list[float] = []
        for _ in range(changes):
            started = time.perf_counter()
            await store.change(room_id, "bench", retitled)
            changed.append((time.perf_counter() - started) * 1000)
        created: list[float] = []
        for n in range(creates):
            started = time.perf_counter()
            await store.create(HOST, "bench", [], 0, f"bench-new-{n}")
            created.append((time.perf_counter() - started) * 1000)
    finally:
        await store.stop()
        await shared.stop()
    return {"changes": changes, "change": _ms(changed), "creates": creates, "create": _ms(created)}


def run(out_dir: Path, changes: int = 200, creates: int = 100, bootstrap: str = "") -> dict[str, Any]:
    """Measures (on a broker of its own unless `bootstrap`), prints, writes out_dir/room_changes.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    broker = None
    if not bootstrap:
        broker = Broker(out_dir / "room-changes-kafka", port=free_port())
        broker.start()
        bootstrap = broker.bootstrap
    try:
        report = asyncio.run(measure(bootstrap, changes, creates))
    finally:
        if broker is not None:
            broker.stop()
    print(json.dumps(report))
    (out_dir / "room_changes.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m townhall_tools.bench.room_changes", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(".townhall/bench"))
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--creates", type=int, default=100)
    parser.add_argument("--bootstrap", default="", help="an existing broker (default: start one)")
    args = parser.parse_args()
    run(args.out, args.changes, args.creates, args.bootstrap)


if __name__ == "__main__":
    main()
