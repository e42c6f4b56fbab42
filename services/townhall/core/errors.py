"""Domain errors that map one-to-one onto gRPC status codes, with a message for the caller, and the
standard error details each carries (AIP-193).

Every refusal goes out (core/interceptor.py `_fail`, the one place an error becomes a status) as a
google.rpc.Status in the `grpc-status-details-bin` trailer, which clients in any language and grpcurl
decode: an ErrorInfo with a stable `reason` from `Reason` and the domain `townhall.dev`; a RetryInfo
when the caller should come back later (every shed or rate-limited call); a BadRequest naming the
field on INVALID_ARGUMENT. The older trailers (`retry-after-ms`, `townhall-reason`) are still sent
alongside for one deprecation window (docs/errors.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from enum import StrEnum

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "townhall.dev"
# The standard trailer of a google.rpc.Status.
DETAILS_KEY = "grpc-status-details-bin"
# Deprecated trailers, kept for one deprecation window (docs/errors.md): `retry-after-ms` on a refusal
# with a retry hint, and `townhall-reason` on UNAVAILABLE when a relay ended a stream on purpose.
RETRY_AFTER_KEY = "retry-after-ms"
REASON_KEY = "townhall-reason"


class Reason(StrEnum):
    """Every ErrorInfo.reason Townhall sends (domain townhall.dev): stable, so clients may switch on it.

    docs/errors.md lists them with what a client does about each; a test checks the two agree.
    """

    # INVALID_ARGUMENT: a field is missing or malformed; the BadRequest detail names it.
    INVALID_FIELD = "INVALID_FIELD"
    # UNAUTHENTICATED: no valid token, ticket or service credential; or it has expired.
    UNAUTHENTICATED = "UNAUTHENTICATED"
    CREDENTIAL_EXPIRED = "CREDENTIAL_EXPIRED"
    # PERMISSION_DENIED
    PERMISSION_DENIED = "PERMISSION_DENIED"
    MISSING_GRANT = "MISSING_GRANT"
    BANNED = "BANNED"
    REMOVED = "REMOVED"
    NOT_ON_STAGE = "NOT_ON_STAGE"
    SEAT_GIVEN_BACK = "SEAT_GIVEN_BACK"
    # NOT_FOUND, ALREADY_EXISTS
    NOT_FOUND = "NOT_FOUND"
    ROOM_NOT_FOUND = "ROOM_NOT_FOUND"
    ROOM_EXISTS = "ROOM_EXISTS"
    # FAILED_PRECONDITION
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ROOM_ENDED = "ROOM_ENDED"
    ROOM_NOT_LIVE = "ROOM_NOT_LIVE"
    NOT_INVITED = "NOT_INVITED"
    STREAM_REPLACED = "STREAM_REPLACED"
    # RESOURCE_EXHAUSTED: with a RetryInfo (SLOW_LISTENER's is 0: reconnect at once), except LIMIT_REACHED.
    ROOM_FULL = "ROOM_FULL"
    WAITING_LINE_FULL = "WAITING_LINE_FULL"
    OVERLOADED = "OVERLOADED"
    RATE_LIMITED = "RATE_LIMITED"
    TOO_MANY_CALLS = "TOO_MANY_CALLS"
    LIMIT_REACHED = "LIMIT_REACHED"
    SLOW_LISTENER = "SLOW_LISTENER"
    # ABORTED: another admission process took the room over while the change was made; it was not made.
    OWNER_CHANGED = "OWNER_CHANGED"
    # UNAVAILABLE: safe to retry.
    UNAVAILABLE = "UNAVAILABLE"
    DRAINING = "DRAINING"
    UPSTREAM_LOST = "UPSTREAM_LOST"
    RELAY_FULL = "RELAY_FULL"
    NO_RELAY = "NO_RELAY"
    ROOM_BEHIND = "ROOM_BEHIND"
    # DEADLINE_EXCEEDED: the request message did not arrive in time.
    REQUEST_STALLED = "REQUEST_STALLED"
    # UNIMPLEMENTED: this server does not serve the method.
    UNIMPLEMENTED = "UNIMPLEMENTED"
    # INTERNAL: a Townhall fault (see the server's logs).
    INTERNAL = "INTERNAL"


# The deprecated `townhall-reason` values, sent with these reasons alongside the ErrorInfo.
_LEGACY_REASONS = {Reason.DRAINING: "draining", Reason.UPSTREAM_LOST: "upstream-lost"}
_FROM_LEGACY = {value: reason for reason, value in _LEGACY_REASONS.items()}


class TownhallError(Exception):
    """An error whose message is safe and useful to show the caller; `reason` is its ErrorInfo reason."""

    code = grpc.StatusCode.INTERNAL
    reason = Reason.INTERNAL

    def __init__(self, message: str = "", *, reason: Reason | None = None, retry_after_ms: int | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        # When the caller should try again (a RetryInfo, and the deprecated retry-after-ms trailer).
        self.retry_after_ms = retry_after_ms
        # A status passed on from another process as it was (from_rpc), details and all.
        self.relayed: tuple[tuple[str, str | bytes], ...] | None = None

    @property
    def trailers(self) -> tuple[tuple[str, str | bytes], ...]:
        """The trailing metadata that carries this error's details, the deprecated trailers too."""
        if self.relayed is not None:
            return self.relayed
        sent: list[tuple[str, str | bytes]] = [(DETAILS_KEY, self.status().SerializeToString())]
        if self.retry_after_ms is not None:
            sent.append((RETRY_AFTER_KEY, str(self.retry_after_ms)))
        legacy = _LEGACY_REASONS.get(self.reason)
        if legacy is not None:
            sent.append((REASON_KEY, legacy))
        return tuple(sent)

    def status(self) -> status_pb2.Status:
        """The google.rpc.Status of this error: code, message and details."""
        status = status_pb2.Status(code=self.code.value[0], message=str(self))
        status.details.add().Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN))
        if self.retry_after_ms is not None:
            delay = Duration()
            delay.FromMilliseconds(self.retry_after_ms)
            status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        return status


