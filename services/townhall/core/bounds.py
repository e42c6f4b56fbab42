"""Calls in flight per client connection, per client address and per server: what no caller can hold past.

Rate limits (core/limits.py) bound how often a caller may start calls; these bound how many it may hold
open at once, which is what a caller that never finishes (a stalled request, a stream it never reads,
a health Watch that never ends) uses up. Every server the process starts counts its calls in the one
handler wrapper (core/interceptor.py), each server on its own (a flood of the client port never
touches the probe port):

- per connection (gRPC's peer string: the client's address and port) and per client address (the key
  the rate limits use: an IPv4 address or an IPv6 network), every call but those of exempt networks
  (`limits.exempt`) and those carrying the service credential (peers);
- client calls (a user token or a ticket) in the server's own pool when it has one (admission's
  `max_concurrent_rpcs`): health checks, open streams and peers' calls are outside it, so a full
  process still answers its probes and its peers;
- open streams (health Watch, reflection: no token needed) in a small pool of their own, per server
  and per address;
- streams a client holds as long as it watches (`SELF_BOUNDED`: WatchRoom) per connection only: their
  service bounds them per user and per process itself (admission.max_watch_streams...), and counting
  them per address or in the client pool would let the watchers behind one address (or one process's
  audience) use up the calls everyone needs to join.

Past a bound a call is RESOURCE_EXHAUSTED at once, saying which bound, with a jittered retry-after.
Counters exist only for connections and addresses with calls in flight: memory follows the calls.
"""

from __future__ import annotations

import random

from townhall.core.config import ServerConfig
from townhall.core.errors import Reason, ResourceExhausted
from townhall.core.metrics import CALLS_REFUSED

# What a call counts in besides its connection and address (SELF_BOUNDED: its connection only).
NONE, CLIENT, OPEN_STREAM, SELF_BOUNDED = 0, 1, 2, 3
# Methods whose service bounds their streams itself (see the module docstring).
SELF_BOUNDED_METHODS = frozenset({"townhall.v1.Rooms/WatchRoom"})
RETRY_MS = 200
_JITTER = (1.0, 1.5)

_BY = {
    name: CALLS_REFUSED.labels(name)
    for name in ("connection", "address", "server", "open_streams", "open_streams_address")
}


class Bounds:
    """The calls one server has in flight, by connection, address and pool; refuses past the bounds."""

    def __init__(
        self, config: ServerConfig, per_address: int | None = None, clients: int | None = None
    ) -> None:
        self.per_connection = config.max_calls_per_connection
        self.per_address = min(config.max_calls_per_address, per_address or config.max_calls_per_address)
        self.open_streams = config.max_open_streams
        self.open_per_address = config.max_open_streams_per_address
        self.clients = clients
        self._connections: dict[str, int] = {}
        self._addresses: dict[str, int] = {}
        self._open_addresses: dict[str, int] = {}
        self._clients_in = self._open_in = 0

    @property
    def in_pool(self) -> dict[int, int]:
        """Calls in flight in each pool."""
        return {CLIENT: self._clients_in, OPEN_STREAM: self._open_in}

    def enter(self, peer: str, key: str | None, pool: int) -> None:
        """Counts a call of `peer` (address key `key`, None if exempt) in `pool`, or refuses it."""
        if pool == CLIENT:
            if self.clients is not None and self._clients_in >= self.clients:
                _refuse(
                    "server",
                    f"this server is serving its limit of {self.clients} client calls at once "
                    "(admission.max_concurrent_rpcs)",
                )
        elif pool == OPEN_STREAM and self._open_in >= self.open_streams:
            _refuse(
                "open_streams",
                f"this server has its limit of {self.open_streams} health Watch and reflection streams "
                "open (server.max_open_streams)",
            )
        if key is not None:
            connections, addresses = self._connections, self._addresses
            on_connection = connections.get(peer, 0)
            if on_connection >= self.per_connection:
                _refuse(
                    "connection",
                    f"too many calls at once on this connection: at most {self.per_connection} calls "
                    "and streams (server.max_calls_per_connection)",
                )
            if pool == SELF_BOUNDED:
                connections[peer] = on_connection + 1
                return
            from_address = addresses.get(key, 0)
            if from_address >= self.per_address:
                _refuse(
                    "address",
                    f"too many calls at once from address {key}: at most {self.per_address} calls and "
                    "streams",
                )
            if pool == OPEN_STREAM:
                open_from = self._open_addresses.get(key, 0)
                if open_from >= self.open_per_address:
                    _refuse(
                        "open_streams_address",
                        f"too many health Watch and reflection streams at once from address {key}: at "
                        f"most {self.open_per_address} (server.max_open_streams_per_address)",
                    )
                self._open_addresses[key] = open_from + 1
            connections[peer] = on_connection + 1
            addresses[key] = from_address + 1
        if pool == CLIENT:
            self._clients_in += 1
        elif pool == OPEN_STREAM:
            self._open_in += 1

    def leave(self, peer: str, key: str | None, pool: int) -> None:
        """Releases what `enter` counted for the call."""
        if pool == CLIENT:
            self._clients_in -= 1
        elif pool == OPEN_STREAM:
            self._open_in -= 1
        if key is not None:
            connections, addresses = self._connections, self._addresses
            left = connections[peer] - 1
            if left:
                connections[peer] = left
            else:
                del connections[peer]
            if pool == SELF_BOUNDED:
                return
            left = addresses[key] - 1
            if left:
                addresses[key] = left
            else:
                del addresses[key]
            if pool == OPEN_STREAM:
                left = self._open_addresses[key] - 1
                if left:
                    self._open_addresses[key] = left
                else:
                    del self._open_addresses[key]

    def held(self) -> int:
        """Connections and addresses with calls in flight (what the counters hold)."""
        return len(self._connections) + len(self._addresses) + len(self._open_addresses)


def _refuse(bound: str, message: str) -> None:
    _BY[bound].inc()
    retry_ms = int(RETRY_MS * random.uniform(*_JITTER))
    raise ResourceExhausted(f"{message}; retry after {retry_ms} ms", retry_ms, Reason.TOO_MANY_CALLS)
