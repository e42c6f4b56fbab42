"""Bounds on calls in flight: per connection, per address, the server's client pool and its open streams."""

from __future__ import annotations

import pytest

from townhall.core.bounds import CLIENT, NONE, OPEN_STREAM, SELF_BOUNDED, Bounds
from townhall.core.config import ServerConfig
from townhall.core.errors import ResourceExhausted

CONFIG = ServerConfig(
    max_calls_per_connection=3, max_calls_per_address=5, max_open_streams=4, max_open_streams_per_address=2
)


def test_a_connection_and_an_address_hold_at_most_their_bound_and_get_it_back() -> None:
    bounds = Bounds(CONFIG)
    for _ in range(3):
        bounds.enter("ipv4:192.0.2.1:1000", "192.0.2.1", CLIENT)
    with pytest.raises(ResourceExhausted, match="at most 3 calls and streams") as refused:
        bounds.enter("ipv4:192.0.2.1:1000", "192.0.2.1", CLIENT)
    assert 200 <= refused.value.retry_after_ms <= 300
    bounds.enter("ipv4:192.0.2.1:1001", "192.0.2.1", CLIENT)  # another connection of the address
    bounds.enter("ipv4:192.0.2.1:1002", "192.0.2.1", NONE)
    with pytest.raises(ResourceExhausted, match=r"from address 192\.0\.2\.1: at most 5"):
        bounds.enter("ipv4:192.0.2.1:1003", "192.0.2.1", CLIENT)
    bounds.enter("ipv4:192.0.2.2:1000", "192.0.2.2", CLIENT)  # another address is not affected
    bounds.leave("ipv4:192.0.2.1:1000", "192.0.2.1", CLIENT)
    bounds.enter("ipv4:192.0.2.1:1003", "192.0.2.1", CLIENT)  # room again
    for peer, pool in [
        *[("ipv4:192.0.2.1:1000", CLIENT)] * 2,
        ("ipv4:192.0.2.1:1001", CLIENT),
        ("ipv4:192.0.2.1:1002", NONE),
        ("ipv4:192.0.2.1:1003", CLIENT),
    ]:
        bounds.leave(peer, "192.0.2.1", pool)
    bounds.leave("ipv4:192.0.2.2:1000", "192.0.2.2", CLIENT)
    assert bounds.held() == 0, "counters exist only while calls are in flight"
    assert bounds.in_pool == {CLIENT: 0, OPEN_STREAM: 0}


def test_the_client_pool_is_the_servers_and_exempt_callers_count_only_there() -> None:
    bounds = Bounds(CONFIG, clients=4)
    for port in range(4):
        bounds.enter(f"ipv4:10.0.0.1:{port}", None, CLIENT)  # exempt: no per-connection or address bound
    with pytest.raises(ResourceExhausted, match="limit of 4 client calls at once"):
        bounds.enter("ipv4:192.0.2.1:1", "192.0.2.1", CLIENT)
    bounds.enter("ipv4:192.0.2.1:1", "192.0.2.1", NONE)  # a health check is outside the pool
    bounds.enter("ipv4:192.0.2.1:2", "192.0.2.1", OPEN_STREAM)  # and so is an open stream
    assert bounds.held() == 4  # two connections, their address, its open streams


def test_open_streams_have_a_small_pool_and_a_smaller_share_per_address() -> None:
    bounds = Bounds(CONFIG)
    for port in range(2):
        bounds.enter(f"ipv4:192.0.2.1:{port}", "192.0.2.1", OPEN_STREAM)
    with pytest.raises(
        ResourceExhausted, match=r"Watch and reflection streams at once from address 192\.0\.2\.1"
    ):
        bounds.enter("ipv4:192.0.2.1:9", "192.0.2.1", OPEN_STREAM)
    bounds.enter("ipv4:192.0.2.1:9", "192.0.2.1", CLIENT)  # its other calls are not refused for it
    for address in ("192.0.2.2", "192.0.2.3"):
        bounds.enter(f"ipv4:{address}:1", address, OPEN_STREAM)
    with pytest.raises(ResourceExhausted, match="limit of 4 health Watch and reflection streams"):
        bounds.enter("ipv4:192.0.2.4:1", "192.0.2.4", OPEN_STREAM)


def test_the_smaller_per_address_bound_wins() -> None:
    assert Bounds(CONFIG, per_address=2).per_address == 2
    assert Bounds(CONFIG, per_address=64).per_address == 5


def test_watch_streams_count_per_connection_only_never_against_the_address_or_the_client_pool() -> None:
    bounds = Bounds(CONFIG, clients=2)
    # Six watchers behind one address (5 calls at most per address), on two connections.
    for port in (1000, 1001):
        for _ in range(3):
            bounds.enter(f"ipv4:192.0.2.1:{port}", "192.0.2.1", SELF_BOUNDED)
    with pytest.raises(ResourceExhausted, match="at most 3 calls and streams"):
        bounds.enter("ipv4:192.0.2.1:1000", "192.0.2.1", SELF_BOUNDED)
    # Joins from the same address still have all of the address's and the pool's room.
    for port in (2000, 2001):
        bounds.enter(f"ipv4:192.0.2.1:{port}", "192.0.2.1", CLIENT)
    assert bounds.in_pool[CLIENT] == 2
    for port in (2000, 2001):
        bounds.leave(f"ipv4:192.0.2.1:{port}", "192.0.2.1", CLIENT)
    for port in (1000, 1001):
        for _ in range(3):
            bounds.leave(f"ipv4:192.0.2.1:{port}", "192.0.2.1", SELF_BOUNDED)
    assert bounds.held() == 0
