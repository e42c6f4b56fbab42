"""Membership: EndpointSlice events become members, and a member change moves only its rooms."""

from __future__ import annotations

from typing import Any

from kubernetes.client import (
    DiscoveryV1EndpointPort,
    V1Endpoint,
    V1EndpointConditions,
    V1EndpointSlice,
    V1ListMeta,
    V1ObjectMeta,
)

from townhall.core.membership import KubernetesMembership, SliceTable, StaticMembership, slice_members

ROOMS = [f"room-{i}" for i in range(3000)]


def endpoint_slice(name: str, ready: dict[str, bool | None], port: int = 50051) -> V1EndpointSlice:
    return V1EndpointSlice(
        address_type="IPv4",
        metadata=V1ObjectMeta(name=name, resource_version="1"),
        ports=[
            DiscoveryV1EndpointPort(name="metrics", port=9101),
            DiscoveryV1EndpointPort(name="grpc", port=port),
        ],
        endpoints=[
            V1Endpoint(addresses=[ip], conditions=V1EndpointConditions(ready=state))
            for ip, state in ready.items()
        ],
    )


def test_only_ready_addresses_on_the_named_port_are_members() -> None:
    found = slice_members(
        endpoint_slice("a", {"10.0.0.1": True, "10.0.0.2": False, "10.0.0.3": None}), "grpc"
    )
    # Kubernetes documents an unset `ready` as ready.
    assert found == {"10.0.0.1:50051", "10.0.0.3:50051"}
    assert slice_members(endpoint_slice("a", {"10.0.0.1": True}), "nope") == set()


def test_a_pod_that_is_not_serving_is_no_member_even_where_not_ready_addresses_are_published() -> None:
    """With publishNotReadyAddresses every endpoint says ready; serving and terminating still tell."""
    published = endpoint_slice("a", {"10.0.0.1": True, "10.0.0.2": True, "10.0.0.3": True})
    conditions = [e.conditions for e in published.endpoints]
    conditions[1].serving = False  # starting, or draining (NOT_SERVING fails its readiness probe)
    conditions[2].serving, conditions[2].terminating = True, True  # deleted, still in its preStop sleep
    assert slice_members(published, "grpc") == {"10.0.0.1:50051"}


def test_watch_events_add_modify_and_delete_slices() -> None:
    table = SliceTable("grpc")
    assert table.apply("ADDED", endpoint_slice("s1", {"10.0.0.1": True, "10.0.0.2": False}))
    assert table.apply("ADDED", endpoint_slice("s2", {"10.0.0.9": True}))
    assert table.members() == ["10.0.0.1:50051", "10.0.0.9:50051"]
    # A pod becoming ready changes the set; a no-op update does not.
    assert table.apply("MODIFIED", endpoint_slice("s1", {"10.0.0.1": True, "10.0.0.2": True}))
    assert not table.apply("MODIFIED", endpoint_slice("s1", {"10.0.0.1": True, "10.0.0.2": True}))
    assert table.apply("DELETED", endpoint_slice("s2", {}))
    assert table.members() == ["10.0.0.1:50051", "10.0.0.2:50051"]


class FakeDiscovery:
    """Answers the initial LIST like the API server's DiscoveryV1Api."""

    def __init__(self, slices: list[V1EndpointSlice]) -> None:
        self.slices = slices
        self.calls: list[dict[str, Any]] = []

    def list_namespaced_endpoint_slice(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return type("List", (), {"items": self.slices, "metadata": V1ListMeta(resource_version="7")})()


def test_kubernetes_membership_lists_the_services_slices_and_reports_changes() -> None:
    api = FakeDiscovery([endpoint_slice("s1", {"10.0.0.1": True, "10.0.0.2": True})])
    changes: list[list[str]] = []
    members = KubernetesMembership("10.0.0.1:50051", "townhall-admission", "ns", "grpc", changes.append, api)
    members._list()
    assert api.calls == [
        {
            "namespace": "ns",
            "label_selector": "kubernetes.io/service-name=townhall-admission",
            "_request_timeout": 10.0,
        }
    ]
    assert members.members() == ["10.0.0.1:50051", "10.0.0.2:50051"] == changes[-1]
    assert sum(members.is_owner(r) for r in ROOMS) in range(1200, 1800)


def test_a_member_joining_takes_only_the_rooms_it_gains() -> None:
    table = SliceTable("grpc")
    table.apply("ADDED", endpoint_slice("s", {"10.0.0.1": True, "10.0.0.2": True}))
    before = StaticMembership("10.0.0.1:50051", table.members())
    table.apply("MODIFIED", endpoint_slice("s", {"10.0.0.1": True, "10.0.0.2": True, "10.0.0.3": True}))
    after = StaticMembership("10.0.0.1:50051", table.members())
    moved = [r for r in ROOMS if before.owner(r) != after.owner(r)]
    assert moved and all(after.owner(r) == "10.0.0.3:50051" for r in moved)
    assert 700 < len(moved) < 1300  # about a third


def test_a_member_leaving_gives_up_only_its_rooms() -> None:
    table = SliceTable("grpc")
    table.apply("ADDED", endpoint_slice("s", {"10.0.0.1": True, "10.0.0.2": True, "10.0.0.3": True}))
    before = StaticMembership("10.0.0.1:50051", table.members())
    # The pod terminates: it is no longer ready before it is gone.
    table.apply("MODIFIED", endpoint_slice("s", {"10.0.0.1": True, "10.0.0.2": True, "10.0.0.3": False}))
    after = StaticMembership("10.0.0.1:50051", table.members())
    moved = [r for r in ROOMS if before.owner(r) != after.owner(r)]
    assert moved and all(before.owner(r) == "10.0.0.3:50051" for r in moved)


def test_static_membership_always_includes_itself() -> None:
    members = StaticMembership("b:1", ["a:1", "c:1"])
    assert members.members() == ["a:1", "b:1", "c:1"]
    assert StaticMembership("a:1").is_owner("any-room")
