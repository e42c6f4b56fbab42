"""The relays admission knows: configured seeds plus the relays found in the relay-load reports (pure).

Every relay reports its advertised address (the one tickets are bound to and clients dial) and its
load to the compacted relay-load topic every relay.load_report_s, from its start. Admission already
follows that topic to place listeners, so it also learns from it which relays exist: a fresh report
from an unknown relay makes it a candidate, which the health prober then probes with the other
targets. A candidate gets listeners only once a probe found it SERVING, and none while it is down or
draining (NOT_SERVING). A discovered relay is forgotten when it has neither reported for `quiet_s`
nor answers its probes (killed, scaled away), or at once when it says goodbye with a tombstone on the
topic (a clean shutdown). Seeds (admission.relays) are never forgotten; the local topology names
its relays there, the chart names none. The set is bounded by `limit`: reports of further new relays
are ignored (and counted) until one is forgotten.

A relay has two addresses: its identity, the advertised client address (tickets name it, clients dial
it, its reports are keyed by it), and its internal address (relay.internal_advertise, carried in its
reports; admission.relays_internal for seeds), where other relays pull from and where admission probes
it. The two need not reach the same place: on Kubernetes with a NodePort per relay, the client address
is 127.0.0.1:301xx, reachable from the host only. The directory is the one map from identity to internal
address; a report can move a discovered relay's internal address (a pod restarted on a new IP), a seed's
configured one stays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from townhall.admission.metrics import RELAY_REPORTS_IGNORED
from townhall.core import logging

log = logging.get(__name__)


class RelayDirectory:
    """Seeds plus discovered relays: probe targets, and the ones that may get listeners."""

    def __init__(
        self, seeds: Iterable[str], limit: int, quiet_s: float, seeds_internal: Iterable[str] = ()
    ) -> None:
        self._seeds = list(dict.fromkeys(seeds))
        if limit < len(self._seeds):
            raise ValueError(f"limit {limit} is below the {len(self._seeds)} seed relays")
        self._limit = limit
        self._quiet_s = quiet_s
        # Discovered relay -> when its last report was made (the placer's clock: Unix seconds).
        self._reported: dict[str, float] = {}
        # Relay -> its internal address: seeds' from config, discovered relays' from their reports.
        self._configured = {r: i for r, i in zip(seeds, seeds_internal, strict=False) if i}
        self._internal: dict[str, str] = dict(self._configured)
        # Bumped whenever an internal address changes, so callers can cache what they derive from them.
        self.version = 0
        self.ignored = 0  # reports of new relays refused because the set was full

    def report(self, relay: str, at: float, now: float, internal: str = "") -> bool:
        """Takes one load report (with the relay's internal address, if it gives one); True if it made
        `relay` a new candidate."""
        if relay in self._reported:
            self._reported[relay] = max(self._reported[relay], at)
            self._learn(relay, internal)
            return False
        if relay in self._seeds:
            if relay not in self._configured:
                self._learn(relay, internal)
            return False
        if now - at >= self._quiet_s:
            # A report this old (a relay long gone, read back from the compacted topic at start) names
            # nothing worth probing.
            return False
        if len(self._seeds) + len(self._reported) >= self._limit:
            self.ignored += 1
            RELAY_REPORTS_IGNORED.inc()
            return False
        self._reported[relay] = at
        self._learn(relay, internal)
        log.info("relay discovered", relay=relay, internal=internal or relay)
        return True

    def internal(self, relay: str) -> str:
        """Where to reach `relay` from inside the cluster (probes, pulls): its internal address, or its
        identity when none is known."""
        return self._internal.get(relay, relay)

    def _learn(self, relay: str, internal: str) -> None:
        if internal and self._internal.get(relay) != internal:
            self._internal[relay] = internal
            self.version += 1

    def _forget(self, relay: str) -> None:
        del self._reported[relay]
        if self._internal.pop(relay, None) is not None:
            self.version += 1

    def gone(self, relay: str) -> bool:
        """The relay said goodbye (a tombstone on the topic); True if it was a discovered relay."""
        if relay not in self._reported:
            return False
        self._forget(relay)
        log.info("relay left", relay=relay)
        return True

    def targets(self) -> list[str]:
        """Every known relay, seeds first: what the health prober probes (at their internal addresses)."""
        return [*self._seeds, *self._reported]

    def placeable(self, serving: Callable[[str], bool]) -> list[str]:
        """Seeds and the discovered relays a probe found serving: the relays listeners may be placed on.

        Seeds stay listed while down (the placer skips down relays, and falls back on the seeds when
        none is serving); a discovered relay is only listed while its last probe found it serving.
        """
        return [*self._seeds, *(r for r in self._reported if serving(r))]

    def prune(self, serving: Callable[[str], bool], now: float) -> list[str]:
        """Forgets discovered relays that have gone quiet and do not answer probes; returns them."""
        gone = [r for r, at in self._reported.items() if now - at >= self._quiet_s and not serving(r)]
        for relay in gone:
            self._forget(relay)
            log.info("relay forgotten: quiet and not answering probes", relay=relay)
        return gone

    def __len__(self) -> int:
        return len(self._seeds) + len(self._reported)
