"""Membership: the live members of a sharded service, from config or from Kubernetes EndpointSlices.

Either source can be narrowed to the members that answer health probes (`ProbedMembership`), so a
killed process stops owning rooms within a couple of probe intervals, and a draining one at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from townhall.core import logging
from townhall.core.liveness import Liveness
from townhall.core.sharding import owner

log = logging.get(__name__)

SERVICE_LABEL = "kubernetes.io/service-name"
RESTART_DELAY_S = 2.0
# The API server ends a watch after WATCH_TIMEOUT_S; a LIST, and any read of a watch, that takes
# longer than REQUEST_TIMEOUT_S past that is a dead (half-open) connection: list again, watch again.
WATCH_TIMEOUT_S = 60
REQUEST_TIMEOUT_S = 10.0


class Membership(Protocol):
    """Who the members are, which one this process is, and who owns a key."""

    @property
    def me(self) -> str:
        """This process's member address (host:port)."""

    def members(self) -> list[str]:
        """The live members, sorted; never empty while this process serves."""

    def owner(self, key: str) -> str:
        """The member that owns `key` by rendezvous hashing over the live members."""

    def is_owner(self, key: str) -> bool:
        """Whether this process owns `key` (scheduler, leases and room changes run only there)."""


class _Base:
    """Owner look-ups shared by both implementations."""

    me: str

    def members(self) -> list[str]:
        raise NotImplementedError

    def owner(self, key: str) -> str:
        return owner(key, self.members() or [self.me])

    def is_owner(self, key: str) -> bool:
        return self.owner(key) == self.me


class StaticMembership(_Base):
    """Members named in configuration (local topology, tests); `me` is one unless it owns nothing.

    A process that `owns` nothing (admission's crowd lane) is not a member: it never owns a key
    and sends owner-only work to the members.
    """

    def __init__(self, me: str, members: Iterable[str] = (), owns: bool = True) -> None:
        self.me = me
        self._members = sorted({*members, me} if owns else set(members))

    def members(self) -> list[str]:
        return self._members  # never mutated: ProbedMembership caches on its identity


class ProbedMembership(_Base):
    """Another membership narrowed to the members a Liveness says are up (a member not probed yet is
    not); `me` always counts, unless this process `owns` nothing (admission's crowd lane), which is
    never a member. A process never probes itself: it counts itself from its start, and the others
    count it once their probes find it serving (admission probes once before serving, so it knows
    who else is up before it owns anything). A member that just appeared in the inner list owns
    nothing until a probe finds it serving.

    `leave()` (on SIGTERM) takes this process out of its own view: it then owns nothing, and
    forwards every owner-only change to the member that owns it next.
    """

    def __init__(self, inner: Membership, liveness: Liveness, owns: bool = True) -> None:
        self.me = inner.me
        self._inner = inner
        self._liveness = liveness
        # A process that owns nothing behaves as one always leaving: never counted, never an owner.
        self.leaving = not owns
        self._cache: tuple[list[str], int, bool, list[str]] | None = None

    def members(self) -> list[str]:
        # Called for every owner look-up: recomputed only when the list, a probe or leaving changed.
        listed = self._inner.members()
        version = self._liveness.version
        cache = self._cache
        if cache is not None and cache[0] is listed and cache[1] == version and cache[2] == self.leaving:
            return cache[3]
        up = self._liveness.is_up
        live = [m for m in listed if up(m) and (m != self.me or not self.leaving)]
        if not self.leaving and self.me not in live:
            live = sorted([*live, self.me])
        # Leaving with no one else up: keep owning, there is no one to hand over to.
        members = live or [self.me]
        self._cache = (listed, version, self.leaving, members)
        return members

    def leave(self) -> None:
        """Stops owning anything here (the process is shutting down)."""
        self.leaving = True


def slice_members(endpoint_slice: Any, port_name: str | None) -> set[str]:
    """The ready host:port addresses of one V1EndpointSlice (the named port, else its first).

    Ready means all three conditions agree: a Service with publishNotReadyAddresses marks every
    endpoint `ready`, whatever its pod's readiness, which `serving` still carries; and a terminating
    pod is on its way out even while it serves.
    """
    ports = endpoint_slice.ports or []
    port = next((p.port for p in ports if port_name is None or p.name == port_name), None)
    if port is None:
        return set()
    found = set()
    for endpoint in endpoint_slice.endpoints or []:
        conditions = endpoint.conditions
        # Kubernetes says an unset condition means ready (serving, not terminating).
        if conditions is not None and (
            conditions.ready is False or conditions.serving is False or conditions.terminating
        ):
            continue
        for address in endpoint.addresses or []:
            found.add(f"{address}:{port}")
    return found


