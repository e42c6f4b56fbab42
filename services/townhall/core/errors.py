"""Domain errors that map one-to-one onto gRPC status codes, with a message for the caller."""

from __future__ import annotations

import grpc

# Trailing metadata a relay sets on UNAVAILABLE to say why it ended a stream on purpose:
# "draining" (SIGTERM) or "upstream-lost". Clients and downstream relays move on at once.
REASON_KEY = "townhall-reason"


def reason(error: grpc.aio.AioRpcError) -> str:
    """The reason a server gave in REASON_KEY ("" if none)."""
    for key, value in error.trailing_metadata() or ():
        if key == REASON_KEY:
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return ""


class TownhallError(Exception):
    """An error whose message is safe and useful to show the caller."""

    code = grpc.StatusCode.INTERNAL
    # Trailing metadata sent with the status (e.g. retry-after-ms).
    trailers: tuple[tuple[str, str], ...] = ()


class InvalidArgument(TownhallError):
    """A field is missing or malformed."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(TownhallError):
    """The named room (or other object) does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(TownhallError):
    """No valid identity or ticket."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(TownhallError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(TownhallError):
    """The object is not in a state that allows this (e.g. joining an ended room)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(TownhallError):
    """Over a limit; retry later. Clients read `retry-after-ms` from the trailing metadata."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms
        self.trailers = (("retry-after-ms", str(retry_after_ms)),)


class AlreadyExists(TownhallError):
    """The object to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Aborted(TownhallError):
    """A concurrent writer won: the change was not made; retrying it re-reads the state it is built on."""

    code = grpc.StatusCode.ABORTED


class Unavailable(TownhallError):
    """A dependency (Kafka, the owner) could not be reached; safe to retry."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.trailers = trailers


def from_rpc(error: grpc.aio.AioRpcError) -> TownhallError:
    """A TownhallError carrying another process's status, so a forwarded call fails as it would there."""
    relayed = TownhallError(error.details() or error.code().name)
    relayed.code = error.code()
    relayed.trailers = tuple(
        (k, v) for k, v in (error.trailing_metadata() or ()) if k == "retry-after-ms" and isinstance(v, str)
    )
    return relayed


class LimitReached(TownhallError):
    """A bounded list of a room is full (co-hosts, speakers, bans...): RESOURCE_EXHAUSTED, not a retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
