"""Per-user and per-address rate limits on client RPCs by class of method, applied where handlers are wrapped.

Each client method belongs to a class (`limit_class`): room changes, joins, graph writes, reads, stream
opens, and the open methods (health, reflection: per address only). A call whose credentials verify is
counted against its client address and then its user; a call whose credentials fail is counted in a
budget of its own per address (`failures_address`), so garbage tokens never use up the budget of the
users behind the same address. Past that budget an address's calls are taken only with tokens that
cost little to check (remembered from an earlier verify, or plainly valid HS256); the rest are refused
unread, so a flood of forged tokens costs a lookup or an HMAC each, never a full verify, and the users
behind the address who are signed in already are not affected.
Nothing on the internal port is limited (internal calls, and calls another member forwarded: counted
where they arrived). Excess calls get RESOURCE_EXHAUSTED, reason RATE_LIMITED, with a jittered RetryInfo
(core/errors.py).
"""

from __future__ import annotations

import ipaddress
import random
import time
import urllib.parse
from collections.abc import Callable
from contextvars import ContextVar

from townhall.core.auth import OPEN, SERVICE
from townhall.core.config import LimitsConfig
from townhall.core.errors import Reason, ResourceExhausted
from townhall.core.metrics import RATE_LIMITED, from_zero
from townhall.core.ratelimit import Buckets

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CHANGES, JOINS, FOLLOWS, READS, STREAMS = "changes", "joins", "follows", "reads", "streams"
OPEN_CALLS = "open"
CLASSES = (CHANGES, JOINS, FOLLOWS, READS, STREAMS, OPEN_CALLS)
# The budget of calls whose credentials failed (per address only).
FAILURES = "failures"
# A method's class: its own entry, else its service's, else streams for streaming methods and room
# changes (the strictest) for the rest, so a method added later is limited before anyone lists it.
_CLASSES = {
    "townhall.v1.Rooms": CHANGES,
    "townhall.v1.Rooms/GetRoom": READS,
    "townhall.v1.Rooms/ListLiveRooms": READS,
    "townhall.v1.Rooms/WatchRoom": STREAMS,
    # Stage and moderation calls are room changes: each is a write to the room-state topic.
    "townhall.v1.Moderation": CHANGES,
    "townhall.v1.Admission": JOINS,
    "townhall.v1.Graph": FOLLOWS,
    "townhall.v1.Graph/CountFollowers": READS,
    "townhall.v1.Graph/ListFollowers": READS,
    "townhall.v1.Inbox": STREAMS,
    "townhall.v1.Relay": STREAMS,
}
_DESCRIPTION = {
    CHANGES: "room changes",
    JOINS: "joins and leaves",
    FOLLOWS: "graph changes",
    READS: "reads",
    STREAMS: "stream opens",
    OPEN_CALLS: "health and reflection calls",
}
# Peer strings seen (one per client connection) and the key each maps to; cleared when full.
_MAX_PEERS = 65_536
# Jitter of retry-after: clients refused together do not come back together.
_JITTER = (1.0, 1.5)
_MIN_RETRY_MS = 20
# Set by the handler wrapper for methods whose caller only the servicer can name (relay tickets).
CHARGE: ContextVar[Callable[[int], None] | None] = ContextVar("townhall_charge_user", default=None)


def limit_class(service: str, method: str, how: str, streaming: bool) -> str | None:
    """The class `service`/`method` is limited in, or None (internal calls are not)."""
    if how == OPEN:
        return OPEN_CALLS
    if how == SERVICE or not service.startswith("townhall."):
        return None
    return _CLASSES.get(f"{service}/{method}") or _CLASSES.get(service) or (STREAMS if streaming else CHANGES)


def client_address(peer: str) -> IPAddress | None:
    """The client IP of a gRPC peer string ("ipv4:10.1.2.3:5000", "ipv6:[::1]:5000"); None if it has none.

    An IPv4-mapped IPv6 address is its IPv4 address. gRPC percent-encodes the brackets of an IPv6
    peer ("ipv6:%5B::1%5D:5000").
    """
    kind, _, rest = urllib.parse.unquote(peer).partition(":")
    if kind == "ipv4":
        host = rest.rpartition(":")[0] or rest
    elif kind == "ipv6":
        host = rest[1:].partition("]")[0] if rest.startswith("[") else rest
        host = host.partition("%")[0]  # a link-local zone
    else:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def address_key(peer: str, ipv6_prefix: int = 64) -> str:
    """What per-address limits count a peer as: its IPv4 address, or its IPv6 /ipv6_prefix network.

    One host usually holds a whole IPv6 /64. A peer without an IP (a unix socket) is one local key.
    """
    address = client_address(peer)
    if address is None:
        return peer.partition(":")[0] or peer
    if address.version == 6 and not address.is_loopback:
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


