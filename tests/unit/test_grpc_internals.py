"""What core/grpc_internals.py relies on in grpcio: each test names the version that broke it.

The two servers here listen on loopback in this process: what is checked is grpc.aio's own dispatch.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from importlib.metadata import version
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2

from townhall.core.auth import Authenticator
from townhall.core.config import DEV_AUTH
from townhall.core.grpc_internals import health_statuses
from townhall.core.interceptor import Instrumented
from townhall.v1.admission_pb2 import JoinRequest, JoinResponse, Waiting

VERSIONS = f"grpcio {grpc.__version__}, grpcio-health-checking {version('grpcio-health-checking')}"
JOIN = "/townhall.v1.Admission/Join"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def test_the_reference_health_servicer_keeps_its_statuses_where_we_read_them() -> None:
    servicer = health.aio.HealthServicer()
    broken = (
        f"{VERSIONS}: the reference aio HealthServicer no longer keeps its statuses in `_server_status`; "
        "fix core/grpc_internals.health_statuses (Check and List of core/health.py read it)"
    )
    try:
        statuses = health_statuses(servicer)
    except AttributeError as exc:
        pytest.fail(f"{broken} ({exc})")
    await servicer.set("townhall.v1.Admission", SERVING)
    assert dict(health_statuses(servicer)) == {"": SERVING, "townhall.v1.Admission": SERVING}, broken
    await servicer.enter_graceful_shutdown()
    assert set(statuses.values()) == {NOT_SERVING}, broken


def _join_handler(answer: int) -> grpc.RpcMethodHandler:
    async def join(request: JoinRequest, context: grpc.aio.ServicerContext) -> JoinResponse:
        return JoinResponse(waiting=Waiting(position=answer))

    return grpc.unary_unary_rpc_method_handler(
        join, request_deserializer=JoinRequest.FromString, response_serializer=JoinResponse.SerializeToString
    )


class _OneMethod(grpc.GenericRpcHandler):
    """A generic handler of one method path that is not grpc's dictionary handler."""

    def __init__(self, path: str, handler: grpc.RpcMethodHandler) -> None:
        self.asked = 0
        self._path, self._handler = path, handler

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        self.asked += 1
        return self._handler if details.method == self._path else None


@contextlib.asynccontextmanager
async def _serve(register: Callable[[grpc.aio.Server], Any]) -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server()
    register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


def _calls(channel: grpc.aio.Channel) -> list[Any]:
    """Join as the generated stub calls it (a registered method) and as a plain client does."""
    kinds = {
        "request_serializer": JoinRequest.SerializeToString,
        "response_deserializer": JoinResponse.FromString,
    }
    return [channel.unary_unary(JOIN, _registered_method=True, **kinds), channel.unary_unary(JOIN, **kinds)]


async def test_grpc_aio_serves_a_method_registered_both_ways_without_asking_generic_handlers() -> None:
    generic = _OneMethod(JOIN, _join_handler(1))

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((generic,))
        server.add_registered_method_handlers("townhall.v1.Admission", {"Join": _join_handler(2)})

    async with _serve(register) as channel:
        answers = [(await call(JoinRequest(room_id="r"))).waiting.position for call in _calls(channel)]
    assert answers == [2, 2] and generic.asked == 0, (
        f"{VERSIONS}: grpc.aio now asks generic handlers for methods it has registered handlers of "
        f"(answers {answers}, generic handler asked {generic.asked} times): the measurement in "
        "core/grpc_internals.py no longer holds, measure the generic path (core/interceptor._Generic) again"
    )


async def test_a_method_registered_only_generically_is_authenticated_like_the_rest() -> None:
    def register(server: grpc.aio.Server) -> None:
        Instrumented(server, Authenticator(DEV_AUTH)).add_generic_rpc_handlers(
            (_OneMethod(JOIN, _join_handler(1)),)
        )

    async with _serve(register) as channel:
        for call in _calls(channel):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(JoinRequest(room_id="r"))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, "served without a token"
