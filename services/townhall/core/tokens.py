"""JSON Web Tokens: key rings with key ids, a fast HS256 signer, and PyJWT verification behind a cache.

User tokens, tickets and service credentials are all JWTs whose `kid` header names the key. Signing
is done here (the bytes PyJWT would make, at a fraction of its cost: tickets are signed on the join
path). Verification is PyJWT's, with one shortcut: an HS256 token that is plainly valid (good
signature, plain claims of the expected types, nothing PyJWT would have to judge) is accepted here at
a tenth of PyJWT's cost, since every first join of a storm carries a token never seen before;
anything else goes to PyJWT, which decides and words the error (`accept_hs256`, checked against
PyJWT by a property test). A verified token is remembered until it expires, so a client that calls
again with the same token costs a dictionary lookup, not a signature check.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from townhall.core.errors import Reason, TownhallError, Unauthenticated

HS256 = "HS256"
ES256 = "ES256"
_ECDSA = ec.ECDSA(hashes.SHA256())
# Tokens longer than this are refused before any parsing.
MAX_TOKEN_BYTES = 4096
# Distinct header segments remembered (there is one per key id and algorithm).
_MAX_HEADERS = 256
# The latest exp a token may carry (9999-12-31 23:59:59 UTC): past it a number is no time at all.
MAX_EXP = 253_402_300_799
# What a token whose JSON nests too deeply for the parser, or holds a number no time can be, is told.
_UNREADABLE = "JSON nests too deeply or holds a number out of range"
# Algorithms a JWKS key may be used with, by key type.
_JWKS_ALGORITHMS = {"oct": {HS256}, "OKP": {"EdDSA"}, "EC": {ES256}}

T = TypeVar("T")


class Unverified(Exception):
    """Raised instead of a verification that would be costly (`thorough=False`): the token is neither
    remembered nor plainly valid, so only PyJWT could tell."""


_B64URL = re.compile(rb"[A-Za-z0-9_-]*")
# Header members the shortcut understands; a header with any other (crit, jku, ...) goes to PyJWT.
_PLAIN_HEADER = frozenset({"alg", "kid", "typ"})


def _b64decode(segment: bytes) -> bytes | None:
    """A strict base64url segment's bytes, or None (PyJWT then decides)."""
    if len(segment) % 4 == 1 or not _B64URL.fullmatch(segment):
        return None
    return base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))


