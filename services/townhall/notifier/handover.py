"""Moving graph keys to their owner when the notifiers' membership changes (the handover).

A key ("user:<id>": a followee's followers; "room:<id>": a room's reminder list) lives on the member
that owns it by rendezvous hashing over this notifier's view of the members. When the view changes
(the StatefulSet is scaled), some keys get a new owner while their data is still where it was. The new
owner *settles* a key before it serves it: it asks each notifier that may still hold part of it to hand
it over (Handover), stores what they stream, then tells them to drop their copy (Release). A holder
marks the key moved in the same store call that starts its handover, so any later read or write of the
key there is refused and sent on to the new owner: every change of a key is applied where the key is.

Each holder also moves what it holds on its own after every view change (the sweep): for each key it
holds that another notifier owns, it asks that owner to settle it (Settle). A sweep that finds nothing
to move leaves the holder *drained* for that view; it says so in its Handover answers, and owners stop
asking it. In steady state every member is drained, so a settle costs a set lookup. What this process
knows (its view, the previous one, who is drained) is kept in the store, so a restart asks no one.

Who may hold part of a key: every member not known to be drained in this view, and the departed member
that owned the key in the previous view (scaled away: it hands everything over before it exits). A
holder that does not answer makes the settle UNAVAILABLE (the caller retries): no read answers from a
partial key, no write lands where it would be lost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from townhall.core import logging, sharding
from townhall.core.errors import FailedPrecondition, InvalidArgument, TownhallError, Unavailable
from townhall.core.tasks import cancel, supervise
from townhall.internal.v1 import internal_pb2
from townhall.notifier.metrics import HANDOVER_KEYS, HANDOVER_PENDING
from townhall.notifier.peers import NotifierChannels
from townhall.notifier.placement import ShardOwners
from townhall.notifier.store import STORE_ERRORS, SqliteFollowerStore, split_key

log = logging.get(__name__)

HANDOVER_TIMEOUT_S = 600.0  # streaming one key: a celebrity's 100M followers take about 110 s
RPC_TIMEOUT_S = 10.0
CONNECT_S = 5.0  # how long a call waits for a peer it cannot reach before it counts as not answering
SWEEP_RETRY_S = 2.0
MAX_SETTLED = 100_000  # keys remembered as settled in this view; one forgotten is settled again
VIEW_META = "view"
SHARDS = "/townhall.internal.v1.GraphShards/"


@dataclass(frozen=True)
class View:
    """A view of the notifiers: its epoch and members, the previous view's members, who is drained."""

    epoch: int
    members: tuple[str, ...]
    previous: tuple[str, ...]
    drained: frozenset[str]  # members known to hold nothing of another's in this view
    me_drained: bool  # this process's last sweep in this view found nothing to move

    def dumps(self) -> str:
        return json.dumps(
            {
                "epoch": self.epoch,
                "members": list(self.members),
                "previous": list(self.previous),
                "drained": sorted(self.drained),
                "me_drained": self.me_drained,
            }
        )

    @staticmethod
    def loads(text: str) -> View:
        data = json.loads(text)
        return View(
            int(data["epoch"]),
            tuple(data["members"]),
            tuple(data["previous"]),
            frozenset(data["drained"]),
            bool(data["me_drained"]),
        )


