"""The join decision, pure: admit a listener, tell it to wait, or say the room is full.

Read from the room's allowance on this process (leases.Allowance) and the clock, nothing else: no
call, no lock, no change of state. The Admitter acts on the answer (takes the admit within the fair
process budget, or a place in the room's waiting line) and the servicer counts it.
"""

from __future__ import annotations

from townhall.admission.leases import Allowance

# Decisions: plain strings compared by identity (an Enum's attribute lookup costs a call per join).
REJOIN = "rejoin"  # the user holds a seat here already: no admit is used
ADMIT = "admit"  # an admit is spare here: the user takes it, if the process budget allows
WAIT = "wait"  # none spare, but more is on its way (or the owner is changing): a place in line
FULL = "full"  # none spare and the owner said the room has none left: shed with a retry-after

# A waiting user comes back after about this long per place ahead of them, within these bounds.
WAIT_MS_PER_PLACE = 2.0
WAIT_MS = (200, 3_000)


def decide(allowance: Allowance, user: int, now: float) -> str:
    """REJOIN, ADMIT, WAIT or FULL for `user` joining as a listener, at `now` (time.monotonic()).

    Spare admits go to whoever asks first: holding them for waiting users who may never come back
    would leave capacity idle during a storm (the waiting line only orders the waiting answers).
    Without a spare admit a user waits while capacity can still come: a refill is in flight, the
    owner has not said the room is exhausted (or said so longer ago than it asks us to wait), or
    the owner could not answer for a while (unreachable, or rebuilding its book after a take-over).
    """
    if user in allowance.listeners:
        return REJOIN
    if allowance.spare > 0:
        return ADMIT
    if allowance.refilling or now >= allowance.exhausted_until or now < allowance.owner_busy_until:
        return WAIT
    return FULL


def wait_ms(ahead: int, jitter: float = 1.0) -> int:
    """The retry-after of a user told to wait with `ahead` users before it, times `jitter` (0.8-1.2)."""
    return int(min(WAIT_MS[1], max(WAIT_MS[0], (ahead + 1) * WAIT_MS_PER_PLACE)) * jitter)
