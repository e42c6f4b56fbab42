"""Who may call what: user tokens, the service credential between Townhall processes, and each method's rule.

A client RPC carries `authorization: Bearer <JWT>`: `sub` is the user id, `grants` what the user may
do. Calls between Townhall processes (leases, forwarded room and graph calls, relay pulls) go to the
internal port and carry `townhall-service: <JWT>`, a credential bound to the caller and the call
(core/credentials.py); client ports refuse it. Every method's rule is declared here (`rule`) and
enforced once, where handlers are wrapped (core/interceptor.py).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from townhall.core import logging
from townhall.core.config import AuthConfig, ConfigError, parse_keys
from townhall.core.credentials import SERVICE_KEY, ServiceChecks, ServiceCredential
from townhall.core.errors import PermissionDenied, Unauthenticated
from townhall.core.tokens import KeyRing, SigningKey, Verifier, load_jwks
from townhall.core.validation import USER_ID_MAX

log = logging.get(__name__)

HOST, MODERATE, PUBLISH, SUBSCRIBE = "host", "moderate", "publish", "subscribe"
GRANTS = frozenset({HOST, MODERATE, PUBLISH, SUBSCRIBE})
AUTHORIZATION = "authorization"
# Metadata is a sequence of (key, value) pairs; values of text keys arrive as str.
Metadata = Iterable[tuple[str, Any]] | None

# How each method is authenticated: USER (a user token; the default for every client API), SERVICE
# (only the service credential, on the internal port; every service of the internal package),
# TICKET (the relay's ticket, checked by its servicer), OPEN (health).
USER, SERVICE, TICKET, OPEN = "user", "service", "ticket", "open"
# Calls between Townhall processes (proto/townhall/internal/v1): never served on a client port.
INTERNAL_PACKAGE = "townhall.internal."
_RULES = {
    # Rooms, Admission, Graph, Inbox: USER (the default). Moderation too; each call also needs a
    # grant (core/identity.require) and a role in the room (admission/stage.py).
    "townhall.v1.Moderation": USER,
    "townhall.v1.Relay": TICKET,
    "townhall.v1.Relay/Pull": SERVICE,
    # Bulk import writes anyone's follows: an operator's tool (it holds the service key), not a user's.
    "townhall.v1.Graph/Import": SERVICE,
    "grpc.health.v1.Health": OPEN,
    "grpc.reflection.v1alpha.ServerReflection": OPEN,
}


def rule(service: str, method: str) -> str:
    """How calls of `service`/`method` are authenticated."""
    if service.startswith(INTERNAL_PACKAGE):
        return SERVICE
    return _RULES.get(f"{service}/{method}") or _RULES.get(service) or USER


def internal_service(service: str) -> bool:
    """Whether every method of `service` is internal (served on the internal port only)."""
    return service.startswith(INTERNAL_PACKAGE) or _RULES.get(service) == SERVICE


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller: the user id from the token's `sub` and the grants it carries."""

    user_id: int
    grants: frozenset[str]


def principal_from(claims: dict[str, Any], max_lifetime_s: float = 0, now: float | None = None) -> Principal:
    """The Principal of verified user-token claims, or UNAUTHENTICATED naming the bad claim.

    With `max_lifetime_s`, a token valid for longer than that (from `iat`, or from now without one) is
    refused: a stolen long-lived token would otherwise work for as long as its issuer wrote.
    """
    sub = claims.get("sub")
    # Canonical ASCII decimal only: "007" or a non-ASCII digit would name the same user two ways.
    text = sub if isinstance(sub, str) else ""
    canonical = text.isascii() and text.isdigit() and str(int(text)) == text
    if not (canonical and 0 < int(text) <= USER_ID_MAX):
        raise Unauthenticated(f"token sub must be a user id, a decimal string 1..{USER_ID_MAX}, not {sub!r}")
    grants = claims.get("grants", [])
    if not isinstance(grants, list) or not all(isinstance(g, str) for g in grants):
        raise Unauthenticated(f"token grants must be a list of strings ({', '.join(sorted(GRANTS))})")
    if max_lifetime_s:
        _lifetime(claims, max_lifetime_s, time.time() if now is None else now)
    # Grants this version does not know are left out, so an issuer can add new ones first.
    return Principal(int(text), frozenset(grants) & GRANTS)


