"""Typed configuration: defaults, then a TOML file, then TOWNHALL_<SECTION>_<KEY> variables."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

ENV_PREFIX = "TOWNHALL_"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or malformed; the message names the key."""


@dataclass(frozen=True)
class Range:
    """The values a number field may take, declared next to the field (`Annotated[int, within(1, 10)]`)
    and checked for every section before its own `validate` (`check_ranges`).

    `low`..`high` inclusive (`high` None: no upper bound; `open_low`: above `low`, not at it); a bound may
    name another field of the same section. `zero`, when not None, lets 0 stand outside the range for
    what it says ("off", "no limit"; "" for a bare 0)."""

    low: float | str
    high: float | str | None = None
    zero: str | None = None
    open_low: bool = False

    def check(self, section: str, name: str, owner: Any) -> None:
        """Raises ConfigError naming `section.name`, its range and its value when the value is outside."""
        value = getattr(owner, name)
        low, high = self._bound(self.low, owner), self._bound(self.high, owner)
        if self.zero is not None and value == 0:
            return
        above = value > low if self.open_low else value >= low
        if above and (high is None or value <= high):
            return
        raise ConfigError(f"{section}.{name} must be {self.describe(section, name)}, not {_number(value)}")

    def describe(self, section: str, name: str) -> str:
        """The range as the error message says it: "within 1..10 seconds", "0 (off) or positive"."""
        low, high = (self._shown(b, section) for b in (self.low, self.high))
        if self.open_low and self.low == 0 and self.high is None:
            text = "positive"
        elif self.high is None:
            text = f"at least {low}"
        else:
            seconds = " seconds" if name.endswith("_s") and not name.endswith("_per_s") else ""
            text = f"within {low}..{high}{seconds}"
        if self.zero is None:
            return text
        return f"0 ({self.zero}) or {text}" if self.zero else f"0 or {text}"

    @staticmethod
    def _bound(bound: float | str | None, owner: Any) -> float | None:
        return getattr(owner, bound) if isinstance(bound, str) else bound

    @staticmethod
    def _shown(bound: float | str | None, section: str) -> str:
        return f"{section}.{bound}" if isinstance(bound, str) else _number(bound or 0)


def within(low: float | str, high: float | str | None = None, *, zero: str | None = None) -> Range:
    """low..high inclusive (no upper bound when `high` is None); 0 also allowed, meaning `zero`, if given."""
    return Range(low, high, zero)


def positive(*, zero: str | None = None) -> Range:
    """Above 0; 0 also allowed, meaning `zero`, if given ("0 (no limit) or positive")."""
    return Range(0, None, zero, open_low=True)


# A TCP port; 0 turns the listener off.
PORT = within(1, 65_535, zero="off")


def declared_ranges(section: type) -> dict[str, Range]:
    """The fields of a config section's class that declare a Range, by name."""
    hints = typing.get_type_hints(section, include_extras=True)
    return {
        name: declared
        for name, hint in hints.items()
        for declared in getattr(hint, "__metadata__", ())
        if isinstance(declared, Range)
    }


def check_ranges(section: str, owner: Any) -> None:
    """Checks every field of a config section that declares a Range (see `Range`)."""
    for name, declared in declared_ranges(type(owner)).items():
        declared.check(section, name, owner)


def _number(value: float) -> str:
    """A number as config files write it: 10000000, 0.05 (never 1e+07)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass(frozen=True)
class LogConfig:
    """Structured logging."""

    level: str = "info"
    json: bool = True

    def validate(self) -> None:
        if self.level not in {"debug", "info", "warning", "error"}:
            raise ConfigError(f"log.level must be debug, info, warning or error, not {self.level!r}")


KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")


@dataclass(frozen=True)
class KafkaConfig:
    """Where Kafka is, what the topics are called, and how every Kafka client of a process connects."""

    bootstrap: str = "127.0.0.1:19092"
    topic_prefix: str = "townhall"
    # Partitions per topic when the project creates its topics (local broker, tests).
    partitions: Annotated[int, positive()] = 12
    # How every producer, consumer and admin client connects: PLAINTEXT (the local broker), SSL,
    # SASL_PLAINTEXT or SASL_SSL (TLS and a user; what the chart's bundled broker requires).
    security_protocol: str = "PLAINTEXT"
    # TLS (SSL, SASL_SSL): the CA bundle (PEM) the brokers' certificates must chain to (empty: the system's
    # CAs); the brokers' names are checked against their certificates.
    ca: str = ""
    # A client certificate and its key (PEM), for brokers that require mutual TLS; both or neither.
    cert: str = ""
    key: str = ""
    # SASL (SASL_PLAINTEXT, SASL_SSL): the mechanism and this service's user (its Kafka principal).
    sasl_mechanism: str = "SCRAM-SHA-512"
    username: str = ""
    # The user's password: read from password_file (a mounted Secret) when set, else this value (set it
    # with TOWNHALL_KAFKA_PASSWORD, never in a file others can read).
    password_file: str = ""
    password: str = field(default="", repr=False)
    # Readers refuse records without a writer signature (core/provenance.py). Set false only while the
    # topics still hold records written by a version that did not sign them; a bad signature is
    # refused either way.
    refuse_unsigned: bool = True
    # How far ahead of this process's clock a record may be stamped (relay load reports) and still take
    # effect; reports older than a relay's staleness never do.
    max_clock_skew_s: Annotated[float, within(0, 600)] = 5.0

    def validate(self) -> None:
        if not self.bootstrap or any(":" not in a for a in self.bootstrap.split(",")):
            raise ConfigError(f"kafka.bootstrap must be host:port[,host:port], not {self.bootstrap!r}")
        if self.security_protocol not in KAFKA_PROTOCOLS:
            raise ConfigError(
                f"kafka.security_protocol must be one of {', '.join(KAFKA_PROTOCOLS)}, "
                f"not {self.security_protocol!r}"
            )
        tls = self.security_protocol in ("SSL", "SASL_SSL")
        if bool(self.cert) != bool(self.key):
            raise ConfigError("kafka.cert and kafka.key go together (a client certificate and its key)")
        for name in ("ca", "cert", "key"):
            path = getattr(self, name)
            if path and not tls:
                raise ConfigError(f"kafka.{name} needs kafka.security_protocol SSL or SASL_SSL")
            if path:
                _pem(f"kafka.{name}", path)
        if self.security_protocol.startswith("SASL_"):
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise ConfigError(
                    f"kafka.sasl_mechanism must be one of {', '.join(SASL_MECHANISMS)}, "
                    f"not {self.sasl_mechanism!r}"
                )
            if not self.username:
                raise ConfigError(
                    f"kafka.username is required with kafka.security_protocol {self.security_protocol}"
                )
            if self.password_file:
                try:
                    Path(self.password_file).read_bytes()
                except OSError as exc:
                    raise ConfigError(
                        f"kafka.password_file: cannot read {self.password_file}: {exc.strerror}"
                    ) from exc
            elif not self.password:
                raise ConfigError(
                    "kafka.password_file or kafka.password (TOWNHALL_KAFKA_PASSWORD) is required with "
                    f"kafka.security_protocol {self.security_protocol}"
                )
        elif self.username or self.password or self.password_file:
            raise ConfigError("kafka.username and kafka.password need a SASL kafka.security_protocol")

    def secret(self) -> str:
        """The SASL password: password_file's first line when it is set (read now), else password."""
        if self.password_file:
            lines = Path(self.password_file).read_text().splitlines()
            return lines[0] if lines else ""
        return self.password


