"""Field checks and tickets: every failure says what was wrong."""

import jwt
import pytest

from townhall.core import validation
from townhall.core.config import parse_ticket_keys
from townhall.core.errors import InvalidArgument, PermissionDenied, Unauthenticated
from townhall.core.tickets import TicketSigner, TicketVerifier
from townhall.core.tokens import es256_public
from townhall.v1.common_pb2 import Role


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


@pytest.mark.parametrize(
    ("title", "refused"),
    [
        ("\u202eevil", "U+202E RIGHT-TO-LEFT OVERRIDE at position 0"),
        ("a\u2066b", "U+2066 LEFT-TO-RIGHT ISOLATE"),
        ("x\u200by", "U+200B ZERO WIDTH SPACE"),
        ("word\u200d\U0001f600", "U+200D ZERO WIDTH JOINER"),  # a joiner after a letter
        ("\U0001f600\u200d", "U+200D ZERO WIDTH JOINER"),  # at the end
        ("next\u2028line", "U+2028 LINE SEPARATOR"),
        ("c1\x9bcontrol", "control characters"),
        ("Arabic mark\u061c", "U+061C ARABIC LETTER MARK"),
    ],
)
def test_titles_refuse_invisible_and_direction_characters(title: str, refused: str) -> None:
    with pytest.raises(InvalidArgument, match=refused.replace("+", r"\+")):
        validation.title(title)


def test_titles_keep_emoji_sequences_and_right_to_left_scripts() -> None:
    for title in ("\U0001f469\u200d\U0001f4bb coding", "\u2764\ufe0f\u200d\U0001f525", "שלום", "سلام"):
        assert validation.title(title) == title


def keys(kid: str, byte: int) -> tuple[TicketSigner, str]:
    """An ES256 ticket signer (admission's side) and its public key entry (what relays hold)."""
    signer = TicketSigner(kid, bytes([byte]) * 32, 60)
    return signer, signer.public_key()


def verifier(*public: str) -> TicketVerifier:
    return TicketVerifier(parse_ticket_keys("tickets.public_keys", public, False))


def test_ticket_round_trip_and_refusals() -> None:
    signer, public = keys("k1", 1)
    relay = verifier(public)
    token = signer.sign(signer.issue("room1", 42, Role.ROLE_SPEAKER, "relay-a:1"))
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": "k1", "typ": "JWT"}
    ticket = relay.verify(token, "relay-a:1")
    assert (ticket.room_id, ticket.user_id, ticket.on_stage) == ("room1", 42, True)
    with pytest.raises(PermissionDenied, match="another relay"):
        relay.verify(token, "relay-b:1")
    with pytest.raises(Unauthenticated, match="does not verify with key 'k1'"):
        verifier(keys("k1", 2)[1]).verify(token, "relay-a:1")
    with pytest.raises(Unauthenticated, match="key id 'k1' is not known here"):
        verifier(keys("k2", 1)[1]).verify(token, "relay-a:1")
    expired = signer.sign(signer.issue("room1", 42, Role.ROLE_LISTENER, "relay-a:1", now=0))
    with pytest.raises(Unauthenticated, match=r"expired at 1970-01-01 00:01:00 UTC .*join the room again"):
        relay.verify(expired, "relay-a:1")
    with pytest.raises(Unauthenticated, match="required"):
        relay.verify("", "relay-a:1")
    body, _, signature = token.rpartition(".")
    tampered = body + "." + signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    with pytest.raises(Unauthenticated, match="does not verify"):
        relay.verify(tampered, "relay-a:1")
    with pytest.raises(Unauthenticated, match="not a JWT"):
        relay.verify("garbage", "relay-a:1")
    # What a relay holds cannot sign: an HS256 ticket keyed with the public key is refused by its alg.
    forged = jwt.encode(
        {"sub": "42", "room": "room1", "role": 1, "aud": "relay-a:1", "exp": 2**40},
        public.partition("=")[2].encode(),
        algorithm="HS256",
        headers={"kid": "k1"},
    )
    with pytest.raises(Unauthenticated, match="says alg 'HS256', but key 'k1' is for ES256"):
        relay.verify(forged, "relay-a:1")


