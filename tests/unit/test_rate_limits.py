"""Rate limits: token buckets on a fake clock, bounded memory, client address keys and refusals."""

from __future__ import annotations

import pytest

from tests.unit.test_fairness import Clock
from townhall.core.auth import OPEN, SERVICE, TICKET, USER
from townhall.core.config import LimitsConfig
from townhall.core.errors import ResourceExhausted
from townhall.core.limits import (
    CHANGES,
    FOLLOWS,
    JOINS,
    OPEN_CALLS,
    READS,
    STREAMS,
    Limits,
    address_key,
    limit_class,
)
from townhall.core.ratelimit import Buckets


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    clock = Clock()
    buckets = Buckets(rate=10, burst=5, max_keys=100, clock=clock)
    assert [buckets.take("u") for _ in range(5)] == [0.0] * 5
    assert buckets.take("u") == pytest.approx(0.1)
    assert buckets.take("u") == pytest.approx(0.1)  # a refused call costs nothing
    clock.now += 0.1
    assert buckets.take("u") == 0.0
    assert buckets.take("u") == pytest.approx(0.1)
    assert buckets.take("other") == 0.0  # keys are independent
    clock.now += 10
    assert [buckets.take("u") for _ in range(5)] == [0.0] * 5  # full again, never more than the burst
    assert buckets.take("u") > 0


def test_refund_gives_back_one_call() -> None:
    clock = Clock()
    buckets = Buckets(rate=1, burst=1, max_keys=100, clock=clock)
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0
    buckets.refund("a")
    assert buckets.take("a") == 0.0


def test_idle_keys_are_forgotten_and_memory_is_capped() -> None:
    clock = Clock()
    buckets = Buckets(rate=100, burst=10, max_keys=1000, clock=clock)
    for key in range(300):
        buckets.take(key)
    assert len(buckets) == 300
    clock.now += 1.5
    buckets.take("x")  # the first generation ages out
    clock.now += 1.5
    buckets.take("x")
    assert len(buckets) == 1
    for key in range(100_000):
        buckets.take(key)
        assert len(buckets) <= 1000
    # A key forgotten while idle comes back with a full bucket, which it would have had anyway.
    clock.now += 60
    assert [buckets.take(5) for _ in range(10)] == [0.0] * 10


def test_a_busy_key_keeps_its_state_across_generations() -> None:
    clock = Clock()
    buckets = Buckets(rate=1, burst=2, max_keys=1000, clock=clock)
    buckets.take("u")
    buckets.take("u")
    for _ in range(5):
        clock.now += 1.0
        assert buckets.take("u") == 0.0  # one token a second
        assert buckets.take("u") > 0


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ("ipv4:203.0.113.7:52344", "203.0.113.7"),
        ("ipv6:[2001:db8:1:2:3:4:5:6]:443", "2001:db8:1:2::/64"),
        ("ipv6:[2001:db8:1:2:ffff::1]:1", "2001:db8:1:2::/64"),  # same /64, same key
        ("ipv6:[::ffff:198.51.100.1]:5000", "198.51.100.1"),
        ("ipv6:[::1]:5000", "::1"),
        ("ipv6:%5B::1%5D:5000", "::1"),  # as gRPC writes it
        ("ipv6:%5B2001:db8:1:2::9%5D:443", "2001:db8:1:2::/64"),
        ("ipv6:[fe80::1%eth0]:5000", "fe80::/64"),
        ("unix:/run/townhall.sock", "unix"),
    ],
)
def test_address_keys_drop_the_port_and_normalise(peer: str, key: str) -> None:
    assert address_key(peer) == key