# Development keys, for `townhall dev` and the tests' own topology only: no process has a key unless it
# is configured, and a process that runs with one of these logs a warning. (ES256 ticket keys: the P-256
# private key and its compressed public point, base64url.)
DEV_TICKET_PRIVATE_KEY = "dev=mWHlYlWgYDfhPXLRTwYL686mo994xrGcK4hpo7P23T0"
DEV_TICKET_PUBLIC_KEY = "dev=A_6yOPSFLvxfep7c8aiJ8TD8YUtj95Q_G-5rxziFAfr5"
DEV_USER_KEY = "dev=dev-only-user-token-key-change-me-0123456789"
DEV_SERVICE_KEY = "dev=dev-only-service-key-change-me-0123456789"
# What `townhall dev` and the tests' own processes are given (and nothing else is): every key list set
# to its development key.
DEV_ENV = {
    "TOWNHALL_AUTH_KEYS": DEV_USER_KEY,
    "TOWNHALL_AUTH_SERVICE_KEYS": DEV_SERVICE_KEY,
    "TOWNHALL_TICKETS_PRIVATE_KEY": DEV_TICKET_PRIVATE_KEY,
    "TOWNHALL_TICKETS_PUBLIC_KEYS": DEV_TICKET_PUBLIC_KEY,
}
# The keys each service cannot run without ("auth.keys" is also met by auth.jwks).
_NEEDED = {
    "admission": ("auth.keys", "auth.service_keys", "tickets.private_key"),
    "relay": ("auth.service_keys", "tickets.public_keys"),
    "notifier": ("auth.keys", "auth.service_keys"),
}
_KID = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_SECRET = 32


def parse_keys(key: str, entries: tuple[str, ...]) -> list[tuple[str, str]]:
    """`KID=SECRET` entries as (kid, secret) pairs, the current (signing) key first."""
    pairs: list[tuple[str, str]] = []
    for entry in entries:
        kid, sep, secret = entry.partition("=")
        if not sep or not _KID.fullmatch(kid):
            raise ConfigError(
                f"{key} entries must be KID=SECRET with a key id of 1..64 characters of [A-Za-z0-9._-], "
                f"not {entry[:12]!r}..."
            )
        if len(secret) < MIN_SECRET:
            raise ConfigError(f"{key}: the secret of key {kid!r} must be at least {MIN_SECRET} characters")
        if any(kid == k for k, _ in pairs):
            raise ConfigError(f"{key} names key id {kid!r} twice")
        pairs.append((kid, secret))
    return pairs


def parse_ticket_keys(key: str, entries: tuple[str, ...], private: bool) -> list[tuple[str, bytes]]:
    """`KID=<base64url>` ticket key entries as (kid, bytes): P-256 private scalars (32 bytes), or public
    points (33 bytes compressed, 65 uncompressed)."""
    sizes = (32,) if private else (33, 65)
    what = "32-byte P-256 private key" if private else "P-256 public key (a 33-byte compressed point)"
    pairs: list[tuple[str, bytes]] = []
    for entry in entries:
        kid, sep, text = entry.partition("=")
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)) if sep else b""
        except (ValueError, binascii.Error):
            raw = b""
        if not _KID.fullmatch(kid) or len(raw) not in sizes:
            raise ConfigError(
                f"{key} entries must be KID=KEY, a key id of 1..64 characters of [A-Za-z0-9._-] and a "
                f"{what} in base64url (`townhall keys` makes a pair), not {entry[:12]!r}..."
            )
        if any(kid == k for k, _ in pairs):
            raise ConfigError(f"{key} names key id {kid!r} twice")
        pairs.append((kid, raw))
    return pairs


