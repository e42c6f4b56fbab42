"""Every RPC's cross-cutting work: authentication, domain errors mapped to statuses, counts and timings.

The method handlers are wrapped once, when a servicer is registered (`Instrumented`), not per call:
a grpc.aio ServerInterceptor runs a coroutine and builds a new handler for every call, which on
the join path cost more than the join's own logic.

Hostile input never reaches gRPC's own error paths, which answer UNKNOWN or hang:
- Request bytes that do not parse (bad UTF-8 in a string field, garbage, a truncated message) or
  that hold an enum number the enum does not define are INVALID_ARGUMENT naming the field: the
  deserializers are wrapped (one extra function call), and every method is served as a
  request-streaming one that reads its request itself, so the failure reaches the wrapper.
- A unary call whose client half-closes without a message is INVALID_ARGUMENT (grpc.aio would
  leave it open, holding a slot of the server's concurrent-RPC limit until the client gives up),
  and one whose message does not arrive within server.request_timeout_ms is DEADLINE_EXCEEDED.
- Per-user and per-address rate limits (core/limits.py) run before the servicer.

Each server is one of two planes. A client port serves the client APIs and refuses internal methods
and service credentials; the internal port (core/server.py) serves only calls between Townhall
processes: internal methods and calls forwarded to a member, each with a service credential for that
member and method (core/credentials.py), never rate-limited (a forwarded call was counted where it
arrived).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import grpc
from grpc._utilities import DictionaryGenericHandler

from townhall.core import decoding, logging
from townhall.core.auth import OPEN, SERVICE, TICKET, USER, Authenticator, refuse_service_credential, rule
from townhall.core.config import LimitsConfig
from townhall.core.credentials import SERVICE_KEY, callers
from townhall.core.errors import InvalidArgument, PermissionDenied, TownhallError
from townhall.core.identity import AUTHENTICATOR, FORWARDED, PRINCIPAL, SERVICE_CALLER
from townhall.core.limits import CHARGE, Limits, limit_class
from townhall.core.metrics import RPC_DURATION, RPC_REQUESTS
from townhall.core.tasks import cancel

log = logging.get(__name__)

# Every method is served as request-streaming (see the module docstring); the kind stays in metrics.
_FACTORIES = {
    "unary": grpc.stream_unary_rpc_method_handler,
    "server_stream": grpc.stream_stream_rpc_method_handler,
    "client_stream": grpc.stream_unary_rpc_method_handler,
    "bidi_stream": grpc.stream_stream_rpc_method_handler,
}
_STALLED = "townhall-request-stalled"


class Stalled(TownhallError):
    """The request message did not arrive in time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Instrumented:
    """Stands in for a grpc.aio.Server while servicers register: wraps each method handler once."""

    def __init__(
        self,
        server: grpc.aio.Server,
        authenticator: Authenticator,
        limits: Limits | None = None,
        request_timeout_s: float = 5.0,
        internal: bool = False,
    ) -> None:
        self._server = server
        self._auth = authenticator
        # The internal port: calls between Townhall processes only (see the module docstring).
        self._internal = internal
        self._limits = limits or Limits(LimitsConfig(enabled=False))
        self._reads = _FirstReads(request_timeout_s)
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def start(self) -> None:
        """Starts ending calls whose request stalls (within the running event loop)."""
        self._reads.start()

    async def close(self) -> None:
        """Stops the stall sweep."""
        await self._reads.close()

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
            how = rule(service, method)
            checker = _internal_checker if self._internal else _checker
            check = checker(self._auth, self._limits, service, method, how, kind)
            observer = _Observer(service, method, kind)
            reads = None if kind in ("client_stream", "bidi_stream") else self._reads
            wrapped = self._wrapped[path] = _FACTORIES[kind](
                _wrap(behavior, observer, check, reads),
                request_deserializer=_parser(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return wrapped


def _parser(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The request deserializer, refusing what does not parse with INVALID_ARGUMENT naming the field."""
    if deserializer is None:
        return None
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = descriptor.full_name if descriptor is not None else "request message"

    def refuse(data: bytes) -> InvalidArgument:
        why = decoding.problem(descriptor, data) if descriptor is not None else "it does not parse"
        return InvalidArgument(f"request is not a valid {name}: {why}")

    if descriptor is None or not decoding.has_enums(descriptor):

        def parse(data: bytes) -> Any:
            try:
                return deserializer(data)
            except Exception:
                raise refuse(data) from None

        return parse

    def parse_checked(data: bytes) -> Any:
        try:
            message = deserializer(data)
        except Exception:
            raise refuse(data) from None
        wrong = decoding.enum_problem(message)
        if wrong:
            raise InvalidArgument(f"request is not a valid {name}: {wrong}")
        return message

    return parse_checked


class _FirstReads:
    """Reads the request of a unary-request call; ends calls whose request stalls past the timeout."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._waiting: dict[asyncio.Task[Any], float] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="stalled-requests")

    async def close(self) -> None:
        await cancel(self._sweeper)

    async def read(self, context: grpc.aio.ServicerContext, since: float) -> Any:
        """The call's one request message: INVALID_ARGUMENT if the client sent none."""
        task = asyncio.current_task()
        assert task is not None
        self._waiting[task] = since
        try:
            request = await context.read()
        except asyncio.CancelledError as exc:
            if not (exc.args and exc.args[0] == _STALLED):
                raise
            task.uncancel()
            raise Stalled(
                f"the request message did not arrive within {self.timeout_s:g} s of the call"
            ) from None
        finally:
            self._waiting.pop(task, None)
        if request is grpc.aio.EOF:
            raise InvalidArgument("no request message: the client ended the call without sending one")
        return request

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.timeout_s / 4))
            late = time.perf_counter() - self.timeout_s
            for task, since in list(self._waiting.items()):
                if since < late:
                    del self._waiting[task]
                    task.cancel(_STALLED)


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
    if isinstance(error, NotImplementedError):  # what a generated base servicer raises
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this server")
    log.error("rpc failed", method=method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see server logs")


def _checker(
    auth: Authenticator, limits: Limits, service: str, method: str, how: str, kind: str
) -> Callable[[grpc.aio.ServicerContext], None]:
    """What runs before a method on a client port: rate limits and its authentication rule
    (core/auth.py), setting the call's identity. Internal methods and service credentials are refused."""
    name = f"{service.rpartition('.')[2]}/{method}"
    cls = limit_class(service, method, how, kind != "unary")
    by_address, by_user = limits.for_method(cls)

    def user(context: grpc.aio.ServicerContext) -> None:
        AUTHENTICATOR.set(auth)
        # The address first: a flood of forged tokens costs a dictionary lookup each, not a verify.
        if by_address is not None:
            by_address(context.peer())
        who = auth.principal(context.invocation_metadata())
        PRINCIPAL.set(who)
        if by_user is not None:
            by_user(who.user_id)

    def internal(context: grpc.aio.ServicerContext) -> None:
        raise PermissionDenied(
            f"{name} is internal to Townhall: it is served only on the internal port of Townhall "
            "processes, never on a client port"
        )

    def ticket(context: grpc.aio.ServicerContext) -> None:
        AUTHENTICATOR.set(auth)
        PRINCIPAL.set(None)
        for key, _ in context.invocation_metadata() or ():
            if key == SERVICE_KEY:
                refuse_service_credential()
        if by_address is not None:
            by_address(context.peer())
        if by_user is not None:
            CHARGE.set(by_user)  # the servicer names the user once it has verified the ticket

    def other(context: grpc.aio.ServicerContext) -> None:
        AUTHENTICATOR.set(auth)
        PRINCIPAL.set(None)

    checks = {USER: user, SERVICE: internal, TICKET: ticket, OPEN: other}
    return checks[how]


def _internal_checker(
    auth: Authenticator, limits: Limits, service: str, method: str, how: str, kind: str
) -> Callable[[grpc.aio.ServicerContext], None]:
    """What runs before a method on the internal port: a service credential for this member and method,
    from a kind of process that may make the call; for a forwarded client call, the user's token too."""
    name = f"{service.rpartition('.')[2]}/{method}"
    if how == OPEN:

        def other(context: grpc.aio.ServicerContext) -> None:
            AUTHENTICATOR.set(auth)
            PRINCIPAL.set(None)

        return other
    if not callers(service, method):

        def client_only(context: grpc.aio.ServicerContext) -> None:
            raise PermissionDenied(
                f"{name} is a client call: it is served on the client port, not on the internal port"
            )

        return client_only
    verify = auth.services.for_method(service, method)
    own_kind = auth.kind

    def internal(context: grpc.aio.ServicerContext) -> None:
        AUTHENTICATOR.set(auth)
        metadata = context.invocation_metadata()
        caller = verify(metadata)
        SERVICE_CALLER.set(caller)
        # A member of this service passing a call on: a forwarded call (with its user's token), or a
        # part of an import. Anything else on this port is an internal call of another kind.
        FORWARDED.set(caller.kind == own_kind)
        PRINCIPAL.set(auth.forwarded(metadata) if how == USER else None)

    return internal


def _wrap(
    behavior: Callable[..., Any],
    observer: _Observer,
    check: Callable[[grpc.aio.ServicerContext], None],
    reads: _FirstReads | None,
) -> Callable[..., Any]:
    """The handler gRPC calls: `reads` reads the one request of a unary-request method (None: a stream)."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.perf_counter()
            error: BaseException | None = None
            try:
                check(context)
                request = requests if reads is None else await reads.read(context, start)
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

    async def call(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            check(context)
            request = requests if reads is None else await reads.read(context, start)
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
