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
  and one whose message does not arrive within server.request_timeout_s is DEADLINE_EXCEEDED.
- Per-user and per-address rate limits (core/limits.py) run before the servicer, and calls in flight are
  bounded per connection, per address and per server (core/bounds.py).
- The open methods (health, reflection: no token) cannot hold a server: their streams (health Watch,
  reflection) end after server.open_stream_max_s, and a reflection stream whose next request does not
  come within server.request_timeout_s ends too.

Each server is one of two planes. A client port serves the client APIs and refuses internal methods
and service credentials; the internal port (core/server.py) serves only calls between Townhall
processes: internal methods and calls forwarded to a member, each with a service credential for that
member and method (core/credentials.py), never rate-limited nor bounded (a forwarded call was counted
where it arrived).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import grpc

from townhall.core import decoding, logging
from townhall.core.auth import OPEN, SERVICE, TICKET, USER, Authenticator, refuse_service_credential, rule
from townhall.core.bounds import CLIENT, NONE, OPEN_STREAM, SELF_BOUNDED, SELF_BOUNDED_METHODS, Bounds
from townhall.core.config import LimitsConfig, ServerConfig
from townhall.core.credentials import SERVICE_KEY, callers
from townhall.core.errors import (
    REASON_KEY,
    InvalidArgument,
    PermissionDenied,
    Reason,
    TownhallError,
    Unauthenticated,
    Unimplemented,
)
from townhall.core.identity import AUTHENTICATOR, FORWARDED, PRINCIPAL, SERVICE_CALLER
from townhall.core.limits import CHARGE, Limits, limit_class
from townhall.core.metrics import RPCS
from townhall.core.tasks import cancel, supervise
from townhall.core.tokens import Unverified

log = logging.get(__name__)

# Every method is served as request-streaming (see the module docstring); the kind stays in metrics.
_FACTORIES = {
    "unary": grpc.stream_unary_rpc_method_handler,
    "server_stream": grpc.stream_stream_rpc_method_handler,
    "client_stream": grpc.stream_unary_rpc_method_handler,
    "bidi_stream": grpc.stream_stream_rpc_method_handler,
}
_STALLED = "townhall-request-stalled"
# REASON_KEY of an open stream (health Watch, reflection) that the server ended at its lifetime.
LIFETIME = "lifetime"
Held = tuple[str, str | None]


