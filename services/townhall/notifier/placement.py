"""Which notifier holds a followee's graph shard and a room's reminders (rendezvous hashing).

The members are this notifier's view of the membership: static (notifier.members) or the notifier
StatefulSet's pods, which change when it is scaled. A view carries an epoch that grows with every change
(the StatefulSet's generation; 0 for static members), so two notifiers can tell whose view is newer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from townhall.core import sharding
from townhall.notifier.store import followee_key, room_key


class ShardOwners:
    """This notifier's view of the members; with no members it owns everything."""

    def __init__(self, me: str, members: Sequence[str], epoch: int = 0) -> None:
        self.me = me
        self.members: tuple[str, ...] = ()
        self.epoch = epoch
        self.set_view(members, epoch)

    def set_view(self, members: Sequence[str], epoch: int) -> bool:
        """Takes a new view of the members; True if it differs from the last one."""
        view = tuple(sorted(set(members)))
        changed = (view, epoch) != (self.members, self.epoch)
        self.members, self.epoch = view, epoch
        return changed

    @property
    def alone(self) -> bool:
        """Whether this process is the only notifier (it holds the whole graph)."""
        return not self.members or self.members == (self.me,)

    def owner(self, key: str) -> str:
        """The member that owns a graph key ("user:<id>" or "room:<id>")."""
        return self.me if not self.members else sharding.owner(key, self.members)

    def owns(self, key: str) -> bool:
        """Whether this notifier owns `key` in its view."""
        return self.owner(key) == self.me

    def followee_owner(self, followee: int) -> str:
        """The member whose store holds `followee`'s followers."""
        return self.owner(followee_key(followee))

    def room_owner(self, room_id: str) -> str:
        """The member that stores and plans the reminders of `room_id`."""
        return self.owner(room_key(room_id))

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
