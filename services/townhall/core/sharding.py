"""Rendezvous (highest-random-weight) hashing: which member owns a key.

When a member joins or leaves, only the keys it gains or loses move.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def weight(member: str, key: str) -> int:
    """The member's score for the key; the highest score wins."""
    digest = hashlib.blake2b(f"{member}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(key: str, members: Sequence[str]) -> str:
    """The member that owns `key`; members must not be empty."""
    if not members:
        raise ValueError("no members to own the key")
    return max(members, key=lambda member: weight(member, key))


def ranked(key: str, members: Sequence[str]) -> list[str]:
    """Members in order of preference for `key` (owner first), for fallbacks and placement."""
    return sorted(members, key=lambda member: weight(member, key), reverse=True)