def test_tickets_rotate_sign_with_one_key_verify_with_any_listed() -> None:
    """Relays list the new public key next to the old; admission then signs with the new one."""
    (old, old_public), (new, new_public) = keys("old", 1), keys("new", 2)
    by_old = old.sign(old.issue("r", 1, Role.ROLE_LISTENER, "relay:1"))
    by_new = new.sign(new.issue("r", 1, Role.ROLE_LISTENER, "relay:1"))
    assert jwt.get_unverified_header(by_new)["kid"] == "new"
    during = verifier(new_public, old_public)
    assert during.verify(by_old, "relay:1").user_id == during.verify(by_new, "relay:1").user_id == 1
    after = verifier(new_public)
    assert after.verify(by_new, "relay:1").room_id == "r"
    with pytest.raises(Unauthenticated, match="'old' is not known"):
        after.verify(by_old, "relay:1")


def test_tickets_are_the_jwt_pyjwt_verifies_with_the_public_key() -> None:
    """The join path signs tickets itself; PyJWT must read them with the public key alone."""
    signer, public = keys("k1", 3)
    key = TicketVerifier(parse_ticket_keys("tickets.public_keys", (public,), False))
    for room, upstream in (("Room_1-x", ()), ('odd"room\\', ("10.0.0.1:50072", "10.0.0.2:50072"))):
        ticket = signer.issue(room, 42, Role.ROLE_LISTENER, "10.0.0.3:50052", upstream=upstream)
        token = signer.sign(ticket)
        claims = jwt.decode(
            token,
            es256_public("k1", parse_ticket_keys("k", (public,), False)[0][1]),
            algorithms=["ES256"],
            audience="10.0.0.3:50052",
        )
        assert claims == {
            "sub": "42",
            "room": room,
            "role": Role.ROLE_LISTENER,
            "aud": "10.0.0.3:50052",
            "exp": ticket.expires_at,
            **({"up": list(upstream)} if upstream else {}),
            "at": ticket.issued_ms,
        }
        assert key.verify(token, "10.0.0.3:50052") == ticket


@pytest.mark.parametrize("value", ["10.0.0.1:50051", "admission-0.admission:50051", "[fd00::1]:50051"])
def test_member_addresses(value: str) -> None:
    assert validation.address(value, "member") == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "member is required"),
        ("no-port", "member must be host:port"),
        ("h:99999", "member must be host:port"),
        ("bad host:1", "member must be host:port"),
        ("h" * 300 + ":1", "302 characters; at most 255"),
    ],
)
def test_bad_member_addresses(value: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validation.address(value, "member")


def test_bounded_names_the_field() -> None:
    assert validation.bounded(5, "limit", 0, 10) == 5
    with pytest.raises(
        InvalidArgument, match=r"after_id must be within 0\.\.9223372036854775807, not 9223372036854775808"
    ):
        validation.bounded(2**63, "after_id", 0, validation.USER_ID_MAX)


def test_a_ticket_carries_the_room_version_it_was_issued_at() -> None:
    """Relays compare it with the room's removals (`v`); tickets without it are version 0."""
    signer, public = keys("k1", 4)
    relay = verifier(public)
    token = signer.sign(signer.issue("r", 42, Role.ROLE_SPEAKER, "relay:1", room_version=17))
    assert jwt.decode(token, options={"verify_signature": False})["v"] == 17
    assert relay.verify(token, "relay:1").room_version == 17
    unversioned = signer.sign(signer.issue("r", 42, Role.ROLE_SPEAKER, "relay:1"))
    assert relay.verify(unversioned, "relay:1").room_version == 0
