"""Hostile input against real servers: admission, relay and notifier in-process on loopback, real Kafka.

Every method of every service (tests/integration/hostile.py enumerates them from the descriptors) gets
hypothesis-generated requests of each hostile class, with valid credentials and with missing or
forged ones. For every call: no UNKNOWN or INTERNAL, a status the method may legitimately give (with
a message and an ErrorInfo reason), the exact status where the input decides it, and every server
SERVING afterwards.
`make fuzz` runs the same with more examples (FUZZ_EXAMPLES) and writes the counts for
docs/hostile-input.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from tests.integration import hostile
from tests.integration.helpers import TOKENS, config_for, serving
from tests.integration.hostile import BAD_UTF8, CAUSED, LEGITIMATE, Method, Outcome, Seeds, Tally
from townhall.admission.app import AdmissionApp
from townhall.core.auth import GRANTS, OPEN, SERVICE, TICKET, USER, Authenticator, bearer, mint
from townhall.core.bounds import SELF_BOUNDED_METHODS
from townhall.core.config import DEV_USER_KEY, Config, KafkaConfig
from townhall.core.credentials import callers
from townhall.core.server import App
from townhall.core.tickets import TICKET_KEY, TicketSigner
from townhall.core.tokens import SigningKey
from townhall.notifier.app import NotifierApp
from townhall.relay.app import RelayApp
from townhall.v1 import rooms_pb2, rooms_pb2_grpc
from townhall.v1.common_pb2 import Role

pytestmark = [
    pytest.mark.kafka,
    # The servers' thread uses `random` while hypothesis draws in this one: not the strategies' doing.
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning"),
]

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
# Classes whose calls wait on purpose (stalls, cancels) run fewer examples.
SLOW_EXAMPLES = max(3, EXAMPLES // 4)
REPORT = Path(os.environ.get("FUZZ_REPORT", ".townhall/fuzz/summary.json"))
RELAY = "fuzz-relay:7000"
MAX_MESSAGE = 64 * 1024
REQUEST_TIMEOUT_S = 1.0
# Small bounds on calls in flight, so the flood classes reach them with few calls (core/bounds.py).
BOUNDS = {
    "max_calls_per_connection": 32,
    "max_calls_per_address": 64,
    "max_open_streams": 16,
    "max_open_streams_per_address": 4,
    "open_stream_max_s": 2.0,
}
AUTH_REFUSALS = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
SLOW = settings(FUZZ, max_examples=SLOW_EXAMPLES)
METHODS = hostile.all_methods()
# What cannot be derived from the descriptors: methods a server does not implement at all.
UNIMPLEMENTED: set[str] = set()
TALLY = Tally()
# The status each class must get where its input decides it (docs/hostile-input.md's table).
EXACT = {
    "invalid UTF-8": "INVALID_ARGUMENT naming the field",
    "oversize messages": "RESOURCE_EXHAUSTED",
    "oversize metadata": "RESOURCE_EXHAUSTED",
    "unary call with 0 messages": "INVALID_ARGUMENT (no request message)",
    "stalled request": "DEADLINE_EXCEEDED (server's request timeout)",
    "bad credentials": "UNAUTHENTICATED or PERMISSION_DENIED",
    "out-of-range enum": "INVALID_ARGUMENT naming the field",
    "many streams at once": "open within the bounds, the rest RESOURCE_EXHAUSTED; users served meanwhile",
    "streams that never end": "open ones (health Watch, reflection) ended by the server",
}
Md = tuple[tuple[str, str], ...]


@dataclasses.dataclass(repr=False)
class Fuzzed:
    """The three servers, a channel to each, and what valid credentials and seeds look like."""

    config: Config
    channels: dict[str, grpc.Channel]
    health: list[grpc.Channel]
    # Each service's server as dialled from ::1: an address not exempt from the per-address bounds.
    flood: dict[str, str]
    seeds: Seeds
    live_room: str
    signer: TicketSigner
    # Each service's internal port (its internal methods are served there only) and member address.
    internal: dict[str, tuple[grpc.Channel, str]]

    def channel(self, method: Method) -> grpc.Channel:
        if method.rule == SERVICE:
            return self.internal[method.service][0]
        return self.channels[method.service]

    def service_credential(self, method: Method) -> Md:
        """A credential for `method` on its server, from a kind of process that may call it."""
        kind = sorted(callers(method.service, method.name))[0]
        credential = Authenticator(self.config.auth, kind, "127.0.0.1:1").credential
        return credential.metadata(self.internal[method.service][1], method.path)

    def flood_target(self, method: Method) -> str:
        """Where a flood of `method` goes: the internal port for internal methods, else ::1."""
        if method.rule == SERVICE:
            return self.internal[method.service][1]
        return self.flood[method.service]

    def __repr__(self) -> str:
        return f"Fuzzed(live_room={self.live_room!r})"


def _serve_in_thread(config: Config) -> Iterator[dict[str, str]]:
    """Runs the three apps in an event loop of their own thread; yields service name -> address."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzzed-servers", daemon=True)
    thread.start()
    started: concurrent.futures.Future[dict[str, str]] = concurrent.futures.Future()
    stop = asyncio.Event()

    async def main() -> None:
        apps: list[App] = [AdmissionApp(config), RelayApp(config), NotifierApp(config)]
        try:
            # On [::]: the fuzz calls come from 127.0.0.1 (exempt), the flood classes' from ::1.
            async with (
                serving(apps[0], config, "[::]") as admission,
                serving(apps[1], config, "[::]") as relay,
                serving(apps[2], config, "[::]") as notifier,
            ):
                addresses = {}
                for app, address in zip(apps, (admission, relay, notifier), strict=True):
                    for name in app.service_names:
                        addresses[name] = address
                        addresses[f"internal:{name}"] = getattr(config, app.auth.kind).internal_listen
                for name in ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"):
                    addresses[name] = admission
                addresses["*"] = ",".join((admission, relay, notifier))
                started.set_result(addresses)
                await stop.wait()
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            raise

    done = asyncio.run_coroutine_threadsafe(main(), loop)
    try:
        yield started.result(timeout=120)
    finally:
        loop.call_soon_threadsafe(stop.set)
        done.result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture(scope="module")
