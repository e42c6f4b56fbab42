"""The HS256 shortcut never accepts a token PyJWT would refuse, and accepts plain good ones."""

from __future__ import annotations

import base64
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from townhall.core.auth import Authenticator
from townhall.core.config import (
    DEV_AUTH,
    DEV_TICKET_PRIVATE_KEY,
    DEV_TICKET_PUBLIC_KEY,
    DEV_USER_KEY,
    TicketConfig,
    parse_ticket_keys,
)
from townhall.core.errors import PermissionDenied, Unauthenticated
from townhall.core.tickets import TicketVerifier
from townhall.core.tokens import accept_hs256

SECRET = b"k" * 40
HEADER = base64.urlsafe_b64encode(b'{"alg":"HS256","kid":"k1","typ":"JWT"}').rstrip(b"=").decode()


@dataclass(frozen=True)
class At:
    """A time claim drawn as an offset from the clock when the example runs (PyJWT reads the real
    clock): drawn at import, a suite running long before this would leave every token expired."""

    offset: float
    text: bool = False

    def at(self, now: int) -> Any:
        """The claim's value at `now`: a number, or its text."""
        value = now + self.offset
        return str(value) if self.text else value


def at(claims: dict[str, Any], now: int) -> dict[str, Any]:
    """`claims` with every At replaced by its value at `now`."""
    return {name: value.at(now) if isinstance(value, At) else value for name, value in claims.items()}


claim_values = st.one_of(
    st.none(),
    st.integers(min_value=-100, max_value=100).map(At),
    st.floats(min_value=-100, max_value=100).map(At),
    st.sampled_from(["townhall", "idp", ["townhall"], ["x", "townhall"], [1, "townhall"]]),
    st.text(max_size=8),
    st.just(At(50, text=True)),
    st.booleans(),
    st.lists(st.text(max_size=4), max_size=3),
)
_NAMES = ["exp", "iat", "nbf", "sub", "jti", "aud", "iss", "grants"]


@st.composite
def claims_strategy(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly good claims (so tampering is tried on tokens that would pass), each member maybe replaced
    or removed; times are At offsets."""
    claims: dict[str, Any] = {"sub": "42", "exp": At(3600), "iat": At(-5), "grants": ["subscribe"]}
    for name in draw(st.lists(st.sampled_from(_NAMES), max_size=3, unique=True)):
        value = draw(claim_values)
        if value is None and draw(st.booleans()):
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def _pyjwt(token: str, require: list[str], audience: str | None, issuer: str | None, leeway: int) -> Any:
    try:
        return jwt.decode(
            token, SECRET, algorithms=["HS256"], audience=audience, issuer=issuer, leeway=leeway,
            options={"require": require},
        )  # fmt: skip
    except jwt.InvalidTokenError:
        return None


def _token(claims: dict[str, Any], secret: bytes = SECRET) -> str:
    """An HS256 JWT of `claims` (any JSON values, which PyJWT's encoder would refuse to make)."""
    body = HEADER + "." + base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    signature = hmac.digest(secret, body.encode(), "sha256")
    return body + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    claims=claims_strategy(),
    audience=st.sampled_from([None, "townhall"]),
    issuer=st.sampled_from([None, "idp"]),
    leeway=st.sampled_from([0, 30]),
    tamper=st.sampled_from(["none", "signature", "payload", "secret", "garbage", "padding"]),
)
def test_the_shortcut_accepts_only_what_pyjwt_accepts_and_with_the_same_claims(
    claims: dict[str, Any], audience: str | None, issuer: str | None, leeway: int, tamper: str
) -> None:
    claims = at(claims, int(time.time()))
    token = _token(claims, secret=b"other" * 8 if tamper == "secret" else SECRET)
    if tamper == "signature":
        token = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    elif tamper == "payload":
        head, payload, sig = token.split(".")
        token = f"{head}.{payload[:-1]}{'A' if payload[-1] != 'A' else 'B'}.{sig}"
    elif tamper == "garbage":
        token = token.replace(".", ".*", 1)
    elif tamper == "padding":
        token += "=="
    require = ["exp", "sub"]
    fast = accept_hs256(token, SECRET, require, audience, issuer, leeway, now=time.time())
    reference = _pyjwt(token, require, audience, issuer, leeway)
    if fast is not None:
        assert reference == fast, "the shortcut accepted what PyJWT refuses, or read other claims"
    if tamper == "none" and reference is not None and audience is None and issuer is None:
        plain = all(type(claims.get(n, 0)) is int for n in ("exp", "iat", "nbf")) and "aud" not in claims
        plain = plain and all(isinstance(claims.get(n, ""), str) for n in ("sub", "jti"))
        if plain:
            assert fast == reference, "a plain good token missed the shortcut"


@pytest.mark.parametrize(
    ("claims", "audience", "issuer"),
    [
        ({"sub": "42", "exp": At(3600), "iat": At(0), "grants": ["subscribe"]}, None, None),
        ({"sub": "42", "exp": At(3600), "aud": "townhall", "iss": "idp"}, "townhall", "idp"),
        ({"sub": "42", "exp": At(3600), "aud": ["other", "townhall"]}, "townhall", None),
    ],
)
def test_plain_good_tokens_take_the_shortcut(
    claims: dict[str, Any], audience: str | None, issuer: str | None
) -> None:
    now = int(time.time())
    claims = at(claims, now)
    token = _token(claims)
    assert accept_hs256(token, SECRET, ["exp", "sub"], audience, issuer, 0, now=now) == claims
    assert _pyjwt(token, ["exp", "sub"], audience, issuer, 0) == claims


# ---------------------------------------------------------------- malformed tokens: never anything but a refusal

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**17, max_value=10**400),  # past any time, past a float
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)


