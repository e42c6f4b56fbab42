"""A generic gRPC fuzzer for Townhall: every method of every service, from the generated descriptors.

Services and methods come from the townhall.v1 *_pb2 descriptors (plus health and reflection), and
requests from their message descriptors, so a method added later is fuzzed without a change here.
Requests go out as raw bytes (no serializer), so the wire can carry what protobuf-python refuses to
build: invalid UTF-8, truncated or garbage bytes, unknown fields, undefined enum numbers.
What cannot be derived is small and named: the values some field names should often hold (`Seeds`).
"""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import strategies as st

import townhall.internal.v1
import townhall.v1
from townhall.core.auth import rule
from townhall.core.decoding import enum_problem
from townhall.core.errors import reason
from townhall.core.wire import varint

F = FieldDescriptor
OK = grpc.StatusCode.OK
# What any method may answer to any input: the statuses of a server that refuses what it cannot do.
LEGITIMATE = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# Only when the test itself cancelled the call, let a deadline pass or stalled on purpose.
CAUSED = frozenset({grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED})
NEVER = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
# A server stream that is still open (no status yet) when the test cancels it.
OPEN_STREAM = "OPEN"
# A client write raced the server's end of a request stream: grpc.aio reports INTERNAL "Internal error
# from Core" in place of the status the server sent (grpc/grpc#36066, a client-side bug). The server's
# own count of INTERNAL answers is checked separately and stays 0.
WRITE_RACE = "WRITE_RACE"
BAD_UTF8 = (b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"ok\x80", b"\xf4\x90\x80\x80")


@dataclass(frozen=True)
class Method:
    """One RPC as the wire sees it."""

    service: str
    name: str
    descriptor: MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def request(self) -> Descriptor:
        return self.descriptor.input_type

    @property
    def client_streaming(self) -> bool:
        return bool(self.descriptor.client_streaming)

    @property
    def server_streaming(self) -> bool:
        return bool(self.descriptor.server_streaming)

    @property
    def rule(self) -> str:
        return rule(self.service, self.name)

    def __repr__(self) -> str:
        return self.path


def _generated() -> list[Any]:
    """The file descriptors of every generated module: townhall.v1 and townhall.internal.v1."""
    return [
        importlib.import_module(f"{package.__name__}.{module.name}").DESCRIPTOR
        for package in (townhall.v1, townhall.internal.v1)
        for module in pkgutil.iter_modules(package.__path__)
        if module.name.endswith("_pb2")
    ]


def townhall_services() -> list[Any]:
    """Every service descriptor of the townhall.v1 and townhall.internal.v1 generated modules."""
    return [service for found in _generated() for service in found.services_by_name.values()]


def all_methods() -> list[Method]:
    """Every method of every Townhall service, health and reflection."""
    services = [
        *townhall_services(),
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    ]
    return [Method(s.full_name, m.name, m) for s in services for m in s.methods]


def all_message_types() -> list[Descriptor]:
    """Every message type of the generated modules (for "a message of another type")."""
    return [message for found in _generated() for message in found.message_types_by_name.values()]


@dataclass
class Seeds:
    """Values that field names should often hold, so requests reach past the first check."""

    by_name: dict[str, list[Any]] = field(default_factory=dict)

    def for_field(self, f: FieldDescriptor) -> list[Any]:
        values = list(self.by_name.get(f.name, ()))
        if f.type in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64) and f.name.endswith(("_ms", "_us")):
            now_us = time.time_ns() // 1000
            now = now_us if f.name.endswith("_us") else now_us // 1000
            values += [now, now + 3_600_000, now - 3_600_000]
        return values


# ---------------------------------------------------------------- strategies from descriptors