def fuzzed(kafka: KafkaConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    config = config_for(
        kafka,
        # Every fuzz call comes from 127.0.0.1: per-address limits would refuse most of them unread
        # (they have their own test). Per-user limits stay on; fuzz users are many.
        # The flood classes call from ::1, which is not exempt.
        limits={"exempt": ("127.0.0.0/8",)},
        server={"request_timeout_s": REQUEST_TIMEOUT_S, **BOUNDS},
        relay={"advertise": RELAY, "load_report_s": 0},
        notifier={
            "data_dir": str(tmp_path_factory.mktemp("fuzz") / "notifier"),
            "group_id": f"fuzz-{uuid.uuid4().hex[:8]}",
        },
    )
    for addresses in _serve_in_thread(config):
        options = [("grpc.max_receive_message_length", 8 * MAX_MESSAGE)]
        v4 = {a: "127.0.0.1:" + a.rpartition(":")[2] for a in addresses["*"].split(",")}
        by_address = {a: grpc.insecure_channel(v4[a], options=options) for a in v4}
        clients = {
            name: a for name, a in addresses.items() if name != "*" and not name.startswith("internal:")
        }
        channels = {name: by_address[a] for name, a in clients.items()}
        flood = {name: "[::1]:" + a.rpartition(":")[2] for name, a in clients.items()}
        internal = {
            name.partition(":")[2]: (grpc.insecure_channel(a, options=options), a)
            for name, a in addresses.items()
            if name.startswith("internal:")
        }
        host = 9_000_001
        rooms = rooms_pb2_grpc.RoomsStub(channels["townhall.v1.Rooms"])
        md = TOKENS.metadata(host)
        live = rooms.CreateRoom(
            rooms_pb2.CreateRoomRequest(title="Fuzzed live room"), metadata=md, timeout=15
        )
        rooms.StartRoom(rooms_pb2.StartRoomRequest(room_id=live.room_id), metadata=md, timeout=15)
        created = rooms.CreateRoom(rooms_pb2.CreateRoomRequest(title="Fuzzed room"), metadata=md, timeout=15)
        ended = rooms.CreateRoom(rooms_pb2.CreateRoomRequest(title="Fuzzed ended"), metadata=md, timeout=15)
        rooms.EndRoom(rooms_pb2.EndRoomRequest(room_id=ended.room_id), metadata=md, timeout=15)
        seeds = Seeds(
            {
                "room_id": [live.room_id, created.room_id, ended.room_id, "no-such-room"],
                "followee_id": [host, 1, 2**63 - 1],
                "user_id": [host, 1, 2**63 - 1],
                "host_id": [host, 2**63 - 1],
                "payload": [b"\xfc" * 40, b"\xfd" * 1500, b"\xfe" * 1501],
            }
        )
        signer = TicketSigner.from_config(config.tickets)
        yield Fuzzed(
            config,
            channels,
            list(by_address.values()),
            flood,
            seeds,
            live.room_id,
            signer,
            internal,
        )
        for channel in [*by_address.values(), *(c for c, _ in internal.values())]:
            channel.close()
        _write_report()


def _write_report() -> None:
    """The counts of this run, for docs/hostile-input.md (FUZZ_REPORT)."""
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "examples": EXAMPLES,
        "classes": {
            cls: {
                "calls": TALLY.calls[cls],
                "methods": len(TALLY.methods.get(cls, ())),
                "statuses": dict(sorted(TALLY.statuses.get(cls, {}).items())),
            }
            for cls in sorted(TALLY.calls)
        },
        "total_calls": sum(TALLY.calls.values()),
    }
    REPORT.write_text(json.dumps(summary, indent=2) + "\n")
    rows = [
        "| hostile input | calls | methods | statuses seen | exact | crashes, UNKNOWN/INTERNAL |",
        "|---|---|---|---|---|---|",
    ]
    for cls, row in summary["classes"].items():
        seen = ", ".join(f"{code} {n}" for code, n in row["statuses"].items())
        exact = next((v for k, v in EXACT.items() if cls.startswith(k)), "any legitimate")
        rows.append(f"| {cls} | {row['calls']} | {row['methods']} | {seen} | {exact} | 0 |")
    rows.append(f"| **all** | **{summary['total_calls']}** | {len(METHODS)} | | | **0** |")
    REPORT.with_suffix(".md").write_text("\n".join(rows) + "\n")