def _nested(depth: int, inner: bytes = b"1") -> bytes:
    return b"[" * depth + inner + b"]" * depth


@st.composite
def json_texts(draw: st.DrawFn, good: bytes) -> bytes:
    """A header or payload: the good one with members replaced by any JSON (wrong types, huge numbers),
    JSON nested deeper than the parser goes, huge literal numbers, or bytes that are not JSON at all."""
    kind = draw(st.sampled_from(["members", "nested", "nested member", "number", "raw"]))
    if kind == "members":
        base = json.loads(good)
        for name in draw(st.lists(st.sampled_from([*base, "grants", "aud", "up", "v"]), max_size=3)):
            base[name] = draw(json_values)
        return json.dumps(base, allow_nan=True).encode()
    if kind == "nested":
        return _nested(draw(st.integers(500, 3000)))
    if kind == "nested member":
        member = draw(st.sampled_from([*json.loads(good), "x"]))
        depth = draw(st.integers(500, 3000))
        return good[:-1] + b',"' + member.encode() + b'":' + _nested(depth) + b"}"
    if kind == "number":
        member = draw(st.sampled_from([*json.loads(good), "x"]))
        digits = draw(st.sampled_from([b"9" * 400, b"9" * 5000, b"1e999", b"-1e999", b"1E400"]))
        return good[:-1] + b',"' + member.encode() + b'":' + digits + b"}"
    return draw(st.binary(max_size=200))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@st.composite
def malformed_tokens(
    draw: st.DrawFn, alg: str, kid: str, sign: Callable[[bytes], bytes], good_payload: bytes
) -> str:
    """A token built to break a parser; signed with the right key most of the time, so it gets past
    the signature to the claims."""
    good_header = json.dumps({"alg": alg, "kid": kid, "typ": "JWT"}).encode()
    header = good_header if draw(st.booleans()) else draw(json_texts(good_header))
    payload = draw(json_texts(good_payload))
    if draw(st.integers(0, 9)) == 0:  # segments that are not base64url at all
        return draw(st.sampled_from(["", ".", "..", "a.b", "@@@.###.$$$", "a.b.c.d"])) + draw(
            st.text(max_size=20)
        )
    body = f"{_b64(header)}.{_b64(payload)}"
    signature = sign(body.encode()) if draw(st.integers(0, 4)) else b"forged"
    return f"{body}.{_b64(signature)}"


def _es256(body: bytes) -> bytes:
    """A JOSE ES256 signature of `body` with the development ticket key."""
    r, s_ = decode_dss_signature(_TICKET_KEY.sign(body, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s_.to_bytes(32, "big")


_AUTH = Authenticator(DEV_AUTH)
_USER_KID, _USER_SECRET = DEV_USER_KEY.split("=", 1)
((_TICKET_KID, _SCALAR),) = parse_ticket_keys("tickets.private_key", (DEV_TICKET_PRIVATE_KEY,), True)
_TICKET_KEY = ec.derive_private_key(int.from_bytes(_SCALAR, "big"), ec.SECP256R1())
_TICKETS = TicketVerifier.from_config(TicketConfig(public_keys=(DEV_TICKET_PUBLIC_KEY,)))
_RELAY = "relay:1"


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_a_malformed_token_or_ticket_is_unauthenticated_with_a_message_on_both_paths(
    data: st.DataObject,
) -> None:
    """Bad base64, bad JSON, JSON nested past the parser's depth (header or payload), huge numbers and
    wrong types: a refusal saying what is wrong, never another exception (which a server answers INTERNAL).
    User tokens go through the HS256 shortcut and PyJWT (a plain header takes the shortcut first),
    tickets (ES256) through PyJWT."""
    expires = int(time.time()) + 3600
    user_payload = json.dumps({"sub": "42", "exp": expires, "grants": ["subscribe"]}).encode()
    ticket_payload = json.dumps(
        {"sub": "42", "room": "r1", "role": 3, "aud": _RELAY, "exp": expires}
    ).encode()
    user_secret = _USER_SECRET.encode()
    cases = [
        (
            data.draw(
                malformed_tokens(
                    "HS256", _USER_KID, lambda b: hmac.digest(user_secret, b, "sha256"), user_payload
                )
            ),
            _AUTH.users.verify,
        ),
        (
            data.draw(malformed_tokens("ES256", _TICKET_KID, _es256, ticket_payload)),
            lambda token: _TICKETS.verify(token, _RELAY),
        ),
    ]
    for token, verify in cases:
        try:
            verify(token)
        except (Unauthenticated, PermissionDenied) as refused:
            assert str(refused).strip()
