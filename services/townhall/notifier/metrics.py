"""The notifier's domain metrics: follows, fan-out progress and lag, Inbox delivery."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from townhall.core.metrics import from_zero

FOLLOWS = Counter(
    "townhall_notifier_follows_total", "Follow edges created (a repeated Follow is not counted)."
)
UNFOLLOWS = Counter("townhall_notifier_unfollows_total", "Follow edges removed.")
FOLLOWERS_STORED = Gauge("townhall_notifier_followers_stored", "Follow edges in this process's store.")
FANOUT_EVENTS = Counter(
    "townhall_notifier_fanout_events_total",
    "Room-started events handled by the planner, by outcome (done, invalid).",
    ["outcome"],
)
from_zero(FANOUT_EVENTS, "done", "invalid")
NOTIFICATIONS = Counter(
    "townhall_notifications_total",
    "Users notified: path=topic once the record naming them is acknowledged by Kafka, "
    "path=inbox once queued to a connected Inbox stream.",
    ["path"],
)
DUPLICATES_DROPPED = Counter(
    "townhall_notifier_duplicates_dropped_total",
    "Inbox notifications not delivered because that user already had that (room, kind).",
)
INBOX_DROPPED = Counter(
    "townhall_notifier_inbox_dropped_total",
    "Notifications dropped from the front of a slow Inbox subscriber's full queue.",
)
INBOX_CONNECTIONS = Gauge("townhall_notifier_inbox_connections", "Inbox streams open on this process.")
INBOX_REPLACED = Counter(
    "townhall_notifier_inbox_replaced_total",
    "Inbox streams ended because their user opened a newer one past notifier.inbox_streams_per_user.",
)
FANOUT_LAG = Histogram(
    "townhall_notifier_fanout_lag_seconds",
    "From a room's start to the acknowledgement of the last fan-out task planned for it.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
FANOUT_TASKS = Counter(
    "townhall_notifier_fanout_tasks_total",
    "Fan-out tasks by lane (fast, bulk) and stage (planned: acknowledged on the lane; done: its "
    "notification records acknowledged).",
    ["lane", "stage"],
)
TASK_LAG = Histogram(
    "townhall_notifier_task_lag_seconds",
    "From a room's start to the acknowledgement of one fan-out task's notification records, by lane.",
    ["lane"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
FORWARDED = Counter(
    "townhall_notifier_forwarded_total",
    "Graph calls forwarded to the notifier that owns the followee, by method.",
    ["method"],
)
HANDOVER_KEYS = Counter(
    "townhall_notifier_handover_keys_total",
    "Graph keys (a followee's followers, a room's reminders) moved between notifiers when their membership "
    "changed: given (handed to their new owner) or taken (taken over from their previous holder).",
    ["direction"],
)
from_zero(HANDOVER_KEYS, "given", "taken")
HANDOVER_PENDING = Gauge(
    "townhall_notifier_handover_pending_keys",
    "Graph keys this notifier holds that another owns in its view, as its last sweep found them; 0 once the "
    "notifier is drained (start the next resize only when it is 0 on every notifier).",
)
