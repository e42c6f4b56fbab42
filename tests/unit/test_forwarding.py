"""Forwarded calls: a member's service credential marks them; a client can neither forge nor reuse one."""

import pytest

from townhall.core.auth import AUTHORIZATION, SERVICE_KEY, Authenticator, bearer
from townhall.core.config import AuthConfig
from townhall.core.errors import PermissionDenied
from townhall.core.forwarding import FORWARDED_KEY, Forwarding

SERVICE = "svc=" + "s" * 40


def members(service_keys: tuple[str, ...] = (SERVICE,)) -> Forwarding:
    return Forwarding(Authenticator(AuthConfig(service_keys=service_keys)))


def test_a_forwarded_call_carries_the_users_token_and_is_recognised() -> None:
    forwarding = members()
    forwarded = forwarding.forward_metadata(bearer("the-users-token"))
    assert dict(forwarded)[AUTHORIZATION] == "Bearer the-users-token"  # the owner checks the user itself
    assert forwarding.check_metadata(forwarded) is True
    assert forwarding.check_metadata(bearer("the-users-token")) is False  # a plain client call
    # An internal call (an operator's import) has the credential but is not a forwarded one.
    assert forwarding.check_metadata(forwarding.internal()) is False


def test_a_client_cannot_mark_its_call_as_forwarded() -> None:
    with pytest.raises(PermissionDenied, match="townhall-forwarded is reserved"):
        members().check_metadata((*bearer("t"), (FORWARDED_KEY, "1")))


@pytest.mark.parametrize(
    "metadata",
    [
        ((SERVICE_KEY, "1"),),  # what a client would try
        members(("svc=" + "x" * 40,)).internal(),  # signed with another service key
        members(("other=" + "s" * 40,)).internal(),  # a key id this member does not know
    ],
    ids=["garbage", "another key", "unknown key id"],
)
def test_a_mark_that_does_not_verify_is_refused(metadata: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(PermissionDenied, match="reserved for Townhall services"):
        members()._auth.service(metadata)


def test_the_credential_is_renewed_before_it_expires() -> None:
    credential = Authenticator(AuthConfig(service_keys=(SERVICE,))).credential
    first = credential.metadata(now=1000)
    assert credential.metadata(now=1100) == first
    assert credential.metadata(now=1000 + 300 - 59) != first  # within its last minute