def accept_hs256(
    token: str,
    secret: bytes,
    require: Iterable[str],
    audience: str | None,
    issuer: str | None,
    leeway_s: float,
    now: float | None = None,
) -> dict[str, Any] | None:
    """The claims of an HS256 token that PyJWT would accept with these options, or None: not plainly
    valid, so PyJWT must look (it may still accept it, e.g. an exp given as a float). Never accepts what
    PyJWT would refuse. The header (alg, kid) is checked by the caller."""
    header, _, rest = token.encode("ascii", "replace").partition(b".")
    payload, _, signature = rest.partition(b".")
    raw_signature, raw_payload = _b64decode(signature), _b64decode(payload)
    if raw_signature is None or raw_payload is None:
        return None
    expected = hmac.digest(secret, header + b"." + payload, hashlib.sha256)
    if not hmac.compare_digest(expected, raw_signature):
        return None
    try:
        claims = json.loads(raw_payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(claims, dict) or any(claims.get(name) is None for name in require):
        return None
    current = time.time() if now is None else now
    exp = claims.get("exp")
    if type(exp) is not int or exp <= current - leeway_s:
        return None
    for stamp in ("iat", "nbf"):  # present means checked, even as null
        if stamp in claims and (type(claims[stamp]) is not int or claims[stamp] > current + leeway_s):
            return None
    for text in ("sub", "jti"):
        if text in claims and not isinstance(claims[text], str):
            return None
    aud = claims.get("aud")
    if audience is None:
        if "aud" in claims:
            return None
    elif not (
        aud == audience
        or (isinstance(aud, list) and audience in aud and all(isinstance(a, str) for a in aud))
    ):
        return None
    if issuer is not None and claims.get("iss") != issuer:
        return None
    return claims


def b64(data: bytes) -> bytes:
    """base64url without padding, as JWTs encode their parts."""
    return base64.urlsafe_b64encode(data).rstrip(b"=")


class SigningKey:
    """An HS256 secret with its key id; signs claims given as compact JSON text."""

    def __init__(self, kid: str, secret: str) -> None:
        self.kid = kid
        self.secret = secret.encode()
        # The JOSE header PyJWT makes for these arguments (keys sorted), encoded once.
        header = json.dumps({"alg": HS256, "kid": kid, "typ": "JWT"}, separators=(",", ":"), sort_keys=True)
        self._header = b64(header.encode()) + b"."

    def sign(self, claims_json: str) -> str:
        """The signed JWT of `claims_json` (compact JSON, as json.dumps(..., separators=(",", ":")))."""
        body = self._header + b64(claims_json.encode())
        return (body + b"." + b64(hmac.digest(self.secret, body, hashlib.sha256))).decode()


class ES256Signer:
    """A P-256 private key with its key id, built once; signs claims given as compact JSON text (ES256).

    Tickets are signed with it on the join path: the key is parsed and the header encoded here, once,
    so a signature costs the ECDSA operation, the DER-to-JOSE conversion and two base64 encodings.
    (ES256 over Ed25519: OpenSSL signs P-256 about twice as fast, and verifies it 1.7x as fast.)
    """

    def __init__(self, kid: str, scalar: bytes) -> None:
        self.kid = kid
        self._key = ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256R1())
        header = json.dumps({"alg": ES256, "kid": kid, "typ": "JWT"}, separators=(",", ":"), sort_keys=True)
        self._header = b64(header.encode()) + b"."

    def sign(self, claims_json: str) -> str:
        """The signed JWT of `claims_json` (compact JSON)."""
        body = self._header + b64(claims_json.encode())
        r, s = decode_dss_signature(self._key.sign(body, _ECDSA))
        return (body + b"." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))).decode()

    def public(self) -> bytes:
        """The public key as a compressed P-256 point (33 bytes)."""
        return self._key.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint)


def es256_public(kid: str, point: bytes) -> jwt.PyJWK:
    """A verification key for ES256 tokens from a P-256 point (compressed or not)."""
    numbers = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point).public_numbers()
    return jwt.PyJWK.from_dict(
        {
            "kty": "EC",
            "crv": "P-256",
            "x": b64(numbers.x.to_bytes(32, "big")).decode(),
            "y": b64(numbers.y.to_bytes(32, "big")).decode(),
            "kid": kid,
            "alg": ES256,
        }
    )


def new_es256() -> tuple[str, str]:
    """A fresh P-256 key pair as base64url text: (private scalar, compressed public point)."""
    key = ec.generate_private_key(ec.SECP256R1())
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    point = key.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
    return b64(scalar).decode(), b64(point).decode()


def claims_json(claims: Mapping[str, Any]) -> str:
    """Claims as the compact JSON PyJWT signs."""
    return json.dumps(claims, separators=(",", ":"))


class KeyRing:
    """Verification keys by key id; the first HS256 key (if any) is the one to sign with."""

    def __init__(self, secrets: Iterable[tuple[str, str]] = (), jwks: Iterable[jwt.PyJWK] = ()) -> None:
        self.keys: dict[str, tuple[Any, str]] = {}
        self.signer: SigningKey | None = None
        for kid, secret in secrets:
            self.keys[kid] = (secret.encode(), HS256)
            if self.signer is None:
                self.signer = SigningKey(kid, secret)
        for key in jwks:
            if not key.key_id:
                raise ValueError("every key of a JWKS needs a kid")
            if key.key_id in self.keys:
                raise ValueError(f"key id {key.key_id!r} is configured twice")
            self.keys[key.key_id] = (key, key.algorithm_name)

    def names(self) -> str:
        """The key ids, for messages."""
        return ", ".join(sorted(self.keys)) or "none"

    def fingerprint(self, kid: str) -> Any:
        """What identifies a key's material, to tell a replaced key from a kept one."""
        entry = self.keys.get(kid)
        if entry is None:
            return None
        key = entry[0]
        return key if isinstance(key, bytes) else json.dumps(getattr(key, "_jwk_data", {}), sort_keys=True)