@dataclass(frozen=True)
class TicketConfig:
    """The tickets that admission issues and relays verify: ES256 (ECDSA P-256) JWTs, so a relay, which
    holds only public keys, can check a ticket but never make one."""

    # Admission's signing key, KID=<base64url 32-byte P-256 private key>. Only admission needs it; give
    # it to no other process.
    private_key: str = ""
    # The public keys relays verify tickets with, KID=<base64url 33-byte compressed point>; two live while
    # rotating: add the new one here everywhere, then sign with it, then drop the old one after ttl_s.
    public_keys: tuple[str, ...] = ()
    ttl_s: Annotated[float, positive()] = 3600.0

    def validate(self) -> None:
        from townhall.core.tokens import ES256Signer, es256_public

        private = parse_ticket_keys(
            "tickets.private_key", (self.private_key,) if self.private_key else (), True
        )
        public = dict(parse_ticket_keys("tickets.public_keys", self.public_keys, False))
        try:
            signer = ES256Signer(*private[0]) if private else None
            points = {kid: es256_public(kid, point) for kid, point in public.items()}
        except ValueError as exc:
            raise ConfigError(f"tickets: a key is not a valid P-256 key: {exc}") from exc
        if signer is not None and points:
            kid = signer.kid
            if kid not in points:
                raise ConfigError(
                    f"tickets.private_key signs with key id {kid!r}, which tickets.public_keys does not "
                    "list: add its public key there first (relays verify with those)"
                )
            if es256_public(kid, signer.public()).key.public_numbers() != points[kid].key.public_numbers():
                raise ConfigError(
                    f"tickets.public_keys has a key {kid!r} that is not the public half of "
                    f"tickets.private_key {kid!r}: relays would refuse every ticket"
                )


@dataclass(frozen=True)
class AuthConfig:
    """Who may call: user tokens (JWT in `authorization: Bearer`) and the service credential."""

    # User token keys, KID=SECRET (HS256, at least 32 characters); the token's `kid` header picks one.
    # Two entries live at once while an issuer rotates; dev tools (`townhall token`) sign with the first.
    # None by default: admission and notifier refuse to start without these or a JWKS.
    keys: tuple[str, ...] = ()
    # A JSON Web Key Set file with more verification keys (oct/HS256, OKP/Ed25519, EC/P-256), e.g. an
    # identity provider's public keys; re-read when it changes. Empty: none.
    jwks: str = ""
    # Checked against the token's `iss` / `aud` when set; tokens must then carry them.
    issuer: str = ""
    audience: str = ""
    # Clock skew allowed on `exp` and `iat`, in seconds.
    leeway_s: Annotated[float, positive(zero="")] = 30.0
    # The longest a user token may be valid (exp - iat, or exp - now without iat), in seconds: a
    # token issued for longer is refused, so a stolen one is useless within this time. 0: no limit.
    max_token_lifetime_s: Annotated[float, within(1, 366 * 86_400, zero="no limit")] = 86_400.0
    # Verified tokens remembered per process (0 disables the cache).
    cache_size: Annotated[int, positive(zero="off")] = 100_000
    # Keys of the service credentials Townhall processes send each other on their internal ports
    # (core/credentials.py), KID=SECRET; the first signs. Never give these to a token issuer.
    service_keys: tuple[str, ...] = ()

    def validate(self) -> None:
        users = parse_keys("auth.keys", self.keys)
        if self.jwks and not Path(self.jwks).is_file():
            raise ConfigError(f"auth.jwks names {self.jwks!r}, which is not a readable file")
        if self.jwks and DEV_USER_KEY in self.keys:
            raise ConfigError(
                "auth.keys holds the built-in development key next to auth.jwks: a deployment with an "
                "identity provider's keys must not also accept development tokens; remove it"
            )
        services = parse_keys("auth.service_keys", self.service_keys)
        shared = {s for _, s in users} & {s for _, s in services}
        if shared:
            raise ConfigError(
                "auth.service_keys must not reuse a secret of auth.keys (users could act as services)"
            )


# What development tools mint user tokens and service credentials with (`townhall dev`'s processes, the
# tests' and the benchmarks' own servers accept them).
DEV_AUTH = AuthConfig(keys=(DEV_USER_KEY,), service_keys=(DEV_SERVICE_KEY,))


@dataclass(frozen=True)
class TlsConfig:
    """TLS for every server and every channel a Townhall process or tool opens (off by default)."""

    enabled: bool = False
    # PEM files: this process's certificate chain and key (served by servers, presented as the client
    # certificate under mutual TLS), and the CA bundle that peers' certificates must chain to.
    cert: str = ""
    key: str = ""
    ca: str = ""
    # Mutual TLS: servers refuse clients without a certificate signed by `ca`.
    require_client_cert: bool = False
    # The name channels expect in the servers' certificates when it is not the host dialled
    # (members reach each other by pod IP); empty: the host of the address.
    server_name: str = ""

    def validate(self) -> None:
        if not self.enabled:
            if self.require_client_cert:
                raise ConfigError("tls.require_client_cert needs tls.enabled (mutual TLS is TLS)")
            return
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            if not path:
                raise ConfigError(f"tls.{name} is required when tls.enabled is true (a PEM file path)")
            _pem(f"tls.{name}", path)