class InvalidArgument(TownhallError):
    """A field is missing or malformed; `field` names it (a BadRequest.FieldViolation: a path such as
    `room_id`, `request.speaker_ids[2]`). None only when no field can be named (bytes that do not parse)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = Reason.INVALID_FIELD

    def __init__(self, message: str, field: str | None) -> None:
        super().__init__(message)
        self.field = field

    def status(self) -> status_pb2.Status:
        status = super().status()
        if self.field is None:
            return status
        violation = error_details_pb2.BadRequest.FieldViolation(field=self.field, description=str(self))
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        return status


class NotFound(TownhallError):
    """The named room (or other object) does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    reason = Reason.NOT_FOUND


class Unauthenticated(TownhallError):
    """No valid identity or ticket."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = Reason.UNAUTHENTICATED


class PermissionDenied(TownhallError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = Reason.PERMISSION_DENIED


class FailedPrecondition(TownhallError):
    """The object is not in a state that allows this (e.g. joining an ended room)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = Reason.FAILED_PRECONDITION


class ResourceExhausted(TownhallError):
    """Over a limit; retry after `retry_after_ms` (a RetryInfo). Every such refusal names its reason."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_ms: int, reason: Reason) -> None:
        super().__init__(message, reason=reason, retry_after_ms=retry_after_ms)


class AlreadyExists(TownhallError):
    """The object to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = Reason.ROOM_EXISTS


class Aborted(TownhallError):
    """A concurrent writer won: the change was not made; retrying it re-reads the state it is built on."""

    code = grpc.StatusCode.ABORTED
    reason = Reason.OWNER_CHANGED


class Unavailable(TownhallError):
    """A dependency (Kafka, the owner) could not be reached, or the server is going away; safe to retry."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = Reason.UNAVAILABLE


class Unimplemented(TownhallError):
    """This server does not serve the method."""

    code = grpc.StatusCode.UNIMPLEMENTED
    reason = Reason.UNIMPLEMENTED


class LimitReached(TownhallError):
    """A bounded list of a room is full (co-hosts, speakers, bans...): RESOURCE_EXHAUSTED, not a retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = Reason.LIMIT_REACHED


def from_rpc(error: grpc.aio.AioRpcError) -> TownhallError:
    """A TownhallError carrying another process's status, so a forwarded call fails as it would there."""
    relayed = TownhallError(error.details() or error.code().name)
    relayed.code = error.code()
    relayed.relayed = tuple(
        (k, v)
        for k, v in (error.trailing_metadata() or ())
        if k in (DETAILS_KEY, RETRY_AFTER_KEY, REASON_KEY)
    )
    return relayed


@dataclass(frozen=True, slots=True)
class Details:
    """What a Townhall refusal says besides its code and message (`details`)."""

    reason: str = ""  # an ErrorInfo reason (Reason), "" if none was given
    retry_after_s: float | None = None  # from a RetryInfo, else the deprecated retry-after-ms
    fields: tuple[str, ...] = ()  # the fields a BadRequest names


def _standard(data: bytes) -> tuple[str, float | None, list[str]]:
    """The ErrorInfo reason (of this domain), RetryInfo delay and BadRequest fields of a serialized Status."""
    reason, retry_s, fields = "", None, list[str]()
    for packed in status_pb2.Status.FromString(data).details:
        if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            if info.domain == DOMAIN:
                reason = info.reason
        elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            packed.Unpack(retry)
            retry_s = max(0.0, retry.retry_delay.ToMilliseconds() / 1000)
        elif packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            packed.Unpack(bad)
            fields += [violation.field for violation in bad.field_violations]
    return reason, retry_s, fields


def details(error: grpc.aio.AioRpcError) -> Details:
    """The details of a refusal: the standard ones first, else the deprecated trailers (older servers)."""
    reason, retry_s, fields = "", None, list[str]()
    legacy_reason, legacy_retry_s = "", None
    for key, value in error.trailing_metadata() or ():
        if key == DETAILS_KEY and isinstance(value, bytes):
            try:
                found = _standard(value)
            except DecodeError:  # a malformed trailer: read the rest as an older server's
                continue
            reason, retry_s, fields = found
        elif key == RETRY_AFTER_KEY:
            with contextlib.suppress(TypeError, ValueError):
                legacy_retry_s = max(0.0, int(value) / 1000)
        elif key == REASON_KEY:
            text = value if isinstance(value, str) else value.decode("ascii", "replace")
            legacy_reason = _FROM_LEGACY.get(text, "")
    return Details(
        reason=reason or legacy_reason,
        retry_after_s=retry_s if retry_s is not None else legacy_retry_s,
        fields=tuple(fields),
    )


def reason(error: grpc.aio.AioRpcError) -> str:
    """The reason a server gave for a refusal ("" if none): ErrorInfo's, else the deprecated trailer's."""
    return details(error).reason


def sent_away(error: grpc.aio.AioRpcError) -> bool:
    """Whether a relay ended the stream on purpose (draining, or it lost its upstream): move on at once."""
    return reason(error) in (Reason.DRAINING, Reason.UPSTREAM_LOST)
