"""The service credential: what one Townhall process shows another, on the internal port only.

A short-lived JWT (HS256, signed with `auth.service_keys`, which no token issuer holds) bound to its
caller and its call: `sub` names the calling process (`admission@10.1.2.3:50071`: its kind and member
address), `aud` the member called and the method (`10.1.2.4:50071/townhall.internal.v1.Leases/Acquire`), and
it is valid for SERVICE_TTL_S. So a credential seen in one call is good for nothing else: not another
method, not another member, not for long, and never on a client port (client ports refuse the header
outright). Each kind of process may make only its own kind of internal call (`callers`).

Callers mint one credential per (member, method) and reuse it until half its life is gone: a few
signatures a minute, never one per call.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from townhall.core.config import AuthConfig, ConfigError, parse_keys
from townhall.core.errors import PermissionDenied, Unauthenticated
from townhall.core.tokens import KeyRing, SigningKey, Verifier, claims_json

SERVICE_KEY = "townhall-service"
SERVICE_TTL_S = 60
_RENEW_AFTER_S = SERVICE_TTL_S / 2
# (member, method) pairs a process keeps a credential for; past it they are minted afresh.
_MAX_MINTED = 4096
ADMISSION, RELAY, NOTIFIER, OPERATOR = "admission", "relay", "notifier", "operator"
# Which kinds of process may make each internal call: the methods served on the internal port.
_CALLERS: dict[str, frozenset[str]] = {
    "townhall.internal.v1.Leases": frozenset({ADMISSION}),
    "townhall.internal.v1.Owner": frozenset({ADMISSION}),
    # Room changes forwarded by the member a client called to the room's owner.
    "townhall.v1.Rooms": frozenset({ADMISSION}),
    "townhall.v1.Moderation": frozenset({ADMISSION}),
    # Graph calls forwarded to the notifier that owns the followee.
    "townhall.v1.Graph": frozenset({NOTIFIER}),
    # Bulk import: an operator's tool (`townhall graph import`), or a notifier passing a part on.
    "townhall.v1.Graph/Import": frozenset({NOTIFIER, OPERATOR}),
    # Graph keys moved between notifiers when their membership changes (notifier/handover.py).
    "townhall.internal.v1.GraphShards": frozenset({NOTIFIER}),
    "townhall.v1.Relay/Pull": frozenset({RELAY}),
}
Metadata = Iterable[tuple[str, Any]] | None


def callers(service: str, method: str) -> frozenset[str]:
    """The kinds of process that may call `service`/`method` on the internal port (empty: none)."""
    return _CALLERS.get(f"{service}/{method}") or _CALLERS.get(service) or frozenset()


def method_path(service: str, method: str) -> str:
    """The gRPC path of a method: /townhall.internal.v1.Leases/Acquire."""
    return f"/{service}/{method}"


@dataclass(frozen=True, slots=True)
class ServiceCaller:
    """A verified calling process: its kind (admission, relay, notifier, operator) and member address."""

    kind: str
    member: str


class ServiceCredential:
    """This process's credentials for its calls to other members, one per (member, method), reused."""

    def __init__(self, key: SigningKey, kind: str, member: str) -> None:
        self._key = key
        self.subject = f"{kind}@{member}"
        self._minted: dict[tuple[str, str], tuple[float, tuple[tuple[str, str], ...]]] = {}

    def metadata(self, member: str, method: str, now: float | None = None) -> tuple[tuple[str, str], ...]:
        """Metadata for calling `method` (its path, /service/Method) on `member` (host:port)."""
        current = time.time() if now is None else now
        known = self._minted.get((member, method))
        if known is not None and current < known[0]:
            return known[1]
        issued = int(current)
        claims = {"aud": member + method, "exp": issued + SERVICE_TTL_S, "iat": issued, "sub": self.subject}
        minted = ((SERVICE_KEY, self._key.sign(claims_json(claims))),)
        if len(self._minted) >= _MAX_MINTED:
            self._minted.clear()
        self._minted[(member, method)] = (current + _RENEW_AFTER_S, minted)
        return minted


def operator_credential(auth: AuthConfig) -> ServiceCredential:
    """An operator's tool's credentials (`townhall graph import`), signed with auth.service_keys."""
    pairs = parse_keys("auth.service_keys", auth.service_keys)
    if not pairs:
        raise ConfigError("auth.service_keys is empty: operators' internal calls are signed with it")
    return ServiceCredential(SigningKey(*pairs[0]), OPERATOR, socket.gethostname())


def _caller_of(claims: dict[str, Any]) -> ServiceCaller:
    sub = claims.get("sub")
    kind, at, member = sub.partition("@") if isinstance(sub, str) else ("", "", "")
    if not (kind and at and member):
        raise Unauthenticated("service credential must name its caller in sub, as KIND@MEMBER")
    return ServiceCaller(kind, member)


class ServiceChecks:
    """The receiving side: checks the credentials of calls to this member (`me`, its internal address)."""

    def __init__(self, ring: KeyRing, me: str, leeway_s: float) -> None:
        self.ring = ring
        self.me = me
        self._leeway_s = leeway_s

    def for_method(self, service: str, method: str) -> Callable[[Metadata], ServiceCaller]:
        """The check of one method's calls: the verified caller, or UNAUTHENTICATED / PERMISSION_DENIED."""
        name = f"{service}/{method}"
        expected = self.me + method_path(service, method)
        allowed = callers(service, method)
        verifier: Verifier[ServiceCaller] = Verifier(
            "service credential",
            self.ring,
            _caller_of,
            require=("exp", "iat", "sub", "aud"),
            audience=expected,
            leeway_s=self._leeway_s,
            cache_size=256,
            wrong_audience=lambda _: PermissionDenied(
                f"service credential is not for this call: {name} on this member takes one for {expected!r}"
            ),
            renew="the caller mints a new one",
        )

        def check(metadata: Metadata) -> ServiceCaller:
            token = None
            for key, value in metadata or ():
                if key == SERVICE_KEY:
                    token = value if isinstance(value, str) else bytes(value).decode("ascii", "replace")
            if token is None:
                raise Unauthenticated(
                    f"{name} on the internal port takes only calls between Townhall processes: metadata "
                    f"{SERVICE_KEY} (a service credential for this member and method) is required; "
                    "clients call the client port"
                )
            caller = verifier.verify(token)
            if caller.kind not in allowed:
                kinds = ", ".join(sorted(allowed)) or "no one"
                raise PermissionDenied(
                    f"{name} takes calls from {kinds}, not from {caller.kind}@{caller.member}"
                )
            return caller

        return check