@dataclass(frozen=True)
class ServerConfig:
    """gRPC server limits shared by every service."""

    max_message_bytes: Annotated[int, positive()] = 64 * 1024
    grace_s: Annotated[float, positive()] = 10.0
    max_concurrent_streams: Annotated[int, positive()] = 10_000
    # A unary call (or a stream's first request) whose request message has not arrived this long after
    # the call began is ended with DEADLINE_EXCEEDED: a client that stalls must not hold a slot of
    # the server's concurrent-RPC limit for ever.
    request_timeout_s: Annotated[float, within(0.1, 600)] = 5.0
    # A plaintext port serving only grpc.health.v1, for probes that cannot speak TLS (the kubelet's);
    # on the host of the service's listen address. 0: none.
    health_port: Annotated[int, PORT] = 0
    # The IP address the Prometheus /metrics listener binds (the service's <section>.metrics_port):
    # empty binds the host of the service's listen address; 127.0.0.1 keeps metrics on the machine,
    # a pod IP or 0.0.0.0 lets Prometheus scrape it from elsewhere.
    metrics_host: str = ""
    # On SIGTERM a process reports NOT_SERVING and keeps working this long before it ends its
    # streams and stops, so peers' probes (admission.probe_interval_s) move its rooms and
    # listeners first and clients reconnect to a process that is already in charge.
    drain_notice_s: Annotated[float, within(0, 60)] = 1.0
    # At start a process waits this long for the Kafka broker and the topics it uses (a fresh install
    # creates them after the pods start), reporting NOT_SERVING on server.health_port meanwhile and
    # saying every few seconds what is missing; then it stops with an error naming it. 0: no wait.
    kafka_wait_s: Annotated[float, within(0, 3_600)] = 300.0
    # Calls in flight at once (unary calls and open streams) per client connection and per client
    # address (IPv4, or IPv6 /limits.ipv6_prefix); past either a call is RESOURCE_EXHAUSTED at once.
    # limits.exempt networks and calls with the service credential are not counted (core/bounds.py).
    max_calls_per_connection: Annotated[int, positive()] = 100
    max_calls_per_address: Annotated[int, positive()] = 1_000
    # gRPC health Watch and reflection streams (open to anyone, no token): at most this many at once per
    # server and per client address, each ended after open_stream_max_s; a reflection stream also ends
    # when its next request has not come within request_timeout_s.
    max_open_streams: Annotated[int, positive()] = 64
    max_open_streams_per_address: Annotated[int, positive()] = 4
    open_stream_max_s: Annotated[float, within(1, 86_400)] = 300.0

    def validate(self) -> None:
        if self.metrics_host:
            try:
                ipaddress.ip_address(self.metrics_host)
            except ValueError as exc:
                raise ConfigError(
                    f"server.metrics_host must be an IP address (127.0.0.1, 0.0.0.0, ::), not "
                    f"{self.metrics_host!r}"
                ) from exc


@dataclass(frozen=True)
class LimitsConfig:
    """Per-user and per-client-address rate limits on client RPCs, by class of method (core/limits.py).

    Classes: changes (room lifecycle and moderation), joins (Join, Leave), follows (Follow, Unfollow,
    RemindMe), reads (GetRoom, ListLiveRooms, CountFollowers, ListFollowers), streams (opening a
    Subscribe, Publish or Inbox stream), open (gRPC health and reflection, per address only). Internal
    calls (the service credential) are never limited.
    """

    enabled: bool = True
    # Calls per second each user may make, and each client address, in each class; 0: no such limit.
    changes_user: Annotated[float, positive(zero="no limit")] = 5.0
    changes_address: Annotated[float, positive(zero="no limit")] = 100.0
    joins_user: Annotated[float, positive(zero="no limit")] = 10.0
    joins_address: Annotated[float, positive(zero="no limit")] = 2_000.0
    follows_user: Annotated[float, positive(zero="no limit")] = 20.0
    follows_address: Annotated[float, positive(zero="no limit")] = 1_000.0
    reads_user: Annotated[float, positive(zero="no limit")] = 50.0
    reads_address: Annotated[float, positive(zero="no limit")] = 2_000.0
    streams_user: Annotated[float, positive(zero="no limit")] = 10.0
    streams_address: Annotated[float, positive(zero="no limit")] = 500.0
    # Health and reflection calls (no token) per second per address: the kubelet probes about once a
    # second, each admission process probes every peer every admission.probe_interval_s.
    open_address: Annotated[float, positive(zero="no limit")] = 50.0
    # Calls per second per address whose credentials fail (missing, forged, expired, garbled): a budget
    # of their own, so garbage tokens never use up the budget of the users behind the same address.
    # Past it an address's calls are refused before their credentials are looked at.
    failures_address: Annotated[float, positive(zero="no limit")] = 20.0
    # A bucket holds this many seconds of its rate (at least one call): the burst a client may send.
    burst_s: Annotated[float, within(0.05, 3_600)] = 2.0
    # Keys (users, addresses) each limiter remembers; past it the least recently seen start afresh.
    max_keys: Annotated[int, within(16, 10_000_000)] = 65_536
    # Client networks never limited per address (CIDRs): a load balancer or NAT gateway that every
    # client's calls come from, or loopback for local load tests and benchmarks.
    exempt: tuple[str, ...] = ()
    # IPv6 clients are counted per /ipv6_prefix network (a host usually holds a whole /64).
    ipv6_prefix: Annotated[int, within(1, 128)] = 64

    def validate(self) -> None:
        for net in self.exempt:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ConfigError(f"limits.exempt entries must be CIDRs (10.0.0.0/8), not {net!r}") from exc


