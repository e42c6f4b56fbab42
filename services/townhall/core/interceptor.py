"""Every RPC's cross-cutting work: authentication, domain errors mapped to statuses, counts and timings.

The method handlers are wrapped once, when a servicer is registered (`Instrumented`), not per call:
a grpc.aio ServerInterceptor runs a coroutine and builds a new handler for every call, which on
the join path cost more than the join's own logic.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import grpc
from grpc._utilities import DictionaryGenericHandler

from townhall.core import logging
from townhall.core.auth import OPEN, SERVICE, TICKET, USER, Authenticator, rule
from townhall.core.errors import TownhallError
from townhall.core.identity import AUTHENTICATOR, PRINCIPAL
from townhall.core.metrics import RPC_DURATION, RPC_REQUESTS

log = logging.get(__name__)

_FACTORIES = {
    "unary": grpc.unary_unary_rpc_method_handler,
    "server_stream": grpc.unary_stream_rpc_method_handler,
    "client_stream": grpc.stream_unary_rpc_method_handler,
    "bidi_stream": grpc.stream_stream_rpc_method_handler,
}


class Instrumented:
    """Stands in for a grpc.aio.Server while servicers register: wraps each method handler once."""

    def __init__(self, server: grpc.aio.Server, authenticator: Authenticator) -> None:
        self._server = server
        self._auth = authenticator
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Registers generic handlers; the generated code's dictionary handlers are instrumented."""
        out: list[grpc.GenericRpcHandler] = []
        for handler in handlers:
            if isinstance(handler, DictionaryGenericHandler):
                methods = {path: self._wrap(path, h) for path, h in handler._method_handlers.items()}
                service = handler.service_name()
                out.append(
                    grpc.method_handlers_generic_handler(
                        service, {path.rpartition("/")[2]: h for path, h in methods.items()}
                    )
                )
            else:
                out.append(handler)
        self._server.add_generic_rpc_handlers(tuple(out))

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        """Registers a service's methods with gRPC's per-method fast path, instrumented."""
        self._server.add_registered_method_handlers(
            service, {name: self._wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)

    def _wrap(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        # The generated code registers each method twice (generic and registered): one wrapper serves both.
        wrapped = self._wrapped.get(path)
        if wrapped is None:
            service, _, method = path.lstrip("/").rpartition("/")
            kind, behavior = _behavior(handler)
            wrapped = self._wrapped[path] = _FACTORIES[kind](
                _wrap(behavior, _Observer(service, method, kind), _checker(self._auth, service, method)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return wrapped


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


_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


def _code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # grpc.aio may report the raw integer value
        return _BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
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


def _checker(auth: Authenticator, service: str, method: str) -> Callable[[grpc.aio.ServicerContext], None]:
    """What runs before the method: its authentication rule (core/auth.py), setting the call's identity."""
    how = rule(service, method)
    name = f"{service.rpartition('.')[2]}/{method}"

    def user(context: grpc.aio.ServicerContext) -> None:
        AUTHENTICATOR.set(auth)
        PRINCIPAL.set(auth.principal(context.invocation_metadata()))

    def internal(context: grpc.aio.ServicerContext) -> None:
        AUTHENTICATOR.set(auth)
        PRINCIPAL.set(None)
        auth.require_service(context.invocation_metadata(), name)

    def other(context: grpc.aio.ServicerContext) -> None:
        AUTHENTICATOR.set(auth)
        PRINCIPAL.set(None)

    checks = {USER: user, SERVICE: internal, TICKET: other, OPEN: other}
    return checks[how]


def _wrap(
    behavior: Callable[..., Any], observer: _Observer, check: Callable[[grpc.aio.ServicerContext], None]
) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.perf_counter()
            error: BaseException | None = None
            try:
                check(context)
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
            check(context)
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