def _bad_statuses() -> float:
    """UNKNOWN and INTERNAL answers the servers counted (their own view, cancelled calls included)."""
    (handled,) = (metric for metric in REGISTRY.collect() if metric.name == "grpc_server_handled")
    return sum(s.value for s in handled.samples if s.labels["grpc_code"] in ("Unknown", "Internal"))


@pytest.fixture(autouse=True)
def _servers_stay_well(fuzzed: Fuzzed) -> Iterator[None]:
    before = _bad_statuses()
    yield
    _assert_serving(fuzzed)
    assert _bad_statuses() == before, "a server answered UNKNOWN or INTERNAL (see its log: 'rpc failed')"


def _assert_serving(fuzzed: Fuzzed) -> None:
    for channel in fuzzed.health:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ---------------------------------------------------------------- credentials


def valid_credentials(fuzzed: Fuzzed, method: Method) -> st.SearchStrategy[Md]:
    """What a legitimate caller of `method` sends (a random user: per-user limits do not trip)."""
    how = method.rule
    if how == USER:
        return st.integers(10**9, 10**15).map(lambda user: bearer(TOKENS.mint(user, GRANTS)))
    if how == SERVICE:
        return st.just(fuzzed.service_credential(method))
    if how == TICKET:
        roles = st.sampled_from([Role.ROLE_HOST, Role.ROLE_SPEAKER, Role.ROLE_LISTENER])

        def ticket(role: int, user: int) -> Md:
            issued = fuzzed.signer.issue(fuzzed.live_room, user, role, RELAY)
            return ((TICKET_KEY, fuzzed.signer.sign(issued)),)

        return st.builds(ticket, roles, st.integers(10**9, 10**15))
    assert how == OPEN, how
    return st.just(())


FORGED = SigningKey("dev", "not-the-key-anyone-configured-0123456789")