@dataclass(frozen=True)
class AdmissionConfig:
    """The admission service (rooms and joins)."""

    listen: str = "127.0.0.1:50051"
    # The internal port: leases, forwarded room changes and peers' health probes, from the other
    # admission processes only (core/interceptor.py). Never expose it outside the cluster. Empty: none
    # (a process nobody calls: the crowd lane, or a single process).
    internal_listen: str = "127.0.0.1:50071"
    metrics_port: Annotated[int, PORT] = 9101
    # Seed relays (host:port, as they advertise themselves); the room's relays are chosen by rendezvous
    # hashing over the live ones. More relays are found as they come from their load reports
    # (relay.load_report_s; see admission/relays.py) and placed on once a health probe finds them
    # serving. May be empty (the chart names none); a relay listed here is never forgotten.
    relays: tuple[str, ...] = ("127.0.0.1:50052",)
    # The internal address of each relay in `relays`, in the same order (its relay.internal_advertise):
    # tickets name these as the relays an edge pulls the room from. A discovered relay's comes with its
    # load reports.
    relays_internal: tuple[str, ...] = ("127.0.0.1:50072",)
    # At most this many relays known at once (seeds plus discovered); reports of more are ignored.
    max_relays: Annotated[int, within(1, 100_000)] = 1024
    default_listener_limit: Annotated[int, positive()] = 1_000_000
    # Presence events waiting for Kafka; beyond this they are dropped and counted.
    event_queue: Annotated[int, positive()] = 100_000
    # Rooms one host may create per hour (counted on each new room's owner from its replica, so across
    # processes); past it CreateRoom is RESOURCE_EXHAUSTED with a retry-after. 0: no limit.
    rooms_per_host_per_hour: Annotated[int, within(1, 100_000, zero="no limit")] = 30
    # A room neither started nor scheduled this long after its creation is ended by its owner. Ended
    # rooms are deleted from the room-state topic (and forgotten by every process) once every ticket
    # issued for them has expired (tickets.ttl_s plus a minute).
    unstarted_room_ttl_s: Annotated[float, within(1, 90 * 86_400)] = 86_400.0
    # The address the other admission processes reach this one at (its internal port); defaults to
    # internal_listen (to listen without one).
    advertise: str = ""
    # How members are found: "static" (the `members` list) or "kubernetes" (EndpointSlices).
    membership: str = "static"
    # Static members (the internal host:port of every admission process that owns rooms); this
    # process is one unless `owner` is false.
    members: tuple[str, ...] = ()
    # Kubernetes membership: the headless Service, its namespace (default: the pod's) and the name of
    # its internal port.
    kube_service: str = ""
    kube_namespace: str = ""
    kube_port: str = "internal"
    # Admits per lease taken from a room's owner: the size follows the join rate within these bounds.
    lease_min: Annotated[int, within(1, "lease_max")] = 8
    lease_max: int = 5_000
    # Joins/s this process admits across all rooms, shared fairly between rooms; 0 = no budget.
    admit_rate: Annotated[float, positive(zero="no budget")] = 0.0
    # Users a room's waiting line holds per process; beyond it joins are shed.
    waiting_room: Annotated[int, positive()] = 1_000
    # Overload guard below the fair budget: RPCs handled at once, and calls gRPC queues before
    # handing them over; beyond the queue gRPC itself cancels calls, at almost no CPU, so a
    # process offered far more than it can look at keeps admitting at capacity instead of collapsing.
    # max_concurrent_rpcs counts client calls (a user token or a ticket); health probes, open streams
    # (server.max_open_streams) and calls with the service credential (peers) have room of their own,
    # so a full process still answers its probes and its peers' leases and forwarded room changes.
    max_concurrent_rpcs: Annotated[int, positive()] = 256
    max_pending_requests: Annotated[int, positive()] = 256
    # Client calls in flight from one client address (within max_concurrent_rpcs; server.
    # max_calls_per_address is the bound for the other services): one address cannot fill the process.
    max_calls_per_address: Annotated[int, positive()] = 64
    # Whether this process owns rooms (is one of the rendezvous members). False for the crowd lane:
    # processes that take the joins of rooms that draw a crowd (Room.crowd), with a short
    # max_pending_requests, so a celebrity's join storm is shed there, on CPU of their own, and
    # never queues ahead of other rooms' joins or slows an owner; they forward owner-only calls.
    owner: bool = True
    # Join attempts/s (all processes, as seen by the owner's leases) above which a room is marked
    # crowd; 0 never marks one.
    crowd_joins_per_s: Annotated[float, positive(zero="never")] = 500.0
    # Liveness: every admission process probes the other members and the relays with gRPC health
    # this often; a member that misses probe_failures probes in a row (or answers NOT_SERVING)
    # owns no rooms and gets no listeners until it answers again.
    probe_interval_s: Annotated[float, within(0.05, 60)] = 0.3
    probe_timeout_s: Annotated[float, within(0.05, 60)] = 1.0
    probe_failures: Annotated[int, within(1, 10)] = 2
    # A member that answers probes with RESOURCE_EXHAUSTED or CANCELLED is alive but busy (its probes
    # have room of their own, so it is refusing even those): after this many such answers in a row it
    # owns no rooms and gets no listeners, like one that does not answer.
    probe_busy_failures: Annotated[int, within("probe_failures", 1_000)] = 10
    # Host failover, on each room's owner: once a live room's host has had no relay stream open for
    # this many seconds, its first connected co-host becomes host; a room whose host and co-hosts have
    # all been gone this long ends. Presence comes from the relays' load reports (relay.load_report_s
    # must be on). 0 turns it off.
    host_grace_s: Annotated[float, within(1, 3_600, zero="off")] = 60.0
    # WatchRoom (docs/live-state.md): at most one update per watched room every watch_interval_s
    # (changes within it are sent together), counts looked at (and sent if they moved) every
    # watch_counts_s; streams open on this process at once, and per user.
    watch_interval_s: Annotated[float, within(0.01, 10)] = 0.25
    watch_counts_s: Annotated[float, within(0.01, 60)] = 1.0
    max_watch_streams: Annotated[int, positive()] = 20_000
    max_watch_streams_per_user: Annotated[int, positive()] = 4

    def validate(self) -> None:
        _address("admission.listen", self.listen)
        if self.internal_listen:
            _address("admission.internal_listen", self.internal_listen)
        if self.advertise:
            _address("admission.advertise", self.advertise)
        if self.membership not in {"static", "kubernetes"}:
            raise ConfigError(f"admission.membership must be static or kubernetes, not {self.membership!r}")
        for member in self.members:
            _address("admission.members", member)
        if self.membership == "kubernetes" and not self.kube_service:
            raise ConfigError("admission.kube_service must name the headless Service (membership kubernetes)")
        if not self.owner and self.membership == "static" and not self.members:
            raise ConfigError("admission.members must list the owners when admission.owner is false")
        if self.max_relays < len(self.relays):
            raise ConfigError(
                f"admission.max_relays must be at least {len(self.relays)} (the seed relays), "
                f"not {self.max_relays}"
            )
        for relay in self.relays:
            _address("admission.relays", relay)
        if len(self.relays_internal) != len(self.relays):
            raise ConfigError(
                f"admission.relays_internal must name the internal address of each of the "
                f"{len(self.relays)} admission.relays, in the same order, not {len(self.relays_internal)}"
            )
        for relay in self.relays_internal:
            _address("admission.relays_internal", relay)

    @property
    def address(self) -> str:
        """The address other admission processes reach this one at (its internal port)."""
        return self.advertise or self.internal_listen or self.listen


