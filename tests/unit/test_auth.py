"""User tokens: what a client presenting one notices (accepted, or refused with the reason), rotation, cache."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from townhall.core.auth import (
    GRANTS,
    Authenticator,
    Metadata,
    Principal,
    Tokens,
    bearer,
    internal_service,
    mint,
    principal_from,
    rule,
    signing_key,
)
from townhall.core.config import AuthConfig
from townhall.core.errors import Unauthenticated
from townhall.core.tokens import SigningKey, Verifier

K1 = "k1=" + "a" * 40
K2 = "k2=" + "b" * 40


def auth(**changes: Any) -> Authenticator:
    return Authenticator(AuthConfig(**{"keys": (K1, K2), **changes}))


def token(kid_secret: str = K1, user: int = 42, grants: tuple[str, ...] = ("subscribe",), **kw: Any) -> str:
    return mint(SigningKey(*kid_secret.split("=", 1)), user, grants, **kw)


def test_a_valid_token_gives_the_user_and_its_grants() -> None:
    who = auth().principal(bearer(token(grants=("host", "subscribe", "someday"))))
    assert who == Principal(42, frozenset({"host", "subscribe"}))  # grants it does not know are left out


def test_minted_tokens_are_the_jwts_pyjwt_would_make() -> None:
    minted = token(grants=("subscribe", "host"), now=1000, ttl_s=60, issuer="idp", audience="townhall")
    claims = {
        "sub": "42",
        "iat": 1000,
        "exp": 1060,
        "grants": ["host", "subscribe"],
        "iss": "idp",
        "aud": "townhall",
    }
    assert minted == jwt.encode(claims, "a" * 40, algorithm="HS256", headers={"kid": "k1"})


def _without_kid() -> str:
    return jwt.encode({"sub": "42", "exp": int(time.time()) + 60}, "a" * 40, algorithm="HS256")


def _unsigned() -> str:
    return jwt.encode(
        {"sub": "42", "exp": int(time.time()) + 60}, None, algorithm="none", headers={"kid": "k1"}
    )


# Tokens are minted when each case runs, never at import: a suite that runs long enough before these
# would find them expired and test the expiry instead.
@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (lambda: (), "metadata authorization is required: 'Bearer <JWT>'"),
        (lambda: (("authorization", "Basic dXNlcjpwYXNz"),), "must be 'Bearer <JWT>'"),
        (lambda: (("townhall-user", "42"),), r"user token \(townhall-user is no longer accepted\)"),
        (lambda: bearer("not-a-jwt"), "token is not a JWT"),
        (lambda: bearer("e30.e30.e30"), "token has no kid"),
        (lambda: bearer(_without_kid()), "token has no kid .* keys k1, k2"),
        (lambda: bearer(token("k3=" + "a" * 40)), "key id 'k3' is not known here .* rotated out"),
        (lambda: bearer(token("k1=" + "z" * 40)), "signature does not verify with key 'k1'"),
        (lambda: bearer(token(ttl_s=-120)), r"token has expired at .* UTC \(\d+ s ago\)"),
        (lambda: bearer(_unsigned()), "says alg 'none', but key 'k1' is for HS256"),
        (lambda: bearer(token(user=0)), "token sub must be a user id"),
        (
            lambda: bearer(SigningKey("k1", "a" * 40).sign('{"sub":"007","exp":9999999999}')),
            "token sub must be a user id",
        ),
        (
            lambda: bearer(SigningKey("k1", "a" * 40).sign('{"sub":42,"exp":9999999999}')),
            "token is not valid: .*string",
        ),
        (lambda: bearer("x" * 5000), "5000 bytes"),
    ],
    ids=[
        "missing",
        "not bearer",
        "old townhall-user",
        "garbled",
        "empty header",
        "no kid",
        "unknown kid",
        "forged",
        "expired",
        "alg none",
        "bad sub",
        "leading zero",
        "number sub",
        "too long",
    ],
)
def test_a_bad_token_is_unauthenticated_and_says_what_is_wrong(
    metadata: Callable[[], Metadata], message: str
) -> None:
    with pytest.raises(Unauthenticated, match=message):
        auth().principal(metadata())


def test_a_token_with_claims_edited_after_signing_is_refused() -> None:
    header, _, signature = token(grants=("subscribe",)).split(".")
    forged_claims = jwt.utils.base64url_encode(
        json.dumps({"sub": "42", "exp": 2**40, "grants": sorted(GRANTS)}).encode()
    )
    with pytest.raises(Unauthenticated, match="does not verify"):
        auth().principal(bearer(f"{header}.{forged_claims.decode()}.{signature}"))


def test_issuer_and_audience_are_checked_when_configured() -> None:
    checked = auth(issuer="https://id.example", audience="townhall")
    ok = token(issuer="https://id.example", audience="townhall")
    assert checked.principal(bearer(ok)).user_id == 42
    with pytest.raises(Unauthenticated, match="lacks the required claim 'iss'"):
        checked.principal(bearer(token(audience="townhall")))
    with pytest.raises(Unauthenticated, match="issuer is not"):
        checked.principal(bearer(token(issuer="https://evil.example", audience="townhall")))
    with pytest.raises(Unauthenticated, match="another audience"):
        checked.principal(bearer(token(issuer="https://id.example", audience="elsewhere")))


def test_two_live_keys_both_work_and_a_removed_key_stops_working_at_once() -> None:
    a = auth()
    by_k1, by_k2 = token(K1), token(K2, user=43)
    assert a.principal(bearer(by_k1)).user_id == 42
    assert a.principal(bearer(by_k2)).user_id == 43
    assert len(a.users) == 2  # both remembered
    # The issuer has moved to k2; k1 is removed: its tokens fail though they were verified (and cached).
    dropped = a.users.replace(Authenticator(AuthConfig(keys=(K2,))).users.ring)
    assert dropped == 1
    with pytest.raises(Unauthenticated, match="'k1' is not known"):
        a.principal(bearer(by_k1))
    assert a.principal(bearer(by_k2)).user_id == 43


def test_a_replaced_secret_under_the_same_key_id_invalidates_its_tokens() -> None:
    a = auth()
    old = token(K1)
    a.principal(bearer(old))
    a.users.replace(Authenticator(AuthConfig(keys=("k1=" + "c" * 40, K2))).users.ring)
    with pytest.raises(Unauthenticated, match="does not verify with key 'k1'"):
        a.principal(bearer(old))


def test_the_cache_answers_without_verifying_but_never_past_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    a = auth(cache_size=2, leeway_s=0)
    expires = int(time.time()) + 2  # in 1..2 s
    soon = token(now=expires - 60, ttl_s=60)
    assert a.principal(bearer(soon)).user_id == 42
    calls = []
    real = Verifier._verify  # the signature check (PyJWT, or the HS256 shortcut), behind the cache
    monkeypatch.setattr(
        Verifier, "_verify", lambda self, token, *rest: calls.append(1) or real(self, token, *rest)
    )
    assert a.principal(bearer(soon)).user_id == 42
    assert calls == []  # answered from the cache
    time.sleep(max(0.0, expires + 0.05 - time.time()))
    with pytest.raises(Unauthenticated, match="expired"):
        a.principal(bearer(soon))
    # Bounded: the oldest entry goes first.
    for user in (1, 2, 3):
        a.principal(bearer(token(user=user)))
    assert len(a.users) == 2


def test_a_zero_cache_size_verifies_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    a = auth(cache_size=0)
    t = token()
    a.principal(bearer(t))
    calls = []
    real = Verifier._verify  # the signature check (PyJWT, or the HS256 shortcut), behind the cache
    monkeypatch.setattr(
        Verifier, "_verify", lambda self, token, *rest: calls.append(1) or real(self, token, *rest)
    )
    a.principal(bearer(t))
    assert calls == [1]


def _jwks(tmp_path: Path, keys: list[dict[str, Any]]) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    return path


def _public_jwk(private: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = jwt.algorithms.OKPAlgorithm if alg == "EdDSA" else jwt.algorithms.ECAlgorithm
    return {**algorithm.to_jwk(private.public_key(), as_dict=True), "kid": kid, "alg": alg}


def test_ed25519_and_es256_public_keys_from_a_jwks(tmp_path: Path) -> None:
    ed, p256 = ed25519.Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())
    path = _jwks(tmp_path, [_public_jwk(ed, "ed", "EdDSA"), _public_jwk(p256, "p256", "ES256")])
    a = auth(keys=(), jwks=str(path))
    exp = int(time.time()) + 60
    for private, kid, alg, user in ((ed, "ed", "EdDSA", 7), (p256, "p256", "ES256", 8)):
        signed = jwt.encode(
            {"sub": str(user), "exp": exp, "grants": ["host"]}, private, algorithm=alg, headers={"kid": kid}
        )
        assert a.principal(bearer(signed)) == Principal(user, frozenset({"host"}))
    other = ed25519.Ed25519PrivateKey.generate()
    forged = jwt.encode({"sub": "7", "exp": exp}, other, algorithm="EdDSA", headers={"kid": "ed"})
    with pytest.raises(Unauthenticated, match="does not verify with key 'ed'"):
        a.principal(bearer(forged))


def test_a_changed_jwks_is_reloaded_and_a_dropped_key_fails(tmp_path: Path) -> None:
    ed, ed2 = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    path = _jwks(tmp_path, [_public_jwk(ed, "ed", "EdDSA"), _public_jwk(ed2, "ed2", "EdDSA")])
    a = auth(keys=(), jwks=str(path))
    exp = int(time.time()) + 60
    first = jwt.encode({"sub": "7", "exp": exp}, ed, algorithm="EdDSA", headers={"kid": "ed"})
    assert a.principal(bearer(first)).user_id == 7
    _jwks(tmp_path, [_public_jwk(ed2, "ed2", "EdDSA")])  # the identity provider rotated "ed" out
    assert a.reload() is True
    with pytest.raises(Unauthenticated, match="'ed' is not known"):
        a.principal(bearer(first))
    assert a.reload() is False  # unchanged


def test_methods_are_user_authenticated_unless_declared_otherwise() -> None:
    assert rule("townhall.v1.Rooms", "CreateRoom") == "user"
    assert rule("townhall.v1.SomethingNew", "Do") == "user"  # a new API is authenticated by default
    assert (
        rule("townhall.internal.v1.Leases", "Acquire")
        == rule("townhall.internal.v1.Owner", "CreateRoom")
        == "service"
    )
    # Anything in the internal package, a service added later too, takes the service credential only.
    assert rule("townhall.internal.v1.SomethingNew", "Do") == "service"
    assert internal_service("townhall.internal.v1.SomethingNew")
    assert not internal_service("townhall.v1.Rooms") and not internal_service("townhall.v1.Relay")
    assert rule("townhall.v1.Relay", "Pull") == "service"
    assert rule("townhall.v1.Relay", "Subscribe") == "ticket"
    assert rule("grpc.health.v1.Health", "Check") == "open"


def test_dev_tokens_use_the_first_configured_key() -> None:
    config = AuthConfig(keys=(K2, K1))
    assert signing_key(config.keys).kid == "k2"
    who = Authenticator(config).principal(Tokens(config).metadata(5, ("publish",)))
    assert who == Principal(5, frozenset({"publish"}))


def test_a_token_issued_for_longer_than_the_maximum_lifetime_is_refused() -> None:
    now = 1_700_000_000.0
    day = {"sub": "42", "iat": int(now), "exp": int(now) + 86_400}
    assert principal_from(day, 86_400, now=now).user_id == 42
    with pytest.raises(Unauthenticated, match=r"valid for 86401 s .* at most 86400 s"):
        principal_from({**day, "exp": day["exp"] + 1}, 86_400, now=now)
    # Without iat the lifetime counts from now.
    with pytest.raises(Unauthenticated, match=r"auth\.max_token_lifetime_s"):
        principal_from({"sub": "42", "exp": int(now) + 90_000}, 86_400, now=now)
    assert principal_from({"sub": "42", "exp": int(now) + 90_000}, 0, now=now).user_id == 42
