"""Service credentials: bound to the caller, the member called and the method; short-lived; reused."""

from collections.abc import Callable

import pytest

from townhall.core.auth import AUTHORIZATION, SERVICE_KEY, Authenticator, Metadata, bearer
from townhall.core.config import AuthConfig
from townhall.core.credentials import SERVICE_TTL_S, ServiceCredential, callers
from townhall.core.errors import PermissionDenied, Unauthenticated
from townhall.core.forwarding import Forwarding
from townhall.core.tokens import SigningKey

SERVICE = "svc=" + "s" * 40
ME = "10.0.0.2:50071"
ACQUIRE = "/townhall.internal.v1.Leases/Acquire"


def member(
    kind: str = "admission", me: str = "10.0.0.1:50071", keys: tuple[str, ...] = (SERVICE,)
) -> Authenticator:
    return Authenticator(AuthConfig(service_keys=keys), kind, me)


def check(service: str = "townhall.internal.v1.Leases", method: str = "Acquire") -> object:
    return member(me=ME).services.for_method(service, method)


def test_a_credential_names_its_caller_and_is_accepted_for_its_member_and_method() -> None:
    caller = member().credential
    assert caller is not None
    verified = check()(caller.metadata(ME, ACQUIRE))  # type: ignore[operator]
    assert (verified.kind, verified.member) == ("admission", "10.0.0.1:50071")


# Credentials live a minute: each case mints its own when it runs, never at import (a suite that runs
# other tests first would find them expired and test the expiry instead).
@pytest.mark.parametrize(
    ("metadata", "error", "message"),
    [
        (lambda: (), Unauthenticated, "townhall-service .* is required"),
        (lambda: bearer("a-user-token"), Unauthenticated, "townhall-service .* is required"),
        (lambda: ((SERVICE_KEY, "garbage"),), Unauthenticated, "not a JWT"),
        (
            lambda: member(keys=("svc=" + "x" * 40,)).credential.metadata(ME, ACQUIRE),
            Unauthenticated,
            "does not verify",
        ),
        (
            lambda: member(keys=("other=" + "s" * 40,)).credential.metadata(ME, ACQUIRE),
            Unauthenticated,
            "'other' is not known",
        ),
        (
            lambda: member().credential.metadata("10.0.0.9:50071", ACQUIRE),
            PermissionDenied,
            "not for this call",
        ),
        (
            lambda: member().credential.metadata(ME, "/townhall.internal.v1.Owner/CreateRoom"),
            PermissionDenied,
            "not for this call",
        ),
        (
            lambda: member("relay").credential.metadata(ME, ACQUIRE),
            PermissionDenied,
            "takes calls from admission, not from relay@",
        ),
    ],
    ids=[
        "none",
        "user token",
        "garbage",
        "another key",
        "unknown key id",
        "another member",
        "another method",
        "another kind",
    ],
)
def test_a_credential_for_anything_else_is_refused_saying_why(
    metadata: Callable[[], Metadata], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        check()(metadata())  # type: ignore[operator]


def test_the_credential_is_short_lived_and_reused_until_half_its_life_is_gone() -> None:
    credential = ServiceCredential(SigningKey(*SERVICE.split("=", 1)), "admission", "a:1")
    first = credential.metadata(ME, ACQUIRE, now=1000)
    assert credential.metadata(ME, ACQUIRE, now=1000 + SERVICE_TTL_S / 2 - 1) == first
    assert credential.metadata(ME, ACQUIRE, now=1000 + SERVICE_TTL_S / 2) != first
    assert credential.metadata("b:1", ACQUIRE, now=1000) != first  # one per member and method
    assert SERVICE_TTL_S <= 60


def test_client_ports_refuse_a_service_credential_and_a_forwarded_call_keeps_the_users_token() -> None:
    caller = member()
    with pytest.raises(PermissionDenied, match="only on the internal port"):
        caller.principal((*bearer("t"), *caller.credential.metadata(ME, ACQUIRE)))
    forwarded = Forwarding(caller).forward_metadata(
        bearer("the-users-token"), ME, "/townhall.v1.Rooms/EndRoom"
    )
    assert dict(forwarded)[AUTHORIZATION] == "Bearer the-users-token"  # the owner checks the user itself
    assert SERVICE_KEY in dict(forwarded)


def test_each_internal_method_names_who_may_call_it_and_client_methods_none() -> None:
    assert callers("townhall.internal.v1.Leases", "Acquire") == {"admission"}
    assert callers("townhall.v1.Relay", "Pull") == {"relay"}
    assert callers("townhall.v1.Graph", "Import") == {"notifier", "operator"}
    assert callers("townhall.v1.Graph", "Follow") == {"notifier"}
    assert not callers("townhall.v1.Relay", "Subscribe") and not callers("townhall.v1.Admission", "Join")