def _lifetime(claims: dict[str, Any], max_lifetime_s: float, now: float) -> None:
    exp, iat = claims.get("exp"), claims.get("iat")
    start = iat if isinstance(iat, int | float) and not isinstance(iat, bool) else now
    lifetime = float(exp) - min(float(start), now) if isinstance(exp, int | float) else 0.0
    if lifetime > max_lifetime_s:
        raise Unauthenticated(
            f"token is valid for {lifetime:.0f} s (exp - iat); this server accepts at most "
            f"{max_lifetime_s:.0f} s (auth.max_token_lifetime_s): ask the issuer for shorter-lived tokens"
        )


def refuse_service_credential() -> None:
    """PERMISSION_DENIED for a service credential on a client port."""
    raise PermissionDenied(
        f"metadata {SERVICE_KEY} is accepted only on the internal port of Townhall processes, never on a "
        "client port"
    )


def value(metadata: Metadata, key: str) -> str | None:
    """The first value of `key` in invocation metadata, as text."""
    for k, v in metadata or ():
        if k == key:
            return v if isinstance(v, str) else bytes(v).decode("ascii", "replace")
    return None


def mint(
    key: SigningKey,
    user: int,
    grants: Iterable[str],
    ttl_s: float = 3600,
    issuer: str = "",
    audience: str = "",
    now: float | None = None,
) -> str:
    """A signed user token (what an identity provider would issue), for dev tools, tests and benches."""
    issued = int(time.time() if now is None else now)
    # Written out rather than json.dumps'd: load generators mint one token per join.
    text = f'{{"sub":"{int(user)}","iat":{issued},"exp":{int(issued + ttl_s)},"grants":{_grants_json(grants)}'
    if issuer:
        text += f',"iss":{json.dumps(issuer)}'
    if audience:
        text += f',"aud":{json.dumps(audience)}'
    return key.sign(text + "}")


@functools.lru_cache(maxsize=64)
def _grants_json_of(grants: frozenset[str]) -> str:
    return json.dumps(sorted(grants), separators=(",", ":"))


def _grants_json(grants: Iterable[str]) -> str:
    return _grants_json_of(grants if isinstance(grants, frozenset) else frozenset(grants))


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Client metadata carrying a user token."""
    return ((AUTHORIZATION, f"Bearer {token}"),)


def signing_key(entries: Sequence[str], key: str = "auth.keys") -> SigningKey:
    """The current (first) KID=SECRET key of a config list, for signing."""
    pairs = parse_keys(key, tuple(entries))
    if not pairs:
        raise ConfigError(f"{key} has no HS256 key to sign with")
    return SigningKey(*pairs[0])


class Tokens:
    """Mints user tokens with the configured development key (auth.keys[0]): CLI, demo, load, benches."""

    def __init__(self, config: AuthConfig, ttl_s: float = 3600) -> None:
        self._key = signing_key(config.keys)
        self._issuer, self._audience = config.issuer, config.audience
        self._ttl_s = ttl_s

    def mint(self, user: int, grants: Iterable[str] = GRANTS) -> str:
        """A token for `user` with `grants` (all of them by default)."""
        return mint(self._key, user, grants, self._ttl_s, self._issuer, self._audience)

    def metadata(self, user: int, grants: Iterable[str] = GRANTS) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying a fresh token for `user`."""
        return bearer(self.mint(user, grants))