_INT_BOUNDS = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    """Boundary values first, then anything in range."""
    edges = sorted(
        {v for v in (low, high, 0, 1, -1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**63) if low <= v <= high}
    )
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def scalar(f: FieldDescriptor, seeds: Seeds, huge: bool = False) -> st.SearchStrategy[Any]:
    """Values for one field of a scalar (or enum) type."""
    if f.type in _INT_BOUNDS:
        base: st.SearchStrategy[Any] = integers(*_INT_BOUNDS[f.type])
    elif f.type == F.TYPE_BOOL:
        base = st.booleans()
    elif f.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        base = st.floats(width=32 if f.type == F.TYPE_FLOAT else 64)
    elif f.type == F.TYPE_ENUM:
        defined = [v.number for v in f.enum_type.values]
        undefined = [max(defined) + 1, -1, 2**31 - 1, -(2**31)]
        base = st.one_of(st.sampled_from(defined), st.sampled_from(undefined))
    elif f.type == F.TYPE_STRING:
        long = st.text(min_size=200, max_size=20_000) if huge else st.text(min_size=30, max_size=300)
        base = st.one_of(st.text(max_size=40), st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True), long)
    elif f.type == F.TYPE_BYTES:
        base = st.binary(max_size=40_000 if huge else 2_000)
    else:
        raise AssertionError(f"no strategy for field type {f.type} ({f.full_name})")
    known = seeds.for_field(f)
    return st.one_of(st.sampled_from(known), base) if known else base


def messages(
    descriptor: Descriptor, seeds: Seeds, huge: bool = False, depth: int = 0
) -> st.SearchStrategy[Message]:
    """Messages of `descriptor`'s type: any subset of fields set, repeated fields up to thousands long."""
    cls = message_factory.GetMessageClass(descriptor)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        for f in descriptor.fields:
            if not draw(st.booleans()):
                continue
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
                target = getattr(message, f.name)
                for _ in range(draw(st.integers(0, 3))):
                    key = draw(scalar(key_f, seeds))
                    if value_f.message_type is not None:
                        if depth < 3:
                            target[key].CopyFrom(
                                draw(messages(value_f.message_type, seeds, False, depth + 1))
                            )
                    else:
                        target[key] = draw(scalar(value_f, seeds))
            elif f.is_repeated:
                most = 8 if depth or not huge else 9_000
                if f.message_type is not None:
                    if depth < 3:
                        items = draw(
                            st.lists(
                                messages(f.message_type, seeds, False, depth + 1), max_size=min(most, 200)
                            )
                        )
                        getattr(message, f.name).extend(items)
                else:
                    getattr(message, f.name).extend(draw(st.lists(scalar(f, seeds), max_size=most)))
            elif f.message_type is not None:
                if depth < 3:
                    getattr(message, f.name).CopyFrom(draw(messages(f.message_type, seeds, huge, depth + 1)))
            else:
                setattr(message, f.name, draw(scalar(f, seeds, huge)))
        return message

    return build()


# ---------------------------------------------------------------- the wire, by hand


def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def length_delimited(number: int, body: bytes) -> bytes:
    return tag(number, 2) + varint(len(body)) + body


def string_paths(descriptor: Descriptor, depth: int = 0) -> list[tuple[FieldDescriptor, ...]]:
    """Paths (through message fields) to every string field, a few levels deep."""
    paths: list[tuple[FieldDescriptor, ...]] = []
    for f in descriptor.fields:
        if f.type == F.TYPE_STRING:
            paths.append((f,))
        elif f.message_type is not None and depth < 2 and not f.message_type.GetOptions().map_entry:
            paths += [(f, *rest) for rest in string_paths(f.message_type, depth + 1)]
    return paths


def with_bad_utf8(valid: bytes, path: Sequence[FieldDescriptor], bad: bytes) -> bytes:
    """`valid` with the string field at `path` set to bytes that are not UTF-8 (appended: the last wins)."""
    body = length_delimited(path[-1].number, bad)
    for parent in reversed(path[:-1]):
        body = length_delimited(parent.number, body)
    return valid + body


@st.composite
def unknown_fields(draw: st.DrawFn, descriptor: Descriptor) -> bytes:
    """Well-formed fields with numbers the message does not define, of every wire type (groups too)."""
    known = set(descriptor.fields_by_number)
    out = b""
    for _ in range(draw(st.integers(1, 5))):
        number = draw(st.integers(1, 2**29 - 1).filter(lambda n: n not in known and not 19000 <= n <= 19999))
        wire = draw(st.sampled_from((0, 1, 2, 3, 5)))
        if wire == 0:
            out += tag(number, 0) + varint(draw(st.integers(0, 2**64 - 1)))
        elif wire == 1:
            out += tag(number, 1) + draw(st.binary(min_size=8, max_size=8))
        elif wire == 5:
            out += tag(number, 5) + draw(st.binary(min_size=4, max_size=4))
        elif wire == 2:
            out += length_delimited(number, draw(st.binary(max_size=300)))
        else:
            out += (
                tag(number, 3)
                + tag(number + 1 if number + 1 not in known else 1, 0)
                + b"\x01"
                + tag(number, 4)
            )
    return out