def test_method_classes() -> None:
    assert limit_class("townhall.v1.Admission", "Join", USER, False) == JOINS
    assert limit_class("townhall.v1.Rooms", "CreateRoom", USER, False) == CHANGES
    assert limit_class("townhall.v1.Rooms", "MuteSpeaker", USER, False) == CHANGES  # added later
    assert limit_class("townhall.v1.Rooms", "GetRoom", USER, False) == READS
    assert limit_class("townhall.v1.Graph", "Follow", USER, False) == FOLLOWS
    assert limit_class("townhall.v1.Graph", "ListFollowers", USER, False) == READS
    assert limit_class("townhall.v1.Relay", "Subscribe", TICKET, True) == STREAMS
    assert limit_class("townhall.v1.Newer", "Watch", USER, True) == STREAMS
    assert limit_class("townhall.v1.Relay", "Pull", SERVICE, True) is None
    assert limit_class("grpc.health.v1.Health", "Check", OPEN, False) == OPEN_CALLS
    assert (
        limit_class("grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo", OPEN, True)
        == OPEN_CALLS
    )


def test_refusals_name_the_limit_and_carry_a_jittered_retry_after() -> None:
    limits = Limits(LimitsConfig(joins_user=2, joins_address=3, burst_s=1, exempt=("10.9.0.0/16",)))
    by_address, by_user = limits.for_method(JOINS)
    assert by_address is not None and by_user is not None
    by_user(7)
    by_user(7)
    with pytest.raises(
        ResourceExhausted, match=r"too many joins and leaves by user 7: at most 2/s"
    ) as refused:
        by_user(7)
    assert 450 <= refused.value.retry_after_ms <= 760  # 0.5 s to the next token, jittered by 1..1.5
    assert dict(refused.value.trailers)["retry-after-ms"] == str(refused.value.retry_after_ms)
    keys = {limits.key(f"ipv4:192.0.2.1:{port}") for port in (1, 2, 3, 4)}
    assert keys == {"192.0.2.1"}  # one address, any connection
    for _ in range(3):
        by_address("192.0.2.1")
    with pytest.raises(ResourceExhausted, match=r"from address 192\.0\.2\.1"):
        by_address("192.0.2.1")
    assert limits.key("ipv4:10.9.3.4:1") is None  # exempt


def test_failed_credentials_have_a_budget_of_their_own_per_address() -> None:
    clock = Clock()
    limits = Limits(LimitsConfig(joins_address=3, failures_address=2, burst_s=1), clock)
    by_address, _ = limits.for_method(JOINS)
    assert by_address is not None
    limits.failed("192.0.2.1")
    assert limits.failing("192.0.2.1") == 0.0  # within its burst of 2
    for _ in range(4):
        limits.failed("192.0.2.1")  # garbage tokens: never the joins budget
    for _ in range(3):
        by_address("192.0.2.1")  # the users behind the address keep theirs
    wait = limits.failing("192.0.2.1")
    assert wait == pytest.approx(0.5)  # failures past the burst are not counted: one refill away
    with pytest.raises(
        ResourceExhausted, match=r"invalid credentials from address 192\.0\.2\.1: at most 2/s"
    ):
        limits.refuse_unread("192.0.2.1", wait)
    assert limits.failing("192.0.2.2") == 0.0  # other addresses are not affected
    clock.now += 0.5
    assert limits.failing("192.0.2.1") == 0.0  # the budget refills at its rate


def test_wait_tells_what_take_would_without_taking() -> None:
    clock = Clock()
    buckets = Buckets(rate=10, burst=2, max_keys=100, clock=clock)
    assert buckets.wait("u") == 0.0
    buckets.take("u")
    buckets.take("u")
    assert buckets.wait("u") == pytest.approx(0.1)
    assert buckets.wait("u") == pytest.approx(0.1)
    assert buckets.take("u") == pytest.approx(0.1)
    clock.now += 0.1
    assert buckets.wait("u") == 0.0


def test_a_rate_of_zero_or_limits_off_means_no_limiter() -> None:
    assert Limits(LimitsConfig(reads_user=0)).for_method(READS)[1] is None
    assert Limits(LimitsConfig(enabled=False)).for_method(JOINS) == (None, None)
    assert Limits(LimitsConfig()).for_method(None) == (None, None)
