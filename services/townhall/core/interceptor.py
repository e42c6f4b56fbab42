"""The one server interceptor: maps domain errors to statuses, counts and times every RPC."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from townhall.core import logging
from townhall.core.errors import TownhallError
from townhall.core.metrics import RPC_DURATION, RPC_REQUESTS

log = logging.get(__name__)

_FACTORIES = {
    "unary": grpc.unary_unary_rpc_method_handler,
    "server_stream": grpc.unary_stream_rpc_method_handler,
    "client_stream": grpc.stream_unary_rpc_method_handler,
    "bidi_stream": grpc.stream_stream_rpc_method_handler,
}


class RpcInterceptor(grpc.aio.ServerInterceptor):
    """Turns TownhallError into its status (never UNKNOWN), counts and times each RPC."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        kind, behavior = _behavior(handler)
        wrapped = _wrap(behavior, _Observer(service, method, kind))
        return _FACTORIES[kind](
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _behavior(handler: grpc.RpcMethodHandler) -> tuple[str, Callable[..., Any]]:
    if handler.unary_unary:
        return "unary", handler.unary_unary
    if handler.unary_stream:
        return "server_stream", handler.unary_stream
    if handler.stream_unary:
        return "client_stream", handler.stream_unary
    return "bidi_stream", handler.stream_stream


class _Observer:
    """The metric children of one method, resolved once."""

    def __init__(self, service: str, method: str, kind: str) -> None:
        self.method = f"{service}/{method}"
        self._labels = (service, method, kind)
        self._counts: dict[grpc.StatusCode, Any] = {}
        self._duration = RPC_DURATION.labels(*self._labels)

    def done(self, context: grpc.aio.ServicerContext, start: float, error: BaseException | None) -> None:
        code = _code(context, error)
        child = self._counts.get(code)
        if child is None:
            child = self._counts[code] = RPC_REQUESTS.labels(*self._labels, code.name)
        child.inc()
        self._duration.observe(time.perf_counter() - start)


def _code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # grpc.aio may report the raw integer value
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


async def _fail(context: grpc.aio.ServicerContext, method: str, error: Exception) -> None:
    """Aborts the RPC with the error's status; an unexpected error becomes INTERNAL, logged."""
    if isinstance(error, TownhallError):
        await context.abort(error.code, str(error), trailing_metadata=error.trailers)
    log.error("rpc failed", method=method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see server logs")


def _wrap(behavior: Callable[..., Any], observer: _Observer) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.perf_counter()
            error: BaseException | None = None
            try:
                async for item in behavior(request, context):
                    yield item
            except grpc.aio.AbortError as exc:
                error = exc
                raise
            except Exception as exc:
                error = exc
                await _fail(context, observer.method, exc)
            except BaseException as exc:
                error = exc
                raise
            finally:
                observer.done(context, start, error)

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError as exc:
            error = exc
            raise
        except Exception as exc:
            error = exc
            await _fail(context, observer.method, exc)
        except BaseException as exc:
            error = exc
            raise
        finally:
            observer.done(context, start, error)

    return call
