"""The forwarded-call mark: members can set it, clients cannot forge or replay it for long."""

import pytest

from townhall.core.errors import PermissionDenied
from townhall.core.forwarding import FORWARDED_KEY, MAX_AGE_S, Forwarding
from townhall.core.identity import USER_KEY

SECRET = "k" * 40


def test_a_members_mark_verifies_and_a_plain_call_is_not_forwarded() -> None:
    forwarding = Forwarding(SECRET)
    assert forwarding.check_metadata(forwarding.sign(42, now=1000), now=1001) is True
    assert forwarding.check_metadata(((USER_KEY, "42"),), now=1001) is False


@pytest.mark.parametrize(
    "metadata",
    [
        ((USER_KEY, "42"), (FORWARDED_KEY, "1")),  # what a client would try
        Forwarding("x" * 40).sign(42, now=1000),  # signed with another secret
        tuple(
            (USER_KEY, "43") if k == USER_KEY else (k, v) for k, v in Forwarding(SECRET).sign(42, now=1000)
        ),
        Forwarding(SECRET).sign(42, now=1000 - MAX_AGE_S - 1),  # too old to be a live forward
    ],
    ids=["forged", "other-secret", "other-user", "stale"],
)
def test_a_mark_that_does_not_verify_is_refused(metadata: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(PermissionDenied, match="reserved for calls between Townhall members"):
        Forwarding(SECRET).check_metadata(metadata, now=1000)