@dataclass(frozen=True)
class RelayConfig:
    """The relay service (audio fan-out)."""

    listen: str = "127.0.0.1:50052"
    # The internal port: the relay tree's pulls from other relays, and peers' health probes. Never
    # expose it outside the cluster.
    internal_listen: str = "127.0.0.1:50072"
    metrics_port: Annotated[int, PORT] = 9102
    # The address listeners are told to use; tickets are bound to it. Defaults to listen.
    advertise: str = ""
    # One port per relay behind one host (a NodePort each on kind): when set, `advertise` is a host
    # alone and the relay advertises host:(advertise_port_base + ordinal). 0: advertise is host:port.
    advertise_port_base: Annotated[int, PORT] = 0
    # This relay's index among the relays (a StatefulSet pod's apps.kubernetes.io/pod-index label);
    # -1: none. Only advertise_port_base reads it.
    ordinal: int = -1
    # The address other relays pull from (admission.relays_internal lists it); defaults to
    # internal_listen.
    internal_advertise: str = ""
    chunk_s: Annotated[float, within(0.02, 1)] = 0.1
    # Chunks buffered per subscriber before its oldest are dropped.
    subscriber_queue: Annotated[int, positive()] = 50
    # A subscriber that has dropped chunks for this long without catching up is cut off.
    stuck_cutoff_s: Annotated[float, positive()] = 10.0
    # Chunks kept per room for late joiners (the last ~300 ms) and resumption.
    ring_chunks: Annotated[int, positive()] = 100
    late_join_s: Annotated[float, positive()] = 0.3
    max_payload_bytes: Annotated[int, within(1, 16_384)] = 1500
    # Frames one Publish stream may send per second (a speaker sends 50: one per 20 ms), and the
    # seconds of that rate it may send at once (frames held back by a network stall, a re-sent
    # buffer after a move). Past it the stream ends with RESOURCE_EXHAUSTED.
    max_frames_per_s: Annotated[float, within(1, 10_000)] = 100.0
    frame_burst_s: Annotated[float, within(0.1, 60)] = 5.0
    # Listener streams one relay process is sized for; admission places no more on it, and the relay
    # refuses more audience Subscribe streams (UNAVAILABLE: the listener joins again for another relay).
    listener_capacity: Annotated[int, positive()] = 2_500
    # Publish streams, and Subscribe streams, one user may hold in one room on this relay (devices,
    # plus a reconnect whose old stream is not yet seen dead); one more ends the user's oldest.
    streams_per_user: Annotated[int, within(1, 100)] = 2
    # How often the relay reports its load to Kafka (townhall.relay-load); 0 disables.
    load_report_s: Annotated[float, positive(zero="off")] = 2.0
    # The relay tree (read by admission's placement): listeners of one room per relay before the
    # room gets another edge, and downstream relays per relay before a mid-tier level is added.
    edge_target: Annotated[int, positive()] = 1_000
    tree_degree: Annotated[int, within(2)] = 8
    # Very large audiences: a room pulled by at least large_room_relays downstream relays is chunked
    # every large_room_chunk_s instead (more listeners per core, more latency); 0 keeps chunk_s.
    large_room_chunk_s: Annotated[float, within("chunk_s", 1, zero="")] = 0.0
    large_room_relays: Annotated[int, positive()] = 4
    # An edge whose pull from upstream has failed for this long ends its listeners' streams of
    # the room (UNAVAILABLE): they join again, admission gives them a path over live relays, and
    # they resume from their last chunk. At once when the upstream says it is draining.
    upstream_lost_s: Annotated[float, within(0.1, 60)] = 1.0
    # A room whose upstream this relay lost stays named in its load report (admission then passes this
    # relay over for that room's listeners) until its pull works again, or this long after the last loss.
    upstream_lost_report_s: Annotated[float, within(1, 3600)] = 30.0
    # Follow the room-state topic (read to its end before serving) to enforce moderation on this relay:
    # streams of removed, banned or demoted users and of ended rooms end, muted speakers are dropped;
    # and the presence topic's leaves: a listener's Leave voids its older tickets here.
    # Off only for a relay without Kafka (tests); tickets alone decide then.
    follow_room_state: bool = True

    def validate(self) -> None:
        _address("relay.listen", self.listen)
        _address("relay.internal_listen", self.internal_listen)
        if self.internal_advertise:
            _address("relay.internal_advertise", self.internal_advertise)
        if self.advertise_port_base:
            self._validate_port_per_relay()
        elif self.advertise:
            _address("relay.advertise", self.advertise)

    def _validate_port_per_relay(self) -> None:
        host = self.advertise
        if not host or any(c.isspace() for c in host) or (":" in host and not _bracketed(host)):
            raise ConfigError(
                "relay.advertise must be a host without a port (IPv6 in brackets) when "
                f"relay.advertise_port_base is set, not {host!r}"
            )
        if self.ordinal < 0:
            raise ConfigError(
                "relay.advertise_port_base needs relay.ordinal, this relay's index (in Kubernetes the pod's "
                "apps.kubernetes.io/pod-index label)"
            )
        if self.advertise_port_base + self.ordinal > 65535:
            raise ConfigError(
                f"relay.advertise_port_base {self.advertise_port_base} + relay.ordinal {self.ordinal} "
                "is past port 65535"
            )

    @property
    def address(self) -> str:
        """The address clients reach this relay at."""
        if self.advertise_port_base:
            return f"{self.advertise}:{self.advertise_port_base + self.ordinal}"
        return self.advertise or self.listen

    @property
    def internal_address(self) -> str:
        """The address other relays pull from."""
        return self.internal_advertise or self.internal_listen


