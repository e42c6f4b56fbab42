"""The one forwarding policy (core/forwarding.py on_owner): where a call runs, what is retried, what is relayed."""

from __future__ import annotations

import grpc
import pytest

from townhall.core import forwarding
from townhall.core.errors import TownhallError
from townhall.core.forwarding import Elsewhere, on_owner


def rpc_error(code: grpc.StatusCode, details: str = "", retry_after_ms: str = "") -> grpc.aio.AioRpcError:
    trailers = (
        grpc.aio.Metadata(("retry-after-ms", retry_after_ms)) if retry_after_ms else grpc.aio.Metadata()
    )
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, details)


class Owner:
    """A scripted owner: answers (or errors) in turn, recording who was called with how much time."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, float]] = []

    async def __call__(self, member: str, timeout_s: float) -> object:
        self.calls.append((member, timeout_s))
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


async def nowhere() -> object:
    raise AssertionError("ran here")


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forwarding, "RETRY_FIRST_S", 0.001)
    monkeypatch.setattr(forwarding, "RETRY_MAX_S", 0.004)


async def test_a_call_this_process_owns_runs_here() -> None:
    async def here() -> str:
        return "here"

    assert await on_owner(lambda: None, here, Owner(), 1.0) == "here"


async def test_unavailable_is_retried_at_the_owner_of_the_moment() -> None:
    owners = iter(["a:1", "b:1"])
    there = Owner(rpc_error(grpc.StatusCode.UNAVAILABLE), "room")
    retries: list[int] = []
    answer = await on_owner(lambda: next(owners), nowhere, there, 5.0, lambda: retries.append(1))
    assert answer == "room"
    assert [member for member, _ in there.calls] == ["a:1", "b:1"]
    assert retries == [1]
    assert all(0 < timeout <= 5.0 for _, timeout in there.calls)  # the time left, not more


async def test_a_retry_that_finds_this_process_the_owner_runs_here() -> None:
    owners = iter(["a:1", None])

    async def here() -> str:
        return "here"

    there = Owner(rpc_error(grpc.StatusCode.UNAVAILABLE))
    assert await on_owner(lambda: next(owners), here, there, 5.0) == "here"


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ],
)
async def test_any_other_status_is_the_owners_answer_relayed_as_it_is(code: grpc.StatusCode) -> None:
    there = Owner(rpc_error(code, "the owner says no", retry_after_ms="250"))
    with pytest.raises(TownhallError) as raised:
        await on_owner(lambda: "a:1", nowhere, there, 5.0)
    assert raised.value.code == code
    assert str(raised.value) == "the owner says no"
    assert raised.value.trailers == (("retry-after-ms", "250"),)
    assert len(there.calls) == 1  # not retried


async def test_unavailable_until_the_deadline_is_the_answer() -> None:
    there = Owner(*[rpc_error(grpc.StatusCode.UNAVAILABLE, "owner down")] * 1000)
    with pytest.raises(TownhallError) as raised:
        await on_owner(lambda: "a:1", nowhere, there, 0.05)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert str(raised.value) == "owner down"
    assert 2 <= len(there.calls) < 1000


async def test_here_may_find_the_key_owned_elsewhere_and_send_it_there() -> None:
    async def here() -> object:
        raise Elsewhere("newer:1")

    there = Owner("room")
    assert await on_owner(lambda: None, here, there, 5.0) == "room"
    assert [member for member, _ in there.calls] == ["newer:1"]


async def test_errors_raised_here_are_not_retried() -> None:
    async def here() -> object:
        raise TownhallError("local refusal")

    with pytest.raises(TownhallError, match="local refusal"):
        await on_owner(lambda: None, here, Owner(), 5.0)