def load_jwks(path: str | Path) -> list[jwt.PyJWK]:
    """The keys of a JSON Web Key Set file; each must have a kid and a supported algorithm."""
    try:
        data = json.loads(Path(path).read_text())
        keys = jwt.PyJWKSet.from_dict(data).keys
    except (OSError, ValueError, jwt.PyJWKError, jwt.PyJWKSetError) as exc:
        raise ValueError(f"cannot load the JWKS {path}: {exc}") from exc
    for key in keys:
        kty = key._jwk_data.get("kty", "")
        if key.algorithm_name not in _JWKS_ALGORITHMS.get(kty, set()):
            raise ValueError(
                f"JWKS {path}: key {key.key_id!r} ({kty}) must be one of oct/HS256, OKP/EdDSA (Ed25519) "
                f"or EC/ES256, not {key.algorithm_name}"
            )
    return list(keys)


@dataclass(frozen=True, slots=True)
class _Entry(Generic[T]):
    value: T
    expires: float
    kid: str


class Verifier(Generic[T]):
    """Verifies JWTs of one kind (user token, ticket, service credential) and remembers the good ones.

    `build` turns verified claims into the value callers get (a Principal, a Ticket); it raises a
    TownhallError for claims that verify but make no sense. An entry lives until its token's `exp`
    (plus leeway) and is dropped when its key is removed or replaced (`replace`).
    """

    def __init__(
        self,
        what: str,
        ring: KeyRing,
        build: Callable[[dict[str, Any]], T],
        *,
        require: tuple[str, ...] = ("exp",),
        audience: str | None = None,
        issuer: str | None = None,
        leeway_s: float = 0,
        cache_size: int = 0,
        wrong_audience: Callable[[str], TownhallError] | None = None,
        renew: str = "get a new one",
    ) -> None:
        self.what = what
        self.ring = ring
        self._build = build
        self._options = {"require": list(require)}
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway_s
        self._cache: dict[str, _Entry[T]] = {}
        self._cache_size = cache_size
        self._headers: dict[str, tuple[str, str]] = {}
        # Header segments whose members the HS256 shortcut understands (alg, kid, typ only).
        self._plain: set[str] = set()
        self._wrong_audience = wrong_audience
        self._renew = renew

    def __len__(self) -> int:
        return len(self._cache)

    def verify(self, token: str, thorough: bool = True) -> T:
        """The token's value, or UNAUTHENTICATED / PERMISSION_DENIED saying exactly what is wrong.

        Not `thorough`: only what costs little (the cache, the header, the HS256 shortcut); a token
        only PyJWT could judge raises Unverified.
        """
        entry = self._cache.get(token)
        if entry is not None:
            if time.time() < entry.expires:
                return entry.value
            del self._cache[token]  # expired: verify again, for the precise message
        value, expires, kid = self._verify(token, thorough)
        if self._cache_size:
            if len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]  # the oldest entry
            self._cache[token] = _Entry(value, expires, kid)
        return value

    def replace(self, ring: KeyRing) -> int:
        """Uses a new key ring; entries of keys that were removed or changed are dropped (returned)."""
        old, self.ring = self.ring, ring
        gone = {kid for kid in old.keys if ring.fingerprint(kid) != old.fingerprint(kid)}
        self._headers = {h: v for h, v in self._headers.items() if v[0] not in gone}
        stale = [token for token, entry in self._cache.items() if entry.kid in gone]
        for token in stale:
            del self._cache[token]
        return len(stale)

    def _header(self, token: str) -> tuple[str, str]:
        """(kid, alg) of the token; every token signed with one key has the same header segment."""
        segment = token.partition(".")[0]
        known = self._headers.get(segment)
        if known is not None:
            return known
        if token.count(".") != 2:
            raise Unauthenticated(
                f"{self.what} is not a JWT: it must be three base64url parts separated by dots"
            )
        try:
            header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
        except (ValueError, binascii.Error) as exc:
            raise Unauthenticated(f"{self.what} is not a JWT: its header is not base64url JSON") from exc
        except RecursionError:
            raise Unauthenticated(f"{self.what} is not a JWT: its header {_UNREADABLE}") from None
        if not isinstance(header, dict):
            raise Unauthenticated(f"{self.what} is not a JWT: its header is not a JSON object")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated(
                f"{self.what} has no kid (key id) in its header; this server knows keys {self.ring.names()}"
            )
        alg = str(header.get("alg", ""))
        if kid in self.ring.keys:
            if len(self._headers) >= _MAX_HEADERS:
                self._headers.clear()
                self._plain.clear()
            self._headers[segment] = (kid, alg)
            if header.keys() <= _PLAIN_HEADER and all(isinstance(v, str) for v in header.values()):
                self._plain.add(segment)
        return kid, alg

    def _verify(self, token: str, thorough: bool = True) -> tuple[T, float, str]:
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated(f"{self.what} is {len(token)} bytes; at most {MAX_TOKEN_BYTES} allowed")
        kid, alg = self._header(token)
        entry = self.ring.keys.get(kid)
        if entry is None:
            raise Unauthenticated(
                f"{self.what} key id {kid!r} is not known here (keys: {self.ring.names()}); "
                "it may have been rotated out"
            )
        key, key_alg = entry
        if alg != key_alg:
            raise Unauthenticated(f"{self.what} says alg {alg!r}, but key {kid!r} is for {key_alg}")
        if isinstance(key, bytes) and key_alg == HS256 and token.partition(".")[0] in self._plain:
            fast = accept_hs256(
                token, key, self._options["require"], self._audience, self._issuer, self._leeway
            )
            if fast is not None:
                expires = self._expires(fast["exp"])  # first: a build may reckon with exp
                return self._build(fast), expires, kid
        if not thorough:
            raise Unverified(self.what)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[key_alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options=self._options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated(
                f"{self.what} has expired{_when(token)}; {self._renew}", reason=Reason.CREDENTIAL_EXPIRED
            ) from exc
        except jwt.InvalidSignatureError as exc:
            raise Unauthenticated(
                f"{self.what} signature does not verify with key {kid!r}: "
                "forged, or signed with another secret"
            ) from exc
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"{self.what} lacks the required claim {exc.claim!r}") from exc
        except jwt.InvalidAudienceError as exc:
            message = (
                f"{self.what} is for another audience, not {self._audience!r}"
                if self._audience
                else f"{self.what} carries an aud claim, but this server takes tokens without one"
            )
            raise (self._wrong_audience or Unauthenticated)(message) from exc
        except jwt.InvalidIssuerError as exc:
            raise Unauthenticated(f"{self.what} issuer is not {self._issuer!r}") from exc
        except jwt.ImmatureSignatureError as exc:
            raise Unauthenticated(f"{self.what} is not valid yet (iat or nbf is in the future)") from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"{self.what} is not valid: {exc}") from exc
        except (RecursionError, OverflowError):
            raise Unauthenticated(f"{self.what} is not valid: its {_UNREADABLE}") from None
        expires = self._expires(claims["exp"])
        return self._build(claims), expires, kid

    def _expires(self, exp: float) -> float:
        """When a verified token stops being valid (its exp plus the leeway), as a float."""
        if exp > MAX_EXP:
            raise Unauthenticated(f"{self.what} exp is out of range: after the year 9999")
        return float(exp) + self._leeway


def _when(token: str) -> str:
    """' at <time> UTC (N s ago)' from the token's exp, for expiry messages."""
    try:
        exp = int(jwt.decode(token, options={"verify_signature": False})["exp"])
    except (jwt.InvalidTokenError, KeyError, TypeError, ValueError, RecursionError, OverflowError):
        return ""
    stamp = datetime.fromtimestamp(exp, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f" at {stamp} UTC ({max(0, int(time.time()) - exp)} s ago)"