class Authenticator:
    """A server's checks: user tokens (cached), service credentials; and this process's own credential.

    `kind` (admission, relay, notifier) and `me` (the member address it is called at on its internal
    port) name this process in the credentials it sends and are what credentials sent to it must name.
    """

    def __init__(self, config: AuthConfig, kind: str = "townhall", me: str = "") -> None:
        self._config = config
        self._jwks_stamp = self._stamp()
        max_lifetime_s = config.max_token_lifetime_s
        self.users: Verifier[Principal] = Verifier(
            "token",
            self._user_ring(),
            lambda claims: principal_from(claims, max_lifetime_s),
            require=("exp", "sub"),
            audience=config.audience or None,
            issuer=config.issuer or None,
            leeway_s=config.leeway_s,
            cache_size=config.cache_size,
        )
        service_ring = KeyRing(parse_keys("auth.service_keys", config.service_keys))
        # Credentials of calls to this member (its internal address, `me`), checked per method.
        self.services = ServiceChecks(service_ring, me, config.leeway_s)
        self.kind = kind
        self._credential = (
            ServiceCredential(service_ring.signer, kind, me) if service_ring.signer is not None else None
        )

    @property
    def credential(self) -> ServiceCredential:
        """This process's own credentials for its calls to other members."""
        if self._credential is None:
            raise ConfigError(
                "auth.service_keys is empty: calls between Townhall processes are signed with them"
            )
        return self._credential

    def _user_ring(self) -> KeyRing:
        try:
            jwks = load_jwks(self._config.jwks) if self._config.jwks else []
            return KeyRing(parse_keys("auth.keys", self._config.keys), jwks)
        except ValueError as exc:
            raise ConfigError(f"auth.jwks: {exc}") from exc

    def principal(self, metadata: Metadata, thorough: bool = True) -> Principal:
        """The verified caller of a client RPC, or UNAUTHENTICATED saying what is wrong with its token.

        A service credential is refused here (PERMISSION_DENIED): client ports never take one, so a
        credential seen in one internal call cannot lift a client's rate limits or act for a member.
        Not `thorough`: a token that only a costly verification could judge raises tokens.Unverified.
        """
        header = None
        for k, v in metadata or ():
            if k == AUTHORIZATION:
                header = v if isinstance(v, str) else bytes(v).decode("ascii", "replace")
            elif k == SERVICE_KEY:
                refuse_service_credential()
        return self._user(header, metadata, thorough)

    def forwarded(self, metadata: Metadata) -> Principal:
        """The user on whose behalf a member forwarded a call (its credential is checked by the caller)."""
        return self._user(value(metadata, AUTHORIZATION), metadata)

    def _user(self, header: str | None, metadata: Metadata, thorough: bool = True) -> Principal:
        if header is None:
            old = " (townhall-user is no longer accepted)" if value(metadata, "townhall-user") else ""
            raise Unauthenticated(
                f"metadata {AUTHORIZATION} is required: 'Bearer <JWT>', a user token{old} "
                "(`townhall token --user N` mints one with the development key)"
            )
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(f"metadata {AUTHORIZATION} must be 'Bearer <JWT>', not {header[:16]!r}...")
        return self.users.verify(token.strip(), thorough)

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._config.jwks) if self._config.jwks else None
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size) if st else None

    def reload(self) -> bool:
        """Reads the JWKS again if the file changed; tokens of keys it no longer has stop working."""
        stamp = self._stamp()
        if stamp is None or stamp == self._jwks_stamp:
            return False
        self._jwks_stamp = stamp
        try:
            ring = self._user_ring()
        except ConfigError as exc:
            log.error("jwks not reloaded; keeping the keys in use", error=str(exc))
            return False
        dropped = self.users.replace(ring)
        log.info("user token keys reloaded", keys=ring.names(), dropped_tokens=dropped)
        return True

    async def watch(self, every_s: float = 10.0) -> None:
        """Reloads the JWKS whenever it changes (a mounted Secret is updated in place)."""
        if not self._config.jwks:
            return
        while True:
            await asyncio.sleep(every_s)
            self.reload()
