"""Lane choice for workers: the fast lane first; the bulk lane gets at most a share while fast waits."""

from __future__ import annotations


class LaneChooser:
    """Counts tasks served per lane while fast-lane work keeps coming, and says when bulk may go."""

    def __init__(self, bulk_share: float) -> None:
        if not 0 <= bulk_share < 1:
            raise ValueError(f"bulk_share must be within 0..1, not {bulk_share}")
        self._share = bulk_share
        self._fast = 0
        self._bulk = 0

    def served(self, fast: int = 0, bulk: int = 0) -> None:
        """Counts tasks run while fast work was waiting."""
        self._fast += fast
        self._bulk += bulk

    def bulk_allowance(self) -> int:
        """Bulk tasks that may run now although fast work waits, keeping bulk <= share of all served."""
        if self._share <= 0:
            return 0
        room = (self._share * (self._fast + self._bulk) - self._bulk) / (1 - self._share)
        return max(0, int(room + 1e-9))

    def idle(self) -> None:
        """The fast lane is empty: bulk may take everything, and the count starts over."""
        self._fast = self._bulk = 0