def bad_credentials(fuzzed: Fuzzed, method: Method) -> st.SearchStrategy[tuple[str, Md]]:
    """Missing, forged, expired, garbled or the wrong kind of credential, labelled."""
    user_token = bearer(TOKENS.mint(5, GRANTS))
    forged_ticket = fuzzed.signer.issue(fuzzed.live_room, 5, Role.ROLE_HOST, RELAY)
    options: list[tuple[str, Md]] = [
        ("missing", ()),
        ("forged user token", bearer(mint(FORGED, 5, GRANTS))),
        ("expired user token", bearer(mint(SigningKey(*DEV_USER_KEY.split("=", 1)), 5, GRANTS, ttl_s=-600))),
        ("garbled authorization", (("authorization", "Bearer not.a.jwt!"),)),
        ("not a bearer", (("authorization", "Basic dXNlcjpwYXNz"),)),
        ("forged service credential", (("townhall-service", mint(FORGED, 1, ())),)),
        (
            "forged ticket",
            (
                (
                    TICKET_KEY,
                    FORGED.sign(
                        f'{{"sub":"5","room":"{forged_ticket.room_id}","role":1,"aud":"{RELAY}","exp":{int(time.time()) + 600}}}'
                    ),
                ),
            ),
        ),
        (
            "ticket for another relay",
            ((TICKET_KEY, fuzzed.signer.sign(fuzzed.signer.issue(fuzzed.live_room, 5, 1, "elsewhere:1"))),),
        ),
        # Past the token and ticket limits (4096 and 1024 bytes), within gRPC's 8 KiB of metadata.
        ("huge token", (("authorization", "Bearer " + "a" * 4500), (TICKET_KEY, "b" * 1100))),
    ]
    if method.rule == SERVICE:
        options.append(("user token only", user_token))
    return st.sampled_from(options)


# ---------------------------------------------------------------- the properties


def _draw_call(
    data: st.DataObject, fuzzed: Fuzzed, methods: list[Method] | None = None
) -> tuple[Method, Md, bool]:
    """A method and credentials: valid nine times in ten (so the payload is looked at)."""
    method = data.draw(st.sampled_from(methods or METHODS), label="method")
    # sampled_from, not integers(0, 9) == 0: hypothesis draws an integer range's ends far more often.
    if method.rule != OPEN and data.draw(st.sampled_from(range(10)), label="credentials") == 7:
        _, md = data.draw(bad_credentials(fuzzed, method), label="bad credentials")
        return method, md, False
    return method, data.draw(valid_credentials(fuzzed, method), label="credentials"), True


def _run(
    cls: str,
    fuzzed: Fuzzed,
    method: Method,
    messages: list[bytes],
    md: Md,
    allowed: frozenset[grpc.StatusCode] = LEGITIMATE,
    expected: Callable[[Outcome], bool] | None = None,
    **options: Any,
) -> Outcome:
    if method.path in UNIMPLEMENTED:
        allowed = allowed | {grpc.StatusCode.UNIMPLEMENTED}
    outcome = hostile.call(fuzzed.channel(method), method, messages, md, **options)
    if os.environ.get("FUZZ_TRACE"):  # every call, for a look at what the servers answer
        print("TRACE", cls, method.path, outcome.name, outcome.reason or "-", outcome.details[:120])
    TALLY.add(cls, method, outcome)
    hostile.check(outcome, method, allowed, cls, expected)
    return outcome


def _message(data: st.DataObject, fuzzed: Fuzzed, method: Method, huge: bool = False) -> Any:
    return data.draw(hostile.messages(method.request, fuzzed.seeds, huge), label="request")


def _refused_for(valid: bool, reason: Callable[[Outcome], bool]) -> Callable[[Outcome], bool]:
    """The input's own refusal, or (with bad credentials, or a valid ticket of a role that may not
    make the call) an authentication refusal, or a per-user rate limit."""

    def ok(outcome: Outcome) -> bool:
        if outcome.code in AUTH_REFUSALS or (
            outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "too many" in outcome.details
        ):
            return True
        return reason(outcome)

    return ok


def test_every_defined_service_is_served_and_fuzzed(fuzzed: Fuzzed) -> None:
    served = set(fuzzed.channels)
    defined = {m.service for m in METHODS}
    assert defined <= served, (
        f"services no test server serves (add their App to the fuzz fixture): {defined - served}"
    )
    assert len(METHODS) >= 20
    assert ENUM_METHODS, "no request holds an enum field: the enum property would fuzz nothing"


