"""Relay domain metrics (base units; no user or room labels: rooms are unbounded)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from townhall.core.metrics import from_zero

LISTENERS = Gauge("townhall_relay_listeners", "Subscribe streams open on this relay.")
PUBLISHERS = Gauge("townhall_relay_publishers", "Publish streams open on this relay.")
PULLS_SERVED = Gauge(
    "townhall_relay_pulls_served", "Pull streams open to downstream (edge, mid-tier) relays."
)
CHUNKS_PULLED = Counter(
    "townhall_relay_chunks_pulled_total", "Chunks received from an upstream relay (edge, mid-tier)."
)
PULL_RECONNECTS = Counter(
    "townhall_relay_pull_reconnects_total", "Pulls from an upstream relay opened again after they ended."
)
PULLS_SILENT = Counter(
    "townhall_relay_pulls_silent_total",
    "Pulls from an upstream relay given up because nothing, not even a heartbeat, came for upstream_lost_s.",
)
ROOMS = Gauge("townhall_relay_rooms", "Rooms held by this relay (active or recently idle).")
FRAMES_IN = Counter("townhall_relay_frames_in_total", "Audio frames accepted from speakers.")
FRAMES_REJECTED = Counter(
    "townhall_relay_frames_rejected_total",
    "Audio frames refused (bad size, clock or speaker); each ends its Publish stream.",
)
CHUNKS_EMITTED = Counter("townhall_relay_chunks_emitted_total", "Chunks built (one per room interval).")
CHUNKS_OUT = Counter(
    "townhall_relay_chunks_out_total",
    "Chunks handed to subscriber queues (one per subscriber per chunk).",
)
CHUNKS_DROPPED = Counter(
    "townhall_relay_chunks_dropped_total",
    "Chunks dropped from the queue of a subscriber that read too slowly.",
)
SUBSCRIBERS_CUT = Counter(
    "townhall_relay_subscribers_cut_total",
    "Subscribers cut off after overflowing their queue for relay.stuck_cutoff_s.",
)
CHUNK_BYTES = Histogram(
    "townhall_relay_chunk_bytes",
    "Size of a serialised chunk.",
    buckets=(128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
)
FRAME_DELAY = Histogram(
    "townhall_relay_frame_delay_seconds",
    "Time from a frame's capture (speaker clock) to the emission of the chunk that carries it.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5),
)
UPSTREAM_LOST = Counter(
    "townhall_relay_upstream_lost_total",
    "Rooms whose pull from upstream failed for relay.upstream_lost_s (or whose upstream drained):"
    " their streams here were ended so listeners join again on a live path.",
)
ORIGIN_TAKEOVERS = Counter(
    "townhall_relay_origin_takeovers_total",
    "Rooms this relay became the origin of while it had been pulling them (a new epoch began).",
)
STREAMS_REVOKED = Counter(
    "townhall_relay_streams_revoked_total",
    "Publish and Subscribe streams ended because a room change revoked them, by reason: removed, "
    "banned, demoted (moved off the stage), ended (the room ended); left (the listener's Leave voided "
    "its ticket), replaced (a newer stream of the same user and room: relay.streams_per_user).",
    ["reason"],
)
LISTENERS_REFUSED = Counter(
    "townhall_relay_listeners_refused_total",
    "Subscribe streams refused because the relay held relay.listener_capacity listeners.",
)
LEAVES = Gauge(
    "townhall_relay_leaves",
    "Leaves this relay remembers: listener tickets issued before them are void until they expire.",
)
FRAMES_MUTED = Counter(
    "townhall_relay_frames_muted_total", "Frames of muted speakers dropped at the origin relay."
)
REVOCATION_DELAY = Histogram(
    "townhall_relay_revocation_delay_seconds",
    "From a room change's write to Kafka (its record timestamp) to this relay ending the streams it revokes.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
from_zero(STREAMS_REVOKED, "removed", "banned", "demoted", "ended", "left", "replaced")