def padded(valid: bytes, size: int, descriptor: Descriptor) -> bytes:
    """`valid` grown past `size` bytes with an unknown length-delimited field."""
    number = max(descriptor.fields_by_number, default=0) + 100
    return valid + length_delimited(number, b"\0" * max(0, size - len(valid)))


# ---------------------------------------------------------------- calls and what they answered


@dataclass
class Outcome:
    """What one call came back with."""

    code: grpc.StatusCode | str
    details: str
    # The ErrorInfo reason the server sent (core/errors.py); None where the call's trailers were not read.
    reason: str | None = None

    @property
    def name(self) -> str:
        return self.code if isinstance(self.code, str) else self.code.name


@dataclass
class Tally:
    """Calls made per hostile-input class, and the statuses they got (for docs/hostile-input.md)."""

    calls: Counter[str] = field(default_factory=Counter)
    statuses: dict[str, Counter[str]] = field(default_factory=dict)
    methods: dict[str, set[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, cls: str, method: Method, outcome: Outcome) -> None:
        with self.lock:
            self.calls[cls] += 1
            self.statuses.setdefault(cls, Counter())[outcome.name] += 1
            self.methods.setdefault(cls, set()).add(method.path)


def call(
    channel: grpc.Channel,
    method: Method,
    messages: Sequence[bytes],
    metadata: Sequence[tuple[str, str]],
    *,
    timeout_s: float = 10.0,
    open_wait_s: float = 0.3,
    stop_after: int | None = None,
    cancel: bool = False,
    as_stream: bool | None = None,
) -> Outcome:
    """Sends raw request bytes on `method`'s path and reports the status.

    A unary-request method gets messages[0], unless `as_stream` sends the list as a stream (0 or 2
    messages on a unary method). With `stop_after`, the stream stops sending after that many
    messages without half-closing; with `cancel` the test then cancels the call. A server stream
    still open after `open_wait_s` is cancelled: OPEN_STREAM.
    """
    streaming_request = method.client_streaming if as_stream is None else as_stream
    md = tuple(metadata)
    if not streaming_request:
        request = messages[0]
        if method.server_streaming:
            responses = channel.unary_stream(method.path)(request, metadata=md, timeout=timeout_s)
            return _server_stream(responses, open_wait_s)
        try:
            channel.unary_unary(method.path)(request, metadata=md, timeout=timeout_s)
        except grpc.RpcError as exc:
            return _ended(exc)
        return Outcome(OK, "")
    stop = threading.Event()

    def requests() -> Iterator[bytes]:
        for index, message in enumerate(messages):
            if stop_after is not None and index >= stop_after:
                break
            yield message
        if stop_after is not None:
            stop.wait(timeout_s)  # no half-close until the call ends

    try:
        if method.server_streaming:
            responses = channel.stream_stream(method.path)(requests(), metadata=md, timeout=timeout_s)
            return _server_stream(responses, 0.2 if cancel else open_wait_s)
        future = channel.stream_unary(method.path).future(requests(), metadata=md, timeout=timeout_s)
        if cancel:
            try:
                future.result(timeout=0.2)
            except grpc.FutureTimeoutError:
                future.cancel()
            except grpc.RpcError:
                pass
        try:
            future.result()
        except grpc.FutureCancelledError:
            return Outcome(grpc.StatusCode.CANCELLED, "cancelled by the test")
        except grpc.RpcError as exc:
            return _ended(exc)
        return Outcome(OK, "")
    finally:
        stop.set()


def _server_stream(responses: Any, open_wait_s: float) -> Outcome:
    """Reads a response stream (gRPC delivers the status only after every message is read)."""

    def drain() -> None:
        try:
            for _ in responses:
                pass
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=drain, name="fuzz-stream-reader", daemon=True)
    reader.start()
    reader.join(open_wait_s)
    if reader.is_alive():
        responses.cancel()
        reader.join(5)
        return Outcome(OPEN_STREAM, "open until the test cancelled it")
    return _ended(responses)