@FUZZ
@given(data=st.data())
def test_random_field_values(fuzzed: Fuzzed, data: st.DataObject) -> None:
    """Any field values (boundary ints, long and odd strings, any enum number) of the right type."""
    method, md, valid = _draw_call(data, fuzzed)
    message = _message(data, fuzzed, method)
    enum_refusal = hostile.expect_enum_refusal(message)
    outcome = _run("random field values", fuzzed, method, [message.SerializeToString()], md)
    if enum_refusal and valid:
        assert _refused_for(valid, lambda o: o.code == grpc.StatusCode.INVALID_ARGUMENT)(outcome), outcome
        TALLY.add("out-of-range enum numbers", method, outcome)


# Requests with an enum field of their own (few do, so random values above seldom reach one).
ENUM_METHODS = [m for m in METHODS if any(f.enum_type and not f.is_repeated for f in m.request.fields)]


@FUZZ
@given(data=st.data())
def test_out_of_range_enum_numbers_are_refused_naming_the_field(fuzzed: Fuzzed, data: st.DataObject) -> None:
    method, md, valid = _draw_call(data, fuzzed, ENUM_METHODS)
    message = _message(data, fuzzed, method)
    enums = [f for f in method.request.fields if f.enum_type and not f.is_repeated]
    field = data.draw(st.sampled_from(enums), label="enum field")
    assert field.enum_type is not None
    defined = field.enum_type.values_by_number
    undefined = [n for n in (max(defined) + 1, -1, 2**31 - 1, -(2**31)) if n not in defined]
    setattr(message, field.name, data.draw(st.sampled_from(undefined), label="number"))
    named = _refused_for(
        valid, lambda o: o.code == grpc.StatusCode.INVALID_ARGUMENT and field.name in o.details
    )
    _run("out-of-range enum numbers", fuzzed, method, [message.SerializeToString()], md, expected=named)


@FUZZ
@given(data=st.data())
def test_huge_repeated_fields_and_long_strings(fuzzed: Fuzzed, data: st.DataObject) -> None:
    method, md, _ = _draw_call(data, fuzzed)
    message = _message(data, fuzzed, method, huge=True)
    _run("huge repeated fields, long strings", fuzzed, method, [message.SerializeToString()], md)


@FUZZ
@given(data=st.data())
def test_invalid_utf8_in_a_string_field(fuzzed: Fuzzed, data: st.DataObject) -> None:
    """A valid message with one string field's bytes replaced by bytes that are not UTF-8."""
    with_strings = [m for m in METHODS if hostile.string_paths(m.request)]
    method, md, valid = _draw_call(data, fuzzed, with_strings)
    path = data.draw(st.sampled_from(hostile.string_paths(method.request)), label="field")
    bad = data.draw(st.sampled_from(BAD_UTF8), label="bytes")
    raw = hostile.with_bad_utf8(_message(data, fuzzed, method).SerializeToString(), path, bad)
    name = ".".join(f.name for f in path)

    def names_the_field(outcome: Outcome) -> bool:
        return (
            outcome.code == grpc.StatusCode.INVALID_ARGUMENT
            and f"{name} is not valid UTF-8" in outcome.details
        )

    _run(
        "invalid UTF-8 in a string field",
        fuzzed,
        method,
        [raw],
        md,
        expected=_refused_for(valid, names_the_field),
    )


@FUZZ
@given(data=st.data())
def test_unknown_fields(fuzzed: Fuzzed, data: st.DataObject) -> None:
    method, md, _ = _draw_call(data, fuzzed)
    raw = _message(data, fuzzed, method).SerializeToString() + data.draw(
        hostile.unknown_fields(method.request)
    )
    _run("unknown fields", fuzzed, method, [raw], md)


@FUZZ
@given(data=st.data())
def test_truncated_and_garbage_bytes(fuzzed: Fuzzed, data: st.DataObject) -> None:
    method, md, _ = _draw_call(data, fuzzed)
    if data.draw(st.booleans(), label="truncate"):
        whole = _message(data, fuzzed, method).SerializeToString() + data.draw(
            hostile.unknown_fields(method.request)
        )
        raw = whole[: data.draw(st.integers(0, max(0, len(whole) - 1)), label="cut at")]
        _run("truncated messages", fuzzed, method, [raw], md)
    else:
        raw = data.draw(st.binary(min_size=1, max_size=3000), label="garbage")
        _run("garbage bytes", fuzzed, method, [raw], md)


