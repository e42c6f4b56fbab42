"""The HS256 shortcut never accepts a token PyJWT would refuse, and accepts plain good ones."""

from __future__ import annotations

import base64
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from townhall.core.tokens import accept_hs256

SECRET = b"k" * 40
NOW = int(time.time())  # claims are drawn around the real clock, which PyJWT reads
HEADER = base64.urlsafe_b64encode(b'{"alg":"HS256","kid":"k1","typ":"JWT"}').rstrip(b"=").decode()

claim_values = st.one_of(
    st.none(),
    st.integers(min_value=NOW - 100, max_value=NOW + 100),
    st.floats(min_value=NOW - 100, max_value=NOW + 100),
    st.sampled_from(["townhall", "idp", ["townhall"], ["x", "townhall"], [1, "townhall"]]),
    st.text(max_size=8),
    st.just(str(NOW + 50)),
    st.booleans(),
    st.lists(st.text(max_size=4), max_size=3),
)
_NAMES = ["exp", "iat", "nbf", "sub", "jti", "aud", "iss", "grants"]


@st.composite
def claims_strategy(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly good claims (so tampering is tried on tokens that would pass), each member maybe replaced
    or removed."""
    claims: dict[str, Any] = {"sub": "42", "exp": NOW + 3600, "iat": NOW - 5, "grants": ["subscribe"]}
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
        ({"sub": "42", "exp": NOW + 3600, "iat": NOW, "grants": ["subscribe"]}, None, None),
        ({"sub": "42", "exp": NOW + 3600, "aud": "townhall", "iss": "idp"}, "townhall", "idp"),
        ({"sub": "42", "exp": NOW + 3600, "aud": ["other", "townhall"]}, "townhall", None),
    ],
)
def test_plain_good_tokens_take_the_shortcut(
    claims: dict[str, Any], audience: str | None, issuer: str | None
) -> None:
    token = _token(claims)
    assert accept_hs256(token, SECRET, ["exp", "sub"], audience, issuer, 0, now=NOW) == claims
    assert _pyjwt(token, ["exp", "sub"], audience, issuer, 0) == claims
