"""Field checks and tickets: every failure says what was wrong."""

import pytest

from townhall.core import validation
from townhall.core.errors import InvalidArgument, PermissionDenied, Unauthenticated
from townhall.core.tickets import TicketSigner
from townhall.v1.common_pb2 import Role

SECRET = "s" * 40


@pytest.mark.parametrize(
    ("value", "message"),
    [("", "room_id is required"), ("x" * 33, "33 characters; at most 32"), ("a b", "may only contain")],
)
def test_bad_room_ids(value: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validation.room_id(value)


def test_user_ids_and_titles() -> None:
    assert validation.user_id(5) == 5
    with pytest.raises(InvalidArgument, match="user_id is required"):
        validation.user_id(0)
    with pytest.raises(InvalidArgument, match=r"within 1\.\."):
        validation.user_id(2**63)
    with pytest.raises(InvalidArgument, match="duplicate"):
        validation.user_ids([1, 1], "speaker_ids", 12)
    with pytest.raises(InvalidArgument, match="13 entries; at most 12"):
        validation.user_ids(range(1, 14), "speaker_ids", 12)
    with pytest.raises(InvalidArgument, match="control characters"):
        validation.title("bad\x07title")
    with pytest.raises(InvalidArgument, match="title is required"):
        validation.title("   ")


def test_ticket_round_trip_and_refusals() -> None:
    signer = TicketSigner(SECRET, ttl_s=60)
    token = signer.sign(signer.issue("room1", 42, Role.ROLE_SPEAKER, "relay-a:1"))
    ticket = signer.verify(token, "relay-a:1")
    assert (ticket.room_id, ticket.user_id, ticket.on_stage) == ("room1", 42, True)
    with pytest.raises(PermissionDenied, match="another relay"):
        signer.verify(token, "relay-b:1")
    with pytest.raises(Unauthenticated, match="not valid"):
        TicketSigner("x" * 40, 60).verify(token, "relay-a:1")
    expired = signer.sign(signer.issue("room1", 42, Role.ROLE_LISTENER, "relay-a:1", now=0))
    with pytest.raises(Unauthenticated, match="expired"):
        signer.verify(expired, "relay-a:1")
    with pytest.raises(Unauthenticated, match="required"):
        signer.verify("", "relay-a:1")
    with pytest.raises(Unauthenticated, match="not valid"):
        signer.verify(token[:-3] + "abc", "relay-a:1")


def test_tickets_are_the_jwt_pyjwt_would_make() -> None:
    """The join path signs tickets itself; the bytes must be what PyJWT makes (and verifies)."""
    import jwt

    signer = TicketSigner("s" * 40, 60)
    for room, upstream in (("Room_1-x", ()), ('odd"room\\', ("10.0.0.1:50052", "10.0.0.2:50052"))):
        ticket = signer.issue(room, 42, Role.ROLE_LISTENER, "10.0.0.3:50052", upstream=upstream)
        claims: dict[str, object] = {
            "sub": "42", "room": room, "role": Role.ROLE_LISTENER, "aud": "10.0.0.3:50052",
            "exp": ticket.expires_at,
        }  # fmt: skip
        if upstream:
            claims["up"] = list(upstream)
        assert signer.sign(ticket) == jwt.encode(claims, b"s" * 40, algorithm="HS256")
        assert signer.verify(signer.sign(ticket), "10.0.0.3:50052") == ticket