@FUZZ
@given(data=st.data())
def test_a_message_of_another_type(fuzzed: Fuzzed, data: st.DataObject) -> None:
    method, md, _ = _draw_call(data, fuzzed)
    other = data.draw(st.sampled_from(hostile.all_message_types()), label="type")
    raw = data.draw(hostile.messages(other, fuzzed.seeds)).SerializeToString()
    _run("a message of another type", fuzzed, method, [raw], md)


@FUZZ
@given(data=st.data())
def test_oversize_messages_are_refused_by_grpc(fuzzed: Fuzzed, data: st.DataObject) -> None:
    """Past server.max_message_bytes: RESOURCE_EXHAUSTED from gRPC itself, before any parsing."""
    method, md, valid = _draw_call(data, fuzzed)
    size = MAX_MESSAGE + data.draw(st.integers(1, 200_000), label="excess")
    raw = hostile.padded(_message(data, fuzzed, method).SerializeToString(), size, method.request)
    messages = [raw]
    if method.client_streaming and data.draw(st.booleans(), label="mid-stream"):
        messages = [_message(data, fuzzed, method).SerializeToString(), raw]

    def exhausted(outcome: Outcome) -> bool:
        if outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return True
        # A stream's earlier message may be refused on its own merits first.
        return len(messages) > 1 and outcome.code == grpc.StatusCode.INVALID_ARGUMENT

    _run(
        "oversize messages",
        fuzzed,
        method,
        messages,
        md,
        expected=_refused_for(valid, exhausted),
        open_wait_s=5,
    )


@FUZZ
@given(data=st.data())
def test_credentials_missing_forged_or_of_the_wrong_kind(fuzzed: Fuzzed, data: st.DataObject) -> None:
    guarded = [m for m in METHODS if m.rule != OPEN]
    method = data.draw(st.sampled_from(guarded), label="method")
    label, md = data.draw(bad_credentials(fuzzed, method), label="credentials")
    raw = _message(data, fuzzed, method).SerializeToString()
    # A ticket method parses its request before the servicer checks the ticket.
    allowed = AUTH_REFUSALS | ({grpc.StatusCode.INVALID_ARGUMENT} if method.rule == TICKET else set())
    _run(f"bad credentials: {label}", fuzzed, method, [raw], md, allowed=frozenset(allowed))


@FUZZ
@given(data=st.data())
def test_unary_requests_with_no_message_or_two(fuzzed: Fuzzed, data: st.DataObject) -> None:
    """The wire allows any number of messages on any call; a unary request must be exactly one."""
    unary_request = [m for m in METHODS if not m.client_streaming]
    method, md, valid = _draw_call(data, fuzzed, unary_request)
    count = data.draw(st.sampled_from([0, 2]), label="messages")
    messages = [_message(data, fuzzed, method).SerializeToString() for _ in range(count)]

    def none_sent(outcome: Outcome) -> bool:
        return outcome.code == grpc.StatusCode.INVALID_ARGUMENT and "no request message" in outcome.details

    expected = _refused_for(valid, none_sent) if count == 0 else None
    _run(
        f"unary call with {count} messages",
        fuzzed,
        method,
        messages,
        md,
        expected=expected,
        as_stream=True,
        open_wait_s=5,
    )


@SLOW
@given(data=st.data())
def test_a_stalled_request_is_ended_by_the_server(fuzzed: Fuzzed, data: st.DataObject) -> None:
    """A client that opens a unary call and never sends its message nor half-closes."""
    unary_request = [m for m in METHODS if not m.client_streaming]
    method, md, valid = _draw_call(data, fuzzed, unary_request)

    def timed_out(outcome: Outcome) -> bool:
        return outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED and "did not arrive" in outcome.details

    start = time.monotonic()
    _run(
        "stalled request (no message, no half-close)",
        fuzzed,
        method,
        [b""],
        md,
        allowed=LEGITIMATE | CAUSED,
        expected=_refused_for(valid, timed_out),
        as_stream=True,
        stop_after=0,
        open_wait_s=5.0,
    )
    assert time.monotonic() - start < 5 * REQUEST_TIMEOUT_S


