"""Which notifier holds a followee's graph shard and a room's reminders (rendezvous hashing)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from townhall.core import sharding


class Placement:
    """This notifier's view of the static member list; with no members it owns everything."""

    def __init__(self, me: str, members: Sequence[str]) -> None:
        self.me = me
        self.members = tuple(sorted(set(members)))

    @property
    def alone(self) -> bool:
        """Whether this process holds the whole graph."""
        return len(self.members) <= 1

    def followee_owner(self, followee: int) -> str:
        """The member whose store holds `followee`'s followers."""
        return self.me if self.alone else sharding.owner(f"user:{followee}", self.members)

    def room_owner(self, room_id: str) -> str:
        """The member that stores and plans the reminders of `room_id`."""
        return self.me if self.alone else sharding.owner(f"room:{room_id}", self.members)

    def owns_followee(self, followee: int) -> bool:
        """Whether `followee`'s graph shard is here."""
        return self.followee_owner(followee) == self.me

    def owns_room(self, room_id: str) -> bool:
        """Whether `room_id`'s reminders are here."""
        return self.room_owner(room_id) == self.me

    def split_pairs(self, pairs: np.ndarray) -> dict[str, np.ndarray]:
        """(followee, follower) rows grouped by the member that owns each followee."""
        if self.alone or not len(pairs):
            return {self.me: pairs}
        followees, inverse = np.unique(pairs[:, 0], return_inverse=True)
        names = self.members
        owner_index = np.array([names.index(self.followee_owner(int(f))) for f in followees], dtype=np.int64)[
            inverse
        ]
        return {names[i]: pairs[owner_index == i] for i in np.unique(owner_index).tolist()}
