"""Standard error details (core/errors.py): what each refusal carries, and how a client reads it back."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
from google.rpc import error_details_pb2, status_pb2

from townhall.client import retry_hint_s
from townhall.core.errors import (
    DETAILS_KEY,
    DOMAIN,
    Details,
    InvalidArgument,
    LimitReached,
    PermissionDenied,
    Reason,
    ResourceExhausted,
    TownhallError,
    Unavailable,
    details,
    from_rpc,
    sent_away,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "errors.md"


def as_received(error: TownhallError) -> grpc.aio.AioRpcError:
    """The error as a client receives it: the code, the message and the trailers the server sent."""
    return grpc.aio.AioRpcError(
        error.code, grpc.aio.Metadata(), grpc.aio.Metadata(*error.trailers), str(error)
    )


def kinds(error: TownhallError) -> list[str]:
    status = status_pb2.Status.FromString(dict(error.trailers)[DETAILS_KEY])
    return [d.type_url.rpartition(".")[2] for d in status.details]


def test_a_shed_call_carries_error_info_retry_info_and_the_deprecated_trailer() -> None:
    error = ResourceExhausted("room r is full; retry after 1500 ms", 1500, Reason.ROOM_FULL)
    status = status_pb2.Status.FromString(dict(error.trailers)[DETAILS_KEY])
    assert (status.code, status.message) == (grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], str(error))
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    status.details[0].Unpack(info)
    status.details[1].Unpack(retry)
    assert (info.reason, info.domain) == ("ROOM_FULL", DOMAIN)
    assert retry.retry_delay.ToMilliseconds() == 1500
    assert dict(error.trailers)["retry-after-ms"] == "1500"
    assert details(as_received(error)) == Details("ROOM_FULL", 1.5, ())


def test_a_refusal_that_is_not_a_retry_has_no_retry_info() -> None:
    assert kinds(PermissionDenied("user 7 is banned", reason=Reason.BANNED)) == ["ErrorInfo"]
    assert kinds(LimitReached("the stage is full")) == ["ErrorInfo"]
    assert details(as_received(LimitReached("full"))).reason == "LIMIT_REACHED"
    assert retry_hint_s(as_received(LimitReached("the stage is full; try again later"))) is None


def test_invalid_argument_names_the_field() -> None:
    error = InvalidArgument("speaker_ids[1] is required", "speaker_ids[1]")
    assert kinds(error) == ["ErrorInfo", "BadRequest"]
    assert details(as_received(error)) == Details("INVALID_FIELD", None, ("speaker_ids[1]",))
    # Bytes that do not parse name no field: no BadRequest rather than one with an empty field.
    assert kinds(InvalidArgument("request is not a valid townhall.v1.JoinRequest", None)) == ["ErrorInfo"]


def test_the_client_reads_retry_info_first_then_the_deprecated_trailer_then_the_message() -> None:
    newer = grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(
            (DETAILS_KEY, ResourceExhausted("busy", 2000, Reason.OVERLOADED).status().SerializeToString()),
            ("retry-after-ms", "9000"),  # disagreeing on purpose: RetryInfo wins
        ),
        "busy",
    )
    assert retry_hint_s(newer) == 2.0
    older = grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("retry-after-ms", "750")),
        "",
    )
    assert retry_hint_s(older) == 0.75
    text = grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), "retry after 3 s"
    )
    assert retry_hint_s(text) == 3.0


def test_a_relay_sending_a_stream_away_is_recognised_from_either_form() -> None:
    draining = Unavailable("relay is shutting down", reason=Reason.DRAINING)
    assert dict(draining.trailers)["townhall-reason"] == "draining"  # deprecated, still sent
    assert sent_away(as_received(draining))
    older = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("townhall-reason", "upstream-lost")),
        "",
    )
    assert sent_away(older) and details(older).reason == Reason.UPSTREAM_LOST
    assert not sent_away(as_received(Unavailable("Kafka did not answer")))


def test_a_forwarded_refusal_keeps_the_owners_details() -> None:
    there = ResourceExhausted("too many", 400, Reason.RATE_LIMITED)
    relayed = from_rpc(as_received(there))
    assert relayed.code == there.code and str(relayed) == str(there)
    assert details(as_received(relayed)) == details(as_received(there))


def test_a_malformed_details_trailer_falls_back_to_the_deprecated_ones() -> None:
    bad_detail = status_pb2.Status(code=8)
    bad_detail.details.add(type_url="type.googleapis.com/google.rpc.RetryInfo", value=b"\xff\xff")
    for trailer in (b"\xff\xff not a status", bad_detail.SerializeToString()):
        error = grpc.aio.AioRpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.aio.Metadata(),
            grpc.aio.Metadata((DETAILS_KEY, trailer), ("retry-after-ms", "100")),
            "",
        )
        assert details(error).retry_after_s == 0.1


def test_docs_list_every_reason() -> None:
    listed = set(re.findall(r"^\| `([A-Z_]+)` \|", DOCS.read_text(), flags=re.M))
    assert listed == {reason.value for reason in Reason}
