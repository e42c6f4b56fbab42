"""Admission's domain metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from townhall.core.metrics import from_zero

JOINS = Counter(
    "townhall_joins_total",
    "Join calls answered by admission, by outcome: admitted (a grant), waiting (a place in line), shed "
    "(RESOURCE_EXHAUSTED: the room or its waiting line is full, or the process is at its admit budget), "
    "rejected (any other refusal: a bad request, a room not live or not found, a ban, a missing grant, no "
    "relay). Calls refused by a rate limit never reach the join: see townhall_rate_limited_total. Join "
    'latency is grpc_server_handling_seconds{grpc_method="Join"}.',
    ["result"],
)
# The join path's children, resolved once (a labels() lookup per join is measurable there).
JOINS_ADMITTED, JOINS_WAITING, JOINS_SHED, JOINS_REJECTED = (
    JOINS.labels(result) for result in ("admitted", "waiting", "shed", "rejected")
)
ROOMS_LIVE = Gauge("townhall_rooms_live", "Live rooms known to this admission process.")
LISTENERS = Gauge("townhall_admission_listeners", "Listeners admitted by this process and not yet left.")
ROOM_CHANGES = Counter(
    "townhall_room_changes_total", "Room state changes acknowledged by Kafka, by kind.", ["change"]
)
ROOM_WRITES_FENCED = Counter(
    "townhall_room_writes_fenced_total",
    "Room changes refused (ABORTED) because another admission process had written the room since.",
)
LEASE_CALLS = Counter(
    "townhall_lease_calls_total",
    "Rooms asked for in capacity lease calls (a call asks for the rooms of one owner), by outcome: granted, "
    "empty (room full), rebuilding (a new owner still rebuilding "
    "its lease book after a take-over), failed (owner unreachable).",
    ["result"],
)
from_zero(LEASE_CALLS, "granted", "empty", "rebuilding", "failed")
FORWARD_RETRIES = Counter(
    "townhall_admission_forward_retries_total",
    "Owner-only room changes tried again because the owner did not answer or was handing over.",
)
ROOMS_TAKEN_OVER = Counter(
    "townhall_admission_rooms_taken_over_total",
    "Live rooms this process became the owner of because the member set changed.",
)
PEERS_DOWN = Gauge(
    "townhall_admission_peers_down",
    "Members this process's health probes find down, by kind (admission, relay).",
    ["kind"],
)
RELAYS_KNOWN = Gauge(
    "townhall_admission_relays_known",
    "Relays this process knows: configured seeds plus relays found in the load reports (admission.max_relays "
    'at most); townhall_admission_peers_down{kind="relay"} of them are down.',
)
RELAY_REPORTS_IGNORED = Counter(
    "townhall_admission_relay_reports_ignored_total",
    "Load reports of relays not known yet, ignored because admission.max_relays relays are known.",
)
HOST_FAILOVERS = Counter(
    "townhall_host_failovers_total",
    "Rooms whose host had gone for admission.host_grace_s, by outcome: handed_over (a co-host hosts it "
    "now) or ended (no host or co-host left).",
    ["outcome"],
)
from_zero(HOST_FAILOVERS, "handed_over", "ended")
WATCH_STREAMS = Gauge("townhall_watch_streams", "WatchRoom streams open on this admission process.")
WATCH_UPDATES = Counter(
    "townhall_watch_updates_total",
    "WatchRoom updates queued on streams, by kind: room (a new room version, with its events) or counts.",
    ["kind"],
)
WATCH_RESYNCS = Counter(
    "townhall_watch_resyncs_total",
    "WatchRoom streams that fell a whole queue behind and were sent the room as it is instead.",
)
from_zero(WATCH_UPDATES, "room", "counts")