class SliceTable:
    """Members from a stream of EndpointSlice watch events (one service can have many slices)."""

    def __init__(self, port_name: str | None) -> None:
        self._port_name = port_name
        self._slices: dict[str, set[str]] = {}

    def apply(self, kind: str, endpoint_slice: Any) -> bool:
        """Applies ADDED/MODIFIED/DELETED; True if the member set changed."""
        before = self.members()
        name = endpoint_slice.metadata.name
        if kind == "DELETED":
            self._slices.pop(name, None)
        else:
            self._slices[name] = slice_members(endpoint_slice, self._port_name)
        return self.members() != before

    def replace(self, slices: Iterable[Any]) -> None:
        """Replaces everything with a fresh list (after a LIST, before watching)."""
        self._slices = {s.metadata.name: slice_members(s, self._port_name) for s in slices}

    def members(self) -> list[str]:
        """Every ready address across slices, sorted."""
        return sorted(set().union(*self._slices.values()))


class KubernetesMembership(_Base):
    """Members from the EndpointSlices of a headless Service, watched in a daemon thread.

    A thread, not the kubernetes_asyncio client: the synchronous client is already a dependency,
    the watch is one long poll, and the join path only reads an immutable list the thread swaps
    in, so no lock is held on the event loop.
    """

    def __init__(
        self,
        me: str,
        service: str,
        namespace: str,
        port_name: str | None = None,
        on_change: Callable[[list[str]], None] | None = None,
        api: Any = None,
        watch_timeout_s: int = WATCH_TIMEOUT_S,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.me = me
        self._service = service
        self._namespace = namespace
        self._table = SliceTable(port_name)
        self._members: list[str] = [me]
        self._on_change = on_change
        self._api = api
        self._watch_timeout_s = watch_timeout_s
        self._request_timeout_s = request_timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def members(self) -> list[str]:
        return self._members

    def start(self) -> None:
        """Lists the slices once (so ownership is known before serving), then watches in a thread."""
        if self._api is None:
            from kubernetes import client, config

            config.load_incluster_config()
            self._api = client.DiscoveryV1Api()
        version = self._list()
        self._thread = threading.Thread(target=self._watch, args=(version,), daemon=True, name="membership")
        self._thread.start()

    def stop(self) -> None:
        """Asks the watch thread to end (at its next event, or within the watch's read timeout)."""
        self._stop.set()

    def _selector(self) -> Mapping[str, Any]:
        return {"namespace": self._namespace, "label_selector": f"{SERVICE_LABEL}={self._service}"}

    def _list(self) -> str:
        listed = self._api.list_namespaced_endpoint_slice(
            **self._selector(), _request_timeout=self._request_timeout_s
        )
        self._table.replace(listed.items)
        self._publish()
        return str(listed.metadata.resource_version)

    def _watch(self, version: str) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            try:
                # The read timeout bounds every wait for a byte: without it a connection whose peer
                # vanished (no FIN, no RST) would hold this thread, and the members, forever.
                read_timeout_s = self._watch_timeout_s + self._request_timeout_s
                stream = watch.Watch().stream(
                    self._api.list_namespaced_endpoint_slice,
                    resource_version=version,
                    timeout_seconds=self._watch_timeout_s,
                    _request_timeout=(self._request_timeout_s, read_timeout_s),
                    **self._selector(),
                )
                for event in stream:
                    version = event["object"].metadata.resource_version
                    if self._table.apply(event["type"], event["object"]):
                        self._publish()
                    if self._stop.is_set():
                        return
            except Exception as exc:  # expired version, API restart, dead connection: list, then watch
                log.warning("membership watch failed; listing again", error=repr(exc))
                if self._stop.wait(RESTART_DELAY_S):
                    return
                try:
                    version = self._list()
                except Exception as again:
                    log.warning("membership list failed", error=repr(again))

    def _publish(self) -> None:
        # An empty table (a pod not yet ready sees no one) keeps this process as its own owner.
        members = self._table.members() or [self.me]
        if members != self._members:
            self._members = members
            log.info("members changed", members=members)
            if self._on_change is not None:
                self._on_change(members)