class Stalled(TownhallError):
    """The request message did not arrive in time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = Reason.REQUEST_STALLED


class Instrumented:
    """Stands in for a grpc.aio.Server while servicers register: wraps each method handler once."""

    def __init__(
        self,
        server: grpc.aio.Server,
        authenticator: Authenticator,
        limits: Limits | None = None,
        request_timeout_s: float = 5.0,
        internal: bool = False,
        bounds: Bounds | None = None,
        open_stream_s: float = 300.0,
    ) -> None:
        self._server = server
        self._auth = authenticator
        # The internal port: calls between Townhall processes only (see the module docstring).
        self._internal = internal
        self._limits = limits or Limits(LimitsConfig(enabled=False))
        self._reads = _FirstReads(request_timeout_s)
        # Every server's calls are bounded: a server built without its own bounds gets the defaults.
        self.bounds = bounds or Bounds(ServerConfig())
        self._open_stream_s = open_stream_s
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def start(self) -> None:
        """Starts ending calls whose request stalls (within the running event loop)."""
        self._reads.start()

    async def close(self) -> None:
        """Stops the stall sweep."""
        await self._reads.close()

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Registers generic handlers; every method handler they give is instrumented (see _Generic)."""
        self._server.add_generic_rpc_handlers(tuple(_Generic(handler, self._wrap) for handler in handlers))

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
            gate = _Gate(self._auth, self._limits, self.bounds, service, method, how, kind, self._internal)
            observer = _Observer(service, method, kind)
            reads = None if kind in ("client_stream", "bidi_stream") else self._reads
            # An open stream (no token) ends at its lifetime, and a request stream when it idles.
            open_stream = _OpenStream(self._open_stream_s, self._reads.timeout_s) if gate.open else None
            wrapped = self._wrapped[path] = _FACTORIES[kind](
                _wrap(behavior, observer, gate, reads, open_stream),
                request_deserializer=_parser(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return wrapped


class _Generic(grpc.GenericRpcHandler):
    """A generic handler whose method handlers come out wrapped (once per method: `wrap` remembers them).

    grpc.aio serves a method registered both ways (the generated code does) from its registered
    handler, so this runs only for methods with no registered handler: unknown ones, and those of a
    handler registered only generically, which are authenticated, limited and counted like the rest.
    """

    def __init__(
        self,
        handler: grpc.GenericRpcHandler,
        wrap: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler],
    ) -> None:
        self._handler = handler
        self._wrap = wrap

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._handler.service(details)
        return None if handler is None else self._wrap(details.method, handler)


def _parser(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The request deserializer, refusing what does not parse with INVALID_ARGUMENT naming the field."""
    if deserializer is None:
        return None
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = descriptor.full_name if descriptor is not None else "request message"

    def refuse(data: bytes) -> InvalidArgument:
        why = decoding.problem(descriptor, data) if descriptor is not None else "it does not parse"
        return InvalidArgument(f"request is not a valid {name}: {why}", None)

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
            raise InvalidArgument(f"request is not a valid {name}: {wrong}", None)
        return message

    return parse_checked


class _FirstReads:
    """Reads the request of a unary-request call; ends calls whose request stalls past the timeout."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._waiting: dict[asyncio.Task[Any], float] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sweeper = supervise(self._sweep(), "stalled-requests")

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
            raise InvalidArgument("no request message: the client ended the call without sending one", None)
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
    """The metric record of one method (core/metrics.py RpcMetrics), resolved once."""

    def __init__(self, service: str, method: str, kind: str) -> None:
        self.method = f"{service}/{method}"
        self._rpc = RPCS.method(service, method, kind)

    def start(self) -> float:
        """Counts a call as started; the time it started."""
        self._rpc.started += 1
        return time.perf_counter()

    def done(self, context: grpc.aio.ServicerContext, start: float, error: BaseException | None) -> None:
        """Counts a call as handled, with its status code and how long it took."""
        self._rpc.handled_with(_code(context, error), time.perf_counter() - start)


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
    """Aborts the RPC with the error's status; an unexpected error becomes INTERNAL, logged.

    The one place a domain error becomes a status: its details (core/errors.py: ErrorInfo, RetryInfo,
    BadRequest in grpc-status-details-bin, and the deprecated trailers) go out in its trailers.
    """
    if isinstance(error, NotImplementedError):  # what a generated base servicer raises
        error = Unimplemented(f"{method} is not implemented by this server")
    elif not isinstance(error, TownhallError):
        log.error("rpc failed", method=method, exc_info=error)
        error = TownhallError(f"internal error in {method}; see server logs")
    await context.abort(error.code, str(error), trailing_metadata=error.trailers)


class _Gate:
    """What runs around one method: rate limits and its authentication rule (core/auth.py), setting the
    call's identity, and the bounds on calls in flight (core/bounds.py).

    On a client port internal methods and service credentials are refused. On the internal port a
    method needs a service credential for this member and method, from a kind of process that may make
    the call (and for a forwarded client call, the user's token too); those calls are neither limited
    nor bounded here: their callers are Townhall processes, and a forwarded call was counted where it
    arrived. Health on either port is bounded like any open method.
    """

    def __init__(
        self,
        auth: Authenticator,
        limits: Limits,
        bounds: Bounds,
        service: str,
        method: str,
        how: str,
        kind: str,
        internal: bool = False,
    ) -> None:
        self.name = f"{service.rpartition('.')[2]}/{method}"
        self.open = how == OPEN and kind != "unary"
        cls = limit_class(service, method, how, kind != "unary")
        self._by_address, self._by_user = limits.for_method(cls)
        self._auth = auth
        self._limits = limits
        self._bounds = bounds
        self._pool = OPEN_STREAM if self.open else NONE if how == OPEN else CLIENT
        if f"{service}/{method}" in SELF_BOUNDED_METHODS:
            self._pool = SELF_BOUNDED
        self._how = how
        check: Callable[[grpc.aio.ServicerContext], Held | None]
        if not internal:
            check = {USER: self._user, SERVICE: self._internal_only, TICKET: self._ticket, OPEN: self._other}[
                how
            ]
        elif how == OPEN:
            check = self._other
        elif not callers(service, method):
            check = self._client_only
        else:
            self._verify = auth.services.for_method(service, method)
            check = self._service
        # check(context): the call's hold on the bounds (release it with `leave`), None if none is held.
        self.check = check

    def leave(self, held: Held) -> None:
        """Releases the call's hold on the bounds."""
        self._bounds.leave(held[0], held[1], self._pool)

    def _user(self, context: grpc.aio.ServicerContext) -> Held | None:
        AUTHENTICATOR.set(self._auth)
        peer = context.peer()
        limits = self._limits
        key = limits.key(peer)
        # Past its failures, an address's tokens are taken only if they cost little to check.
        wait = limits.failing(key) if key is not None else 0.0
        try:
            who = self._auth.principal(context.invocation_metadata(), not wait)
        except Unverified:
            assert key is not None
            limits.refuse_unread(key, wait)
            raise
        except (Unauthenticated, PermissionDenied):
            if key is not None:
                limits.failed(key)
            raise
        PRINCIPAL.set(who)
        if key is not None and self._by_address is not None:
            self._by_address(key)
        if self._by_user is not None:
            self._by_user(who.user_id)
        self._bounds.enter(peer, key, self._pool)
        return peer, key

    def _internal_only(self, context: grpc.aio.ServicerContext) -> Held | None:
        raise PermissionDenied(
            f"{self.name} is internal to Townhall: it is served only on the internal port of Townhall "
            "processes, never on a client port"
        )

    def _ticket(self, context: grpc.aio.ServicerContext) -> Held | None:
        AUTHENTICATOR.set(self._auth)
        PRINCIPAL.set(None)
        for name, _ in context.invocation_metadata() or ():
            if name == SERVICE_KEY:
                refuse_service_credential()
        peer = context.peer()
        key = self._limits.key(peer)
        self._bounds.enter(peer, key, self._pool)
        by_address, by_user = self._by_address, self._by_user

        def charge(user: int) -> None:  # the servicer names the user once it has verified the ticket
            if key is not None and by_address is not None:
                by_address(key)
            if by_user is not None:
                by_user(user)

        CHARGE.set(charge)
        return peer, key

    def _other(self, context: grpc.aio.ServicerContext) -> Held | None:
        AUTHENTICATOR.set(self._auth)
        PRINCIPAL.set(None)
        peer = context.peer()
        key = self._limits.key(peer)
        if key is not None and self._by_address is not None:
            self._by_address(key)
        self._bounds.enter(peer, key, self._pool)
        return peer, key

    def _client_only(self, context: grpc.aio.ServicerContext) -> Held | None:
        raise PermissionDenied(
            f"{self.name} is a client call: it is served on the client port, not on the internal port"
        )

    def _service(self, context: grpc.aio.ServicerContext) -> Held | None:
        auth = self._auth
        AUTHENTICATOR.set(auth)
        metadata = context.invocation_metadata()
        caller = self._verify(metadata)
        SERVICE_CALLER.set(caller)
        # A member of this service passing a call on: a forwarded call (with its user's token), or a
        # part of an import. Anything else on this port is an internal call of another kind.
        FORWARDED.set(caller.kind == auth.kind)
        PRINCIPAL.set(auth.forwarded(metadata) if self._how == USER else None)
        return None  # Townhall processes' calls, bounded by their callers


class _OpenStream:
    """The bounds of a stream anyone may open: a lifetime, and a longest wait for the next request."""

    def __init__(self, lifetime_s: float, idle_s: float) -> None:
        self.lifetime_s = lifetime_s
        self.idle_s = idle_s

    def requests(self, requests: Any, deadline: float) -> AsyncIterator[Any]:
        """The request stream, ended at the deadline; DEADLINE_EXCEEDED if a request is idle_s late."""

        async def paced() -> AsyncIterator[Any]:
            loop = asyncio.get_running_loop()
            iterator = requests.__aiter__()
            while (left := deadline - loop.time()) > 0:
                try:
                    async with asyncio.timeout(min(self.idle_s, left)):
                        item = await iterator.__anext__()
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if loop.time() >= deadline:
                        return
                    raise Stalled(
                        f"no request on this stream within {self.idle_s:g} s; idle streams are ended"
                    ) from None
                yield item

        return paced()


def _wrap(
    behavior: Callable[..., Any],
    observer: _Observer,
    gate: _Gate,
    reads: _FirstReads | None,
    open_stream: _OpenStream | None,
) -> Callable[..., Any]:
    """The handler gRPC calls: `reads` reads the one request of a unary-request method (None: a stream)."""
    check, leave = gate.check, gate.leave
    if inspect.isasyncgenfunction(behavior):

        async def stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = observer.start()
            error: BaseException | None = None
            held: Held | None = None
            try:
                held = check(context)
                request = requests if reads is None else await reads.read(context, start)
                if open_stream is None:
                    async for item in behavior(request, context):
                        yield item
                else:
                    async for item in _until_lifetime(behavior, request, context, open_stream, reads is None):
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
                if held is not None:
                    leave(held)
                observer.done(context, start, error)

        return stream

    async def call(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        start = observer.start()
        error: BaseException | None = None
        held: Held | None = None
        try:
            held = check(context)
            request = requests if reads is None else await reads.read(context, start)
            if open_stream is None:
                return await behavior(request, context)
            deadline = asyncio.get_running_loop().time() + open_stream.lifetime_s
            if reads is None:
                request = open_stream.requests(request, deadline)
            try:
                async with asyncio.timeout_at(deadline):
                    return await behavior(request, context)
            except TimeoutError:
                context.set_trailing_metadata(((REASON_KEY, LIFETIME),))
                return None
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
            if held is not None:
                leave(held)
            observer.done(context, start, error)

    return call


async def _until_lifetime(
    behavior: Callable[..., Any],
    request: Any,
    context: grpc.aio.ServicerContext,
    open_stream: _OpenStream,
    streamed: bool,
) -> AsyncIterator[Any]:
    """An open stream's responses until its lifetime ends (its request stream paced, if it has one)."""
    deadline = asyncio.get_running_loop().time() + open_stream.lifetime_s
    responses = behavior(open_stream.requests(request, deadline) if streamed else request, context)
    try:
        while True:
            try:
                # Only the wait for the next response is timed, never the write of one.
                async with asyncio.timeout_at(deadline):
                    item = await responses.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                context.set_trailing_metadata(((REASON_KEY, LIFETIME),))
                return
            yield item
    finally:
        await responses.aclose()