@SLOW
@given(data=st.data())
def test_client_streams_that_stop_half_way(fuzzed: Fuzzed, data: st.DataObject) -> None:
    """Some messages (a bad one among them, maybe), then an early end or a cancel."""
    streams = [m for m in METHODS if m.client_streaming]
    method, md, _ = _draw_call(data, fuzzed, streams)
    messages = [
        _message(data, fuzzed, method).SerializeToString() for _ in range(data.draw(st.integers(1, 4)))
    ]
    if data.draw(st.booleans(), label="bad message"):
        messages.insert(
            data.draw(st.integers(0, len(messages))), data.draw(st.binary(min_size=1, max_size=64))
        )
    if data.draw(st.booleans(), label="cancel"):
        after = data.draw(st.integers(0, len(messages)), label="cancel after")
        _run(
            "client stream cancelled mid-stream",
            fuzzed,
            method,
            messages,
            md,
            allowed=LEGITIMATE | CAUSED,
            stop_after=after,
            cancel=True,
        )
    else:
        _run("client stream ended early", fuzzed, method, messages, md)


@SLOW
@given(data=st.data())
def test_server_streams_cancelled_at_once(fuzzed: Fuzzed, data: st.DataObject) -> None:
    streams = [m for m in METHODS if m.server_streaming]
    method, md, _ = _draw_call(data, fuzzed, streams)
    raw = _message(data, fuzzed, method).SerializeToString()
    _run(
        "server stream cancelled at once",
        fuzzed,
        method,
        [raw],
        md,
        allowed=LEGITIMATE | CAUSED,
        open_wait_s=0.0,
    )


@SLOW
@given(data=st.data())
def test_oversize_metadata(fuzzed: Fuzzed, data: st.DataObject) -> None:
    method, md, _ = _draw_call(data, fuzzed)
    big = (*md, ("x-padding", "p" * data.draw(st.integers(17_000, 60_000))))
    raw = _message(data, fuzzed, method).SerializeToString()

    def exhausted(outcome: Outcome) -> bool:
        return outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED

    _run("oversize metadata", fuzzed, method, [raw], big, expected=exhausted, open_wait_s=5)


# ---------------------------------------------------------------- floods: many streams, streams that never end

STREAMING = [m for m in METHODS if m.server_streaming or m.client_streaming]


def fresh_credentials(fuzzed: Fuzzed, method: Method, count: int, first_user: int) -> list[Md]:
    """Valid credentials for `count` calls of `method`, each of its own user (so per-user rate limits,
    which have their own tests, do not decide)."""
    if method.rule == USER:
        return [bearer(TOKENS.mint(first_user + i, GRANTS)) for i in range(count)]
    if method.rule == TICKET:
        tickets = (
            fuzzed.signer.issue(fuzzed.live_room, first_user + i, Role.ROLE_SPEAKER, RELAY)
            for i in range(count)
        )
        return [((TICKET_KEY, fuzzed.signer.sign(t)),) for t in tickets]
    if method.rule == SERVICE:
        return [fuzzed.service_credential(method)] * count
    return [()] * count


def _requests(data: st.DataObject, fuzzed: Fuzzed, method: Method) -> list[bytes]:
    """What a flood's streams send: half the time what a well-behaved client would (nothing yet on a
    request stream; the live room where a room is named), so most streams stay open; else hostile."""
    if not data.draw(st.booleans(), label="plain request"):
        return [_message(data, fuzzed, method).SerializeToString()]
    if method.client_streaming:
        return []
    message = message_factory.GetMessageClass(method.request)()
    if "room_id" in method.request.fields_by_name:
        message.room_id = fuzzed.live_room
    return [message.SerializeToString()]


def _a_user_is_served(fuzzed: Fuzzed) -> None:
    """Health SERVING everywhere, and a user's call answered, from another address (127.0.0.1)."""
    _assert_serving(fuzzed)
    rooms = rooms_pb2_grpc.RoomsStub(fuzzed.channels["townhall.v1.Rooms"])
    room = rooms.GetRoom(
        rooms_pb2.GetRoomRequest(room_id=fuzzed.live_room), metadata=TOKENS.metadata(9_000_002), timeout=10
    )
    assert room.room_id == fuzzed.live_room


