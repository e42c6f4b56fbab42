"""The relays admission knows: configured seeds plus the relays found in the relay-load reports (pure).

Every relay reports its advertised address (the one tickets are bound to and clients dial) and its
load to the compacted relay-load topic every relay.load_report_ms, from its start. Admission already
follows that topic to place listeners, so it also learns from it which relays exist: a fresh report
from an unknown relay makes it a candidate, which the health prober then probes with the other
targets. A candidate gets listeners only once a probe found it SERVING, and none while it is down or
draining (NOT_SERVING). A discovered relay is forgotten when it has neither reported for `quiet_s`
nor answers its probes (killed, scaled away), or at once when it says goodbye with a tombstone on the
topic (a clean shutdown). Seeds (admission.relays) are never forgotten; the local topology names
its relays there, the chart names none. The set is bounded by `limit`: reports of further new relays
are ignored (and counted) until one is forgotten.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from townhall.admission.metrics import RELAY_REPORTS_IGNORED
from townhall.core import logging

log = logging.get(__name__)


class RelayDirectory:
    """Seeds plus discovered relays: probe targets, and the ones that may get listeners."""

    def __init__(self, seeds: Iterable[str], limit: int, quiet_s: float) -> None:
        self._seeds = list(dict.fromkeys(seeds))
        if limit < len(self._seeds):
            raise ValueError(f"limit {limit} is below the {len(self._seeds)} seed relays")
        self._limit = limit
        self._quiet_s = quiet_s
        # Discovered relay -> when its last report was made (the placer's clock: Unix seconds).
        self._reported: dict[str, float] = {}
        self.ignored = 0  # reports of new relays refused because the set was full

    def report(self, relay: str, at: float, now: float) -> bool:
        """Takes one load report; True if it made `relay` a new candidate."""
        if relay in self._reported:
            self._reported[relay] = max(self._reported[relay], at)
            return False
        if relay in self._seeds or now - at >= self._quiet_s:
            # A seed is known already; a report this old (a relay long gone, read back from the
            # compacted topic at start) names nothing worth probing.
            return False
        if len(self._seeds) + len(self._reported) >= self._limit:
            self.ignored += 1
            RELAY_REPORTS_IGNORED.inc()
            return False
        self._reported[relay] = at
        log.info("relay discovered", relay=relay)
        return True

    def gone(self, relay: str) -> bool:
        """The relay said goodbye (a tombstone on the topic); True if it was a discovered relay."""
        if self._reported.pop(relay, None) is None:
            return False
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
            del self._reported[relay]
            log.info("relay forgotten: quiet and not answering probes", relay=relay)
        return gone

    def __len__(self) -> int:
        return len(self._seeds) + len(self._reported)