def _ended(call: Any) -> Outcome:
    """The outcome of a call that has ended (a sync RpcError, or a response stream read to its end)."""
    return Outcome(call.code(), call.details() or "", reason(call) if call.code() != OK else None)


async def hold(
    target: str,
    method: Method,
    messages: Sequence[bytes],
    metadata: Sequence[Sequence[tuple[str, str]]],
    *,
    connections: int,
    wait_s: float,
    while_held: Callable[[], None] | None = None,
) -> list[Outcome]:
    """Opens one call of `method` per entry of `metadata`, spread over `connections` connections of
    their own, and never ends them: request streams send `messages` and never half-close, responses
    are read as they come. After `wait_s` (or once every call has ended) runs `while_held`, then
    cancels what is still open: OPEN_STREAM. Calls are opened in waves of 25 (a burst of hundreds at
    once would be shed by gRPC's queue of calls not yet taken, which says nothing of the server)."""
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 1 << 22)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(connections)]

    async def one(channel: grpc.aio.Channel, md: Sequence[tuple[str, str]]) -> Outcome:
        md = tuple(md)
        call: Any
        try:
            if method.client_streaming:
                # The write API, not a request iterator: with an iterator still waiting when the server
                # ends the call, grpc.aio reports "Internal error from Core" instead of the server's status.
                factory = channel.stream_stream if method.server_streaming else channel.stream_unary
                call = factory(method.path)(metadata=md)
                for message in messages:
                    await call.write(message)
            else:
                factory = channel.unary_stream if method.server_streaming else channel.unary_unary
                call = factory(method.path)(messages[0], metadata=md)
            if method.server_streaming:
                while await call.read() is not grpc.aio.EOF:
                    pass
                code = await call.code()
                if code != OK:
                    return Outcome(code, await call.details() or "")
            else:
                await call
        except grpc.aio.AioRpcError as exc:
            if method.client_streaming and messages and exc.details() == "Internal error from Core":
                return Outcome(WRITE_RACE, "the client wrote as the server ended the call (grpc#36066)")
            return Outcome(exc.code(), exc.details() or "")
        except asyncio.InvalidStateError:  # a write after the server ended the call: its status
            return Outcome(await call.code(), await call.details() or "")
        except asyncio.CancelledError:
            call.cancel()
            return Outcome(OPEN_STREAM, "open until the test cancelled it")
        return Outcome(OK, "")

    tasks = []
    try:
        for index, md in enumerate(metadata):
            tasks.append(asyncio.create_task(one(channels[index % connections], md)))
            if index % 25 == 24:
                await asyncio.sleep(0.05)
        await asyncio.wait(tasks, timeout=wait_s)
        if while_held is not None:
            while_held()
    finally:
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks)
        for channel in channels:
            await channel.close()
    return outcomes


def expect_enum_refusal(message: Message) -> bool:
    """Whether the message holds an enum number its enum does not define (the server must refuse it)."""
    return bool(enum_problem(message))


# Statuses gRPC itself gives, before or after Townhall's code runs: no ErrorInfo there.
_GRPC_CORE = (
    "SERVER: Received message larger than max",
    "received metadata size exceeds",
    "Deadline Exceeded",
    "Cancelled",
    "Socket closed",
)


def check(
    outcome: Outcome,
    method: Method,
    allowed: frozenset[grpc.StatusCode],
    what: str,
    expected: Callable[[Outcome], bool] | None = None,
) -> None:
    """Fails with the method, input class and answer unless the outcome is one the method may give."""
    context = f"{method.path} [{what}] answered {outcome.name}: {outcome.details!r}"
    assert outcome.code not in NEVER, context
    if outcome.code == OPEN_STREAM:
        assert method.server_streaming, context
    else:
        assert outcome.code in allowed, context
        if outcome.code != OK:
            assert outcome.details.strip(), f"{context} (a refusal must say why)"
        if outcome.reason == "" and not outcome.details.startswith(_GRPC_CORE):
            raise AssertionError(f"{context} (a refusal carries an ErrorInfo reason: core/errors.py)")
    if expected is not None:
        assert expected(outcome), f"{context}: not what this input must get"