def _held(
    cls: str, method: Method, outcomes: list[Outcome], allowed: frozenset[grpc.StatusCode] = LEGITIMATE
) -> int:
    """Tallies and checks each call; how many were still open when the test ended them."""
    # CANCELLED too: gRPC's own queue of calls not yet taken may shed some of a flood.
    allowed = allowed | {grpc.StatusCode.CANCELLED}
    for outcome in outcomes:
        TALLY.add(cls, method, outcome)
        if os.environ.get("FUZZ_TRACE"):
            print("TRACE", cls, method.path, outcome.name, outcome.reason or "-", outcome.details[:120])
        if outcome.code not in (hostile.OPEN_STREAM, hostile.WRITE_RACE):
            hostile.check(outcome, method, allowed, cls)
    return sum(outcome.code == hostile.OPEN_STREAM for outcome in outcomes)


@SLOW
@given(data=st.data())
def test_many_streams_at_once(fuzzed: Fuzzed, data: st.DataObject) -> None:
    """Dozens to hundreds of streams of one method from one address (::1), on one to four connections,
    each with valid credentials of its own user, held open: what stays open is within the bounds, the
    rest is refused, and users on another address are served all the while."""
    method = data.draw(st.sampled_from(STREAMING), label="method")
    count = data.draw(st.integers(40, 200), label="streams")
    connections = data.draw(st.integers(1, 4), label="connections")
    requests = _requests(data, fuzzed, method)
    credentials = fresh_credentials(
        fuzzed, method, count, data.draw(st.integers(10**9, 10**15), label="user")
    )
    outcomes = asyncio.run(
        hostile.hold(
            fuzzed.flood_target(method),
            method,
            requests,
            credentials,
            connections=connections,
            wait_s=1.5,
            while_held=lambda: _a_user_is_served(fuzzed),
        )
    )
    # DEADLINE_EXCEEDED: a held reflection stream idles past request_timeout_s (the test's doing).
    held = _held("many streams at once", method, outcomes, LEGITIMATE | CAUSED)
    if method.rule == OPEN:
        assert held <= BOUNDS["max_open_streams_per_address"], (method, held)
    elif method.rule != SERVICE:  # the service credential's calls are the pods', bounded by them
        most = BOUNDS["max_calls_per_connection"] * connections
        if method.path.lstrip("/") not in SELF_BOUNDED_METHODS:
            # WatchRoom counts per connection only; its service bounds it per user and per process
            # (core/bounds.py), so watchers behind one address cannot use up the calls joins need.
            most = min(most, BOUNDS["max_calls_per_address"])
        assert held <= most, (method, held, connections)


@SLOW
@given(data=st.data())
def test_streams_that_never_end(fuzzed: Fuzzed, data: st.DataObject) -> None:
    """A few streams opened and never ended by the client (request streams never half-close). Those
    anyone may open (health Watch, reflection) are ended by the server: reflection when its next request
    is late (request_timeout_s), Watch at server.open_stream_max_s. The others have an owner (a token or
    a ticket) and are bounded by the many-streams class; here they must not break anything."""
    method = data.draw(st.sampled_from(STREAMING), label="method")
    count = data.draw(st.integers(1, 3), label="streams")
    requests = _requests(data, fuzzed, method)
    credentials = fresh_credentials(
        fuzzed, method, count, data.draw(st.integers(10**9, 10**15), label="user")
    )
    lifetime = BOUNDS["open_stream_max_s"]
    wait = lifetime + 3 if method.rule == OPEN else 1.0
    started = time.monotonic()
    outcomes = asyncio.run(
        hostile.hold(fuzzed.flood_target(method), method, requests, credentials, connections=1, wait_s=wait)
    )
    # DEADLINE_EXCEEDED: the server ended a stream whose next request did not come (the test's doing).
    held = _held("streams that never end", method, outcomes, LEGITIMATE | CAUSED)
    if method.rule == OPEN:
        assert held == 0, f"{method} still open {time.monotonic() - started:.1f} s later"