@dataclass(frozen=True)
class NotifierConfig:
    """The notifier service (follower graph, fan-out, inbox)."""

    listen: str = "127.0.0.1:50053"
    # The internal port: graph calls forwarded by the other notifiers, and operators' bulk Import
    # (`townhall graph import`). Never expose it outside the cluster.
    internal_listen: str = "127.0.0.1:50073"
    metrics_port: Annotated[int, PORT] = 9103
    data_dir: str = ".townhall/notifier"
    group_id: str = "townhall-notifier"
    # Followers per notification record on the notifications topic (records stay under 1 MB).
    batch_users: Annotated[int, within(1, 100_000)] = 1000
    # Notifications buffered per Inbox stream before its oldest are dropped.
    inbox_queue: Annotated[int, positive()] = 256
    # Inbox streams one user may hold on one notifier (their devices); one more ends the oldest.
    inbox_streams_per_user: Annotated[int, within(1, 100)] = 4
    # Inbox resume (docs/notifications.md): a reconnecting client gets what it missed from at most this
    # many of the latest records of its partition of the notifications topic (each up to batch_users ids)...
    inbox_resume_records: Annotated[int, within(1, 1_000_000)] = 2_000
    # ...and at most this many notifications (the latest); past either it is told it missed some.
    inbox_resume_notifications: Annotated[int, within(1, 10_000)] = 100
    # Reminders (RemindMe) one user may hold on one notifier for rooms not yet ended; 0: no limit.
    # A reminder is taken only for a room that exists and has not started, and goes when it ends.
    reminders_per_user: Annotated[int, within(1, 1_000_000, zero="no limit")] = 100
    # The address the other notifiers reach this one at (its internal port); defaults to
    # internal_listen.
    advertise: str = ""
    # How the notifiers are found: "static" (the `members` list) or "kubernetes" (the pods of the
    # notifier StatefulSet, kube_statefulset, read from the API; see notifier/membership.py).
    membership: str = "static"
    # Every notifier (its internal host:port), this one included; each followee's graph lives on one
    # of them (rendezvous hashing). Empty: this process holds the whole graph.
    members: tuple[str, ...] = ()
    # Kubernetes membership: the StatefulSet, its namespace (default: the pod's), and each pod's
    # address with "{pod}" where the pod's name goes ("{pod}.<headless Service>.<ns>.svc:<port>").
    kube_statefulset: str = ""
    kube_namespace: str = ""
    kube_member: str = ""
    # On SIGTERM, a notifier the membership no longer lists (scaled away) hands every graph key it
    # holds to its owner before it stops, for at most this many seconds (terminationGracePeriod
    # must cover it; the chart adds it).
    handover_grace_s: Annotated[float, within(0, 3_600)] = 120.0
    # Hosts with more followers than this fan out on the bulk lane; the rest on the fast lane.
    bulk_threshold: Annotated[int, positive()] = 10_000
    # Most of the worker's tasks that go to the bulk lane while fast-lane tasks wait (0..0.9).
    bulk_share: Annotated[float, within(0, 0.9)] = 0.2
    # Fan-out tasks a worker takes in one step (one step's records are acknowledged together).
    worker_tasks: Annotated[int, within(1, 1_000)] = 32
    # Most fan-out tasks per second a worker runs (protects push gateways); 0 = no limit.
    worker_rate: Annotated[float, positive(zero="no limit")] = 0.0
    # Follower ids per fan-out task, at most 4096 (one stored block).
    task_users: Annotated[int, within(1, 4_096)] = 4096
    # Run the planner and the workers here; false for an Inbox-only process.
    fanout: bool = True

    def validate(self) -> None:
        _address("notifier.listen", self.listen)
        _address("notifier.internal_listen", self.internal_listen)
        if self.advertise:
            _address("notifier.advertise", self.advertise)
        for member in self.members:
            _address("notifier.members", member)
        if self.membership not in {"static", "kubernetes"}:
            raise ConfigError(f"notifier.membership must be static or kubernetes, not {self.membership!r}")
        if self.membership == "static" and self.members and self.address not in self.members:
            raise ConfigError(f"notifier.members must include this notifier ({self.address})")
        if self.membership == "kubernetes":
            if not self.kube_statefulset:
                raise ConfigError(
                    "notifier.kube_statefulset must name the notifier StatefulSet (membership kubernetes)"
                )
            if "{pod}" not in self.kube_member:
                raise ConfigError(
                    "notifier.kube_member must be the pods' address with {pod} for the pod name, "
                    f"not {self.kube_member!r}"
                )
            _address("notifier.kube_member", self.kube_member.replace("{pod}", "pod"))
        if not self.data_dir:
            raise ConfigError("notifier.data_dir must not be empty")

    @property
    def address(self) -> str:
        """The address other notifiers reach this one at (its internal port)."""
        return self.advertise or self.internal_listen