class Limits:
    """The limiters of one server, from [limits]: per class, one for users and one for addresses."""

    def __init__(self, config: LimitsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._users: dict[str, Buckets] = {}
        self._addresses: dict[str, Buckets] = {}
        if config.enabled:
            for cls in (*CLASSES, FAILURES):
                for kind, into in (("user", self._users), ("address", self._addresses)):
                    rate = getattr(config, f"{cls}_{kind}", 0.0)
                    if rate > 0:
                        into[cls] = Buckets(rate, max(1.0, rate * config.burst_s), config.max_keys, clock)
                        from_zero(RATE_LIMITED, (cls, kind))
        self._failures = self._addresses.get(FAILURES)
        self._exempt = [ipaddress.ip_network(net, strict=False) for net in config.exempt]
        self._peers: dict[str, str | None] = {}

    def for_method(
        self, cls: str | None
    ) -> tuple[Callable[[str], None] | None, Callable[[int], None] | None]:
        """(charge an address key; charge a user) for a method of class `cls`."""
        if cls is None:
            return None, None
        return self._address_check(cls), self._user_check(cls)

    def failing(self, key: str) -> float:
        """Seconds until the address is within its budget of calls with failed credentials (0.0: it is)."""
        return self._failures.wait(key) if self._failures is not None else 0.0

    def refuse_unread(self, key: str, wait_s: float) -> None:
        """RESOURCE_EXHAUSTED for a call of an address past its failures, whose token would cost a verify."""
        assert self._failures is not None
        _refuse(FAILURES, "address", f"from address {key}", "", self._failures, wait_s)

    def failed(self, key: str) -> None:
        """Counts a call from the address whose credentials failed (against its own budget)."""
        if self._failures is not None:
            self._failures.take(key)

    def _address_check(self, cls: str) -> Callable[[str], None] | None:
        buckets = self._addresses.get(cls)
        if buckets is None:
            return None
        take, what = buckets.take, _DESCRIPTION[cls]

        def charge(key: str) -> None:
            wait = take(key)
            if wait:
                _refuse(cls, "address", f"from address {key}", what, buckets, wait)

        return charge

    def _user_check(self, cls: str) -> Callable[[int], None] | None:
        buckets = self._users.get(cls)
        if buckets is None:
            return None
        take, what = buckets.take, _DESCRIPTION[cls]

        def charge(user: int) -> None:
            wait = take(user)
            if wait:
                _refuse(cls, "user", f"by user {user}", what, buckets, wait)

        return charge

    def key(self, peer: str) -> str | None:
        """The peer's address key, None if exempt (remembered per peer string: one per connection)."""
        try:
            return self._peers[peer]
        except KeyError:
            pass
        key: str | None = address_key(peer, self.config.ipv6_prefix)
        address = client_address(peer) if self._exempt else None
        if address is not None and any(address in net for net in self._exempt):
            key = None
        if len(self._peers) >= _MAX_PEERS:
            self._peers.clear()
        self._peers[peer] = key
        return key


def charge(user: int) -> None:
    """Counts a call against `user` where only the servicer knows the caller (a relay ticket's user)."""
    check = CHARGE.get()
    if check is not None:
        check(user)


def _refuse(cls: str, kind: str, who: str, what: str, buckets: Buckets, wait_s: float) -> None:
    RATE_LIMITED.labels(cls, kind).inc()
    retry_ms = max(_MIN_RETRY_MS, int(wait_s * 1000 * random.uniform(*_JITTER)))
    if cls == FAILURES:
        raise ResourceExhausted(
            f"too many calls with missing or invalid credentials {who}: at most {buckets.rate:g}/s "
            f"(bursts of {buckets.burst:g}); until then only tokens this server has verified before "
            f"are taken from it; retry after {retry_ms} ms",
            retry_ms,
            Reason.RATE_LIMITED,
        )
    raise ResourceExhausted(
        f"too many {what} {who}: at most {buckets.rate:g}/s (bursts of {buckets.burst:g}); "
        f"retry after {retry_ms} ms",
        retry_ms,
        Reason.RATE_LIMITED,
    )