class Handover:
    """Settles keys this notifier owns, hands over keys it holds for others, and sweeps."""

    def __init__(
        self, store: SqliteFollowerStore, placement: ShardOwners, peers: NotifierChannels, static: bool = True
    ) -> None:
        self._store = store
        self._placement = placement
        self._peers = peers
        # Static members never change while running: a Handover in another epoch is refused.
        self._static = static
        self._view = View(placement.epoch, placement.members, placement.members, frozenset(), False)
        self._settled: dict[str, None] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._swept = asyncio.Event()  # set when this process is drained in the current view
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.on_view: list[Callable[[tuple[str, ...], tuple[str, ...]], None]] = []

    @property
    def me(self) -> str:
        """This process's member address."""
        return self._placement.me

    @property
    def epoch(self) -> int:
        """The epoch of this process's view."""
        return self._view.epoch

    @property
    def steady(self) -> bool:
        """Whether no key can be elsewhere: every other member is drained and nothing was handed over."""
        view = self._view
        others = (set(view.members) | set(view.previous)) - {self.me}
        return others <= view.drained and not self._store.has_markers

    def forget(self, key: str) -> None:
        """Settles `key` again before its next use."""
        self._settled.pop(key, None)

    @property
    def drained(self) -> bool:
        """Whether this process holds nothing that another owns in its view."""
        return self._view.me_drained

    async def load(self) -> None:
        """Reads what this process knew before it stopped (its view and who was drained)."""
        text = await self._store.meta(VIEW_META)
        if text is not None:
            self._view = View.loads(text)
            self._placement.set_view(self._view.members, self._view.epoch)
        if self._view.me_drained:
            self._swept.set()

    async def set_view(self, members: Iterable[str], epoch: int) -> bool:
        """A new view of the members (at start, and when the membership changes); True if it changed."""
        members = tuple(sorted(set(members)))
        old = self._view
        if (members, epoch) == (old.members, old.epoch):
            return False
        if epoch < old.epoch:
            log.warning("older notifier membership ignored", epoch=epoch, current=old.epoch)
            return False
        self._placement.set_view(members, epoch)
        previous = old.members if members != old.members else old.previous
        self._view = View(epoch, members, previous, frozenset(), False)
        self._settled.clear()
        self._swept.clear()
        await self._store.set_meta(VIEW_META, self._view.dumps())
        log.info("notifier members changed", members=members, epoch=epoch, before=old.members)
        for callback in self.on_view:
            callback(old.members, members)
        self._wake.set()
        return True

    # --- the owner's side --------------------------------------------------------------------

    def holders(self, key: str) -> list[str]:
        """The notifiers that may still hold part of `key`, which this process owns."""
        view = self._view
        current = set(view.members)
        found = [m for m in view.members if m != self.me and m not in view.drained]
        departed = [m for m in view.previous if m not in current and m != self.me and m not in view.drained]
        if departed:
            before = sharding.owner(key, view.previous)
            found += [m for m in departed if m == before]
        return found

    async def settle(self, key: str, holder: str | None = None) -> None:
        """Makes sure every part of `key` (owned here) is here before it is served.

        `holder` is asked in any case (it says it holds part of the key). UNAVAILABLE if a notifier that
        may hold part of the key does not answer, or the membership is changing under this call.
        """
        if holder is None and key in self._settled:
            return
        holders = self.holders(key)
        if holder is not None and holder not in holders and holder != self.me:
            holders.append(holder)
        if not holders and not self._store.has_markers:
            return  # steady state: no one else holds anything, nothing was handed over from here
        running = self._running.get(key)
        if running is None or holder is not None:
            if running is not None:
                await asyncio.shield(running)
            running = asyncio.create_task(self._settle(key, holders), name="notifier-settle")
            self._running[key] = running
            running.add_done_callback(lambda done: self._settled_one(key, done))
        await asyncio.shield(running)

    def _settled_one(self, key: str, done: asyncio.Task[None]) -> None:
        if self._running.get(key) is done:
            del self._running[key]
        # Its callers see its failure; one whose caller went away (a cancelled call) is not an error here.
        if not done.cancelled():
            done.exception()

    async def _settle(self, key: str, holders: list[str]) -> None:
        epoch = self._placement.epoch
        for holder in holders:
            try:
                await self._pull(key, holder, epoch)
            except Unavailable:
                # A notifier scaled away is gone once it has handed everything over; the others may
                # have heard it say so.
                if holder in self._view.members or not await self._heard_drained(holder, epoch):
                    raise
        moved = await self._store.moved_to(key)
        if moved is not None and moved[1] <= epoch:
            # Handed over in an older view and owned here again: taken back (the pulls above).
            await self._store.unmark(key)
        if epoch == self._placement.epoch and (moved is None or moved[1] <= epoch):
            if len(self._settled) >= MAX_SETTLED:
                self._settled.pop(next(iter(self._settled)))
            self._settled[key] = None

    async def _pull(self, key: str, holder: str, epoch: int) -> None:
        if not await self._peers.ready(holder, CONNECT_S):
            raise Unavailable(
                f"notifier {holder} may still hold part of {key} (the notifiers are changing) and cannot be "
                "reached; retry"
            )
        stub = self._peers.shards(holder)
        request = internal_pb2.HandoverRequest(key=key, owner=self.me, epoch=epoch)
        last = None
        taken = 0
        try:
            metadata = self._peers.forwarding.internal(holder, SHARDS + "Handover")
            async for chunk in stub.Handover(request, metadata=metadata, timeout=HANDOVER_TIMEOUT_S):
                if chunk.ids:
                    ids = np.frombuffer(chunk.ids, dtype="<u8").astype(np.uint64)
                    taken += await self._store.take_in(key, ids)
                if chunk.last:
                    last = chunk
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise Unavailable(f"the notifiers' membership is changing ({exc.details()}); retry") from exc
            raise Unavailable(
                f"notifier {holder} may still hold part of {key} (the notifiers are changing) and did "
                f"not answer ({exc.code().name}); retry"
            ) from exc
        if last is None:
            raise Unavailable(f"notifier {holder} ended the handover of {key} early; retry")
        if taken:
            HANDOVER_KEYS.labels("taken").inc()
            log.info("key taken over", key=key, holder=holder, ids=taken)
        # Stored here already: if the holder does not hear this, it keeps a copy it will not serve, and
        # drops it when its sweep has this process settle the key again.
        await self._call(
            holder, "Release", internal_pb2.ReleaseRequest(key=key, owner=self.me), RPC_TIMEOUT_S
        )
        if last.drained and last.epoch == epoch:
            await self.mark_drained(holder, epoch)

    async def mark_drained(self, holder: str, epoch: int) -> None:
        """`holder` holds nothing another notifier owns in view `epoch`: it need not be asked again."""
        view = self._view
        if epoch != view.epoch or holder in view.drained or holder == self.me:
            return
        self._view = dataclasses.replace(view, drained=view.drained | {holder})
        await self._store.set_meta(VIEW_META, self._view.dumps())

    def known_drained(self, epoch: int) -> list[str]:
        """The members this process knows to be drained in view `epoch` (itself included)."""
        view = self._view
        if epoch != view.epoch:
            return []
        return sorted(view.drained | ({self.me} if view.me_drained else set()))

    async def _heard_drained(self, holder: str, epoch: int) -> bool:
        """Whether another member heard `holder` say it is drained in view `epoch`."""
        request = internal_pb2.DrainedRequest(epoch=epoch)
        for member in self._view.members:
            reply = None if member == self.me else await self._call(member, "Drained", request, RPC_TIMEOUT_S)
            if reply is not None and reply.epoch == epoch and holder in reply.drained:
                await self.mark_drained(holder, epoch)
                return True
        return False

    async def _call(self, member: str, method: str, request: Any, timeout_s: float) -> Any:
        """One unary GraphShards call to `member`; None if it cannot be reached or refuses (logged)."""
        if not await self._peers.ready(member, CONNECT_S):
            return None
        metadata = self._peers.forwarding.internal(member, SHARDS + method)
        try:
            return await getattr(self._peers.shards(member), method)(
                request, metadata=metadata, timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            log.info("notifier did not answer", member=member, method=method, error=exc.code().name)
            return None

    # --- the holder's side -------------------------------------------------------------------

    async def give(self, key: str, owner: str, epoch: int) -> AsyncIterator[internal_pb2.HandoverChunk]:
        """Hands `key` to `owner` (its owner in view `epoch`): marks it moved here, streams what is here."""
        _check_key(key)
        mine = self._placement.epoch
        if owner == self.me:
            raise InvalidArgument("owner is this notifier: a key is not handed over to its holder", "owner")
        if epoch < mine:
            raise FailedPrecondition(f"this notifier's view of the members is newer (epoch {mine} > {epoch})")
        if epoch == mine and self._placement.owner(key) != owner:
            raise FailedPrecondition(f"{owner} does not own {key} in epoch {epoch}")
        if epoch > mine and self._static:
            raise FailedPrecondition("static notifier members do not change while running; restart with them")
        if self._placement.owns(key) or await self._store.holds(key):
            # From here on every read or write of the key in this store is refused and sent on.
            # (A key this process neither owns nor holds is never read or written here: no mark.)
            await self._store.mark_moved(key, owner, epoch)
            self._settled.pop(key, None)
        async for ids in self._store.export(key):
            yield internal_pb2.HandoverChunk(ids=np.ascontiguousarray(ids, dtype="<u8").tobytes())
        HANDOVER_KEYS.labels("given").inc()
        yield internal_pb2.HandoverChunk(last=True, epoch=mine, drained=self.drained)

    async def release(self, key: str, owner: str) -> int:
        """`owner` has stored what was handed to it: drops the copy here."""
        _check_key(key)
        return await self._store.release(key, owner)

    async def settle_for(self, key: str, holder: str, epoch: int) -> None:
        """A holder's sweep asks this process (the owner) to take `key` over now."""
        _check_key(key)
        mine = self._placement.epoch
        if epoch > mine:
            raise FailedPrecondition(f"this notifier's view of the members is older (epoch {mine} < {epoch})")
        if not self._placement.owns(key):
            raise FailedPrecondition(f"this notifier does not own {key} in epoch {mine}")
        await self.settle(key, holder)

    # --- the sweep ---------------------------------------------------------------------------

    def start(self) -> None:
        """Sweeps in the background after every view change (and now, unless drained already)."""
        if not self._view.me_drained:
            self._wake.set()
        self._task = supervise(self._run(), "notifier-sweep")

    async def close(self) -> None:
        """Stops sweeping, and the settles under way."""
        await cancel(self._task, *self._running.values())
        self._task = None

    async def wait_drained(self, timeout_s: float) -> bool:
        """Waits until a sweep in the current view found nothing to move; False after `timeout_s`."""
        try:
            await asyncio.wait_for(self._swept.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                left = await self.sweep()
            except (*STORE_ERRORS, TownhallError, grpc.aio.AioRpcError, TimeoutError) as exc:
                log.warning("sweep failed, will retry", error=repr(exc))
                left = -1
            if left:
                await asyncio.sleep(SWEEP_RETRY_S)
                self._wake.set()

    async def sweep(self) -> int:
        """Asks the owners of every key held here and owned elsewhere to take it; returns how many are
        left (0: drained in this view)."""
        view = self._view
        left = 0
        after = ""
        while keys := await self._store.keys_after(after):
            after = keys[-1]
            foreign = [k for k in keys if not self._placement.owns(k)]
            HANDOVER_PENDING.set(left + len(foreign))
            for key in foreign:
                if not self._still(view):
                    return -1  # the view changed: sweep again in the new one
                if not await self._ask(key, view.epoch):
                    left += 1
        for key, _owner, _epoch in await self._store.markers():
            # Not owned here in this view: calls for it are forwarded by the view, the marker is moot.
            if not self._placement.owns(key) and not await self._store.holds(key):
                await self._store.unmark(key)
        HANDOVER_PENDING.set(left)
        if left == 0:
            if not self._still(view):
                return -1
            # The view object itself may have been replaced meanwhile (others heard drained): keep that.
            self._view = dataclasses.replace(self._view, me_drained=True)
            await self._store.set_meta(VIEW_META, self._view.dumps())
            log.info("notifier drained: it holds nothing another notifier owns", epoch=view.epoch)
            # Told to every notifier, so none asks again (a notifier scaled away must be heard before
            # it stops: its keys' owners cannot ask it afterwards).
            if not await self._announce(view):
                return -1
            self._swept.set()
        return left

    def _still(self, view: View) -> bool:
        """Whether this process's view is still `view`'s epoch and members (who is drained may differ)."""
        return (self._view.epoch, self._view.members) == (view.epoch, view.members)

    async def _announce(self, view: View) -> bool:
        """Tells every other notifier this one is drained in `view`; True once all members have heard it."""
        request = internal_pb2.DrainedRequest(holder=self.me, epoch=view.epoch)
        heard = True
        for member in sorted((set(view.members) | set(view.previous)) - {self.me}):
            reply = await self._call(member, "Drained", request, RPC_TIMEOUT_S)
            # A departed one may be gone for good: nothing to tell it.
            heard = heard and (reply is not None or member not in view.members)
        return heard

    async def _ask(self, key: str, epoch: int) -> bool:
        request = internal_pb2.SettleRequest(key=key, holder=self.me, epoch=epoch)
        if await self._call(self._placement.owner(key), "Settle", request, HANDOVER_TIMEOUT_S) is None:
            return False  # the owner did not take it over yet: the next sweep asks again
        return not await self._store.holds(key)


def _check_key(key: str) -> None:
    try:
        split_key(key)
    except ValueError as exc:
        raise InvalidArgument(f"key: {exc}", "key") from exc