@dataclass(frozen=True)
class Config:
    """Everything a Townhall process can be told; each service reads its own section."""

    log: LogConfig = field(default_factory=LogConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    tickets: TicketConfig = field(default_factory=TicketConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    notifier: NotifierConfig = field(default_factory=NotifierConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            check_ranges(f.name, section)
            section.validate()
        grace_s, report_s = self.admission.host_grace_s, self.relay.load_report_s
        if not self.admission.relays and not report_s:
            raise ConfigError(
                "admission.relays is empty and relay.load_report_s is 0: admission finds relays from "
                "their load reports, so it would know none; turn the reports on or list the relays"
            )
        if grace_s and report_s and grace_s < 2 * report_s:
            raise ConfigError(
                f"admission.host_grace_s ({grace_s:g} s) must last at least two relay "
                f"load reports (relay.load_report_s is {report_s:g}): they say who is connected"
            )

    def development_keys(self) -> list[str]:
        """The key lists that hold a built-in development key (anyone can read it in the source)."""
        lists = {
            "auth.keys": (self.auth.keys, DEV_USER_KEY),
            "auth.service_keys": (self.auth.service_keys, DEV_SERVICE_KEY),
            "tickets.private_key": ((self.tickets.private_key,), DEV_TICKET_PRIVATE_KEY),
            "tickets.public_keys": (self.tickets.public_keys, DEV_TICKET_PUBLIC_KEY),
        }
        return [name for name, (keys, dev) in lists.items() if dev in keys]

    def missing_keys(self, service: str) -> list[str]:
        """The keys `service` needs that are not configured (none is ever a default)."""
        present = {
            "auth.keys": bool(self.auth.keys or self.auth.jwks),
            "auth.service_keys": bool(self.auth.service_keys),
            "tickets.private_key": bool(self.tickets.private_key),
            "tickets.public_keys": bool(self.tickets.public_keys),
        }
        return [key for key in _NEEDED.get(service, ()) if not present[key]]

    def require_keys(self, service: str) -> None:
        """Refuses (ConfigError) to run `service` without the keys it needs, saying how to get them."""
        missing = self.missing_keys(service)
        if missing:
            names = ", ".join(f"{k} (TOWNHALL_{k.replace('.', '_').upper()})" for k in missing)
            raise ConfigError(
                f"{service} needs keys that are not configured: {names}. Development keys are never a "
                "default: configure your own (`townhall keys` makes a set; deploy/README.md, Keys), or run "
                "the local topology with `townhall dev`, which uses the development keys"
            )


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Builds the config from defaults, the TOML file (if any) and the environment."""
    env = os.environ if env is None else env
    path = path or env.get("TOWNHALL_CONFIG") or None
    raw: dict[str, dict[str, Any]] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for name, value in raw.items():
        if name not in sections:
            raise ConfigError(f"unknown config section [{name}] in {path}")
        if not isinstance(value, dict):
            raise ConfigError(f"config section [{name}] in {path} must be a table")
    for key, text in env.items():
        if not key.startswith(ENV_PREFIX) or key == "TOWNHALL_CONFIG":
            continue
        section, _, name = key[len(ENV_PREFIX) :].lower().partition("_")
        if section not in sections or not name:
            raise ConfigError(f"unknown config variable {key}")
        raw.setdefault(section, {})[name] = _EnvText(text)
    built = {s: _section(s, sections[s].default_factory, raw.get(s, {})) for s in sections}
    config = Config(**built)
    config.validate()
    return config


# Durations were once given in milliseconds by these keys; every duration is in seconds now (`_s`).
MILLISECOND_KEYS = (
    "kafka.max_clock_skew_ms",
    "server.request_timeout_ms",
    "server.drain_notice_ms",
    "admission.probe_interval_ms",
    "admission.probe_timeout_ms",
    "relay.chunk_ms",
    "relay.late_join_ms",
    "relay.load_report_ms",
    "relay.large_room_chunk_ms",
    "relay.upstream_lost_ms",
)
# Keys that are gone, and what replaced them.
_RENAMED = {
    "tickets.keys": (
        "config key tickets.keys is gone: tickets are signed with ES256 (P-256) now, so relays cannot make "
        "them; set tickets.private_key (admission only) and tickets.public_keys (`townhall keys`)"
    ),
    **{
        old: f"config key {old} is gone: set {old[:-3]}_s, in seconds (every duration is in seconds)"
        for old in MILLISECOND_KEYS
    },
}


class _EnvText(str):
    """A value that came from an environment variable, to be parsed into the field's type."""


def _section(name: str, factory: Any, values: dict[str, Any]) -> Any:
    cls = factory
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(_RENAMED.get(f"{name}.{key}", f"unknown config key {name}.{key}"))
        kwargs[key] = _coerce(f"{name}.{key}", hints[key], value)
    return cls(**kwargs)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, _EnvText):
                if value.lower() in {"1", "true", "yes", "on"}:
                    return True
                if value.lower() in {"0", "false", "no", "off"}:
                    return False
                raise ValueError(value)
            if isinstance(value, bool):
                return value
        elif hint is int:
            if isinstance(value, _EnvText):
                return int(value.replace("_", ""))
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif hint is float:
            if isinstance(value, _EnvText):
                return float(value)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
        elif hint is str:
            if isinstance(value, str):
                return str(value)
        elif origin is tuple:
            items = value.split(",") if isinstance(value, _EnvText) else value
            if isinstance(items, list | tuple) and all(isinstance(i, str) for i in items):
                return tuple(i.strip() for i in items if i.strip())
        elif isinstance(hint, types.UnionType):
            raise TypeError(hint)
    except ValueError:
        pass
    raise ConfigError(f"config key {key} must be {_describe(hint)}, not {value!r}")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return "a list of strings (comma-separated in the environment)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _address(key: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key} must be host:port, not {value!r}")


def _bracketed(host: str) -> bool:
    return host.startswith("[") and host.endswith("]") and ":" in host


def _pem(key: str, path: str) -> None:
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from exc
    if b"-----BEGIN " not in text:
        raise ConfigError(f"{key}: {path} is not a PEM file")
