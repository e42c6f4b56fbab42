"""The lifecycle every service shares: serve gRPC with health and reflection, drain on SIGTERM.

A process serves two gRPC ports: the client port (the client APIs, health and reflection) and the
internal port (calls between Townhall processes, and health for peers' probes), each a server of its
own, so peers' calls never queue behind clients and no Service needs to expose the internal one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from townhall.core import logging
from townhall.core.auth import Authenticator, internal_service
from townhall.core.bounds import Bounds
from townhall.core.channels import add_port
from townhall.core.config import Config, ConfigError
from townhall.core.config import load as load_config
from townhall.core.health import HealthServicer
from townhall.core.interceptor import Instrumented
from townhall.core.kafka import KafkaUnreachable
from townhall.core.limits import Limits
from townhall.core.metrics import build_info, serve_metrics
from townhall.core.process import tune_gc
from townhall.core.tasks import Supervisor, supervise

log = logging.get(__name__)


class App(Protocol):
    """One service's servicers and background work, driven by `serve`."""

    service_names: Sequence[str]
    # Checks callers (user tokens, service credentials) and holds this process's own credential.
    auth: Authenticator

    def register(self, server: grpc.aio.Server) -> None:
        """Adds the service's servicers to the server."""

    async def start(self) -> None:
        """Connects to dependencies (Kafka) and starts background tasks, before serving."""

    async def leave(self) -> None:
        """Hands over what this process owns (SIGTERM), before it reports NOT_SERVING."""

    async def drain(self) -> None:
        """Asks long-lived streams to finish; called after the drain notice, before the server stops."""

    async def close(self) -> None:
        """Stops background tasks and closes clients; always called."""


@dataclass
class Running:
    """A started server: its bound port and the means to stop it."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    # The plaintext health-only server (server.health_port), if any.
    health_server: grpc.aio.Server | None = None
    # The internal port's server and bound port, if the process has one.
    internal_server: grpc.aio.Server | None = None
    internal_port: int = 0
    watcher: asyncio.Task[None] | None = None
    instrumented: list[Instrumented] = field(default_factory=list)
    # Watches the app's background loops: one that dies turns health NOT_SERVING (core/tasks.py).
    supervisor: Supervisor = field(default_factory=Supervisor)


def size_options(config: Config) -> list[tuple[str, int]]:
    """Message size limits: a larger request is RESOURCE_EXHAUSTED, refused by gRPC before any parsing."""
    size = config.server.max_message_bytes
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", 4 * size)]


def server_options(config: Config) -> list[tuple[str, int]]:
    """Channel options every server sets: message size limits and keepalive."""
    return [
        *size_options(config),
        ("grpc.max_concurrent_streams", config.server.max_concurrent_streams),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.so_reuseport", 1),
        # Calls arrived but not yet accepted by the asyncio server: past the soft limit gRPC cancels
        # new calls at random (CANCELLED). About 2,000 listeners joining at once hit the default.
        ("grpc.server.max_pending_requests", 20_000),
        ("grpc.server.max_pending_requests_hard_limit", 40_000),
    ]


class _Planes:
    """Registers every servicer on each plane (client port, internal port) at once."""

    def __init__(self, planes: Sequence[Instrumented]) -> None:
        self._planes = planes

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        for plane in self._planes:
            plane.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        for plane in self._planes:
            plane.add_registered_method_handlers(service, handlers)


def guarded(
    app: App,
    config: Config,
    options: Sequence[tuple[str, int]],
    clients: int | None = None,
    internal: bool = False,
) -> tuple[grpc.aio.Server, Instrumented]:
    """A gRPC server and what its servicers register through; every server a process starts is made here.

    Every method is authenticated, rate-limited (not on the internal port), counted, timed and
    error-mapped, its request bytes checked (core/interceptor.py), and its calls in flight bounded per
    connection, per address and per server, this server on its own (core/bounds.py); `clients` bounds
    its client calls at once.
    """
    server = grpc.aio.server(options=options)
    bounds = Bounds(config.server, getattr(app, "max_calls_per_address", None), clients)
    limits = Limits(dataclasses.replace(config.limits, enabled=False) if internal else config.limits)
    instrumented = Instrumented(
        server,
        app.auth,
        limits,
        config.server.request_timeout_s,
        internal=internal,
        bounds=bounds,
        open_stream_s=config.server.open_stream_max_s,
    )
    return server, instrumented


async def start(app: App, config: Config, listen: str, internal: str = "") -> Running:
    """Starts the app and a gRPC server for it on `listen` (port 0 picks a free port), and the internal
    port's server on `internal` (empty: none)."""
    config.require_keys(app.auth.kind)  # as run_service does, for servers started in-process
    # An app may bound its own client calls and pending queue (admission sheds overload this way).
    extra = dict(getattr(app, "server_options", {}))
    options = [(k, v) for k, v in server_options(config) if k not in extra] + list(extra.items())
    server, instrumented = guarded(app, config, options, getattr(app, "max_concurrent_rpcs", None))
    planes = [instrumented]
    internal_server = None
    if internal:
        # Not the client port's overload guard: a join storm must not queue a lease or a forwarded change.
        internal_server, plane = guarded(app, config, server_options(config), internal=True)
        planes.append(plane)
    app.register(_Planes(planes))
    health_servicer = HealthServicer()
    for plane in planes:
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, plane)
    names = [*app.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
    # Reflection on the client port shows what that port serves: not the internal services it refuses.
    listed = [name for name in names if not internal_service(name)]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer([*listed, reflection.SERVICE_NAME]), instrumented
    )
    wrapped = list(planes)
    if config.development_keys():
        log.warning("built-in development keys in use: not for production", keys=config.development_keys())
    for name in ("", *app.service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    supervisor = Supervisor()
    marking: list[asyncio.Task[None]] = []

    def died(_task: str, _exc: BaseException) -> None:
        # NOT_SERVING at once: peers' probes take this process out, and Kubernetes stops sending to it.
        marking.append(asyncio.create_task(_not_serving(health_servicer, app.service_names)))

    supervisor.on_failure(died)
    health_server = None
    if config.server.health_port:
        # Probes that cannot speak TLS (the kubelet's) check this port; it serves health and nothing else.
        # Up before the app starts: NOT_SERVING while it waits for Kafka (server.kafka_wait_s).
        health_server, probes = guarded(app, config, size_options(config))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probes)
        host = listen.rpartition(":")[0]
        if not health_server.add_insecure_port(f"{host}:{config.server.health_port}"):
            raise OSError(f"cannot listen on {host}:{config.server.health_port} (server.health_port)")
        await health_server.start()
        with supervisor.active():
            probes.start()
    try:
        with supervisor.active():
            await app.start()
        port = add_port(server, listen, config.tls)
        if port == 0:
            raise OSError(f"cannot listen on {listen}")
        internal_port = 0
        if internal_server is not None:
            internal_port = add_port(internal_server, internal, config.tls)
            if internal_port == 0:
                raise OSError(f"cannot listen on {internal} (the internal port)")
    except BaseException:
        if health_server is not None:
            await health_server.stop(None)
            await probes.close()
        raise
    if health_server is not None:
        wrapped.append(probes)
    if internal_server is not None:
        await internal_server.start()
    await server.start()
    with supervisor.active():
        for each in planes:
            each.start()
        watcher = supervise(app.auth.watch(), "jwks-watch")
    for name in ("", *app.service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if supervisor.failed is not None:  # a loop died while the server was starting
        await _not_serving(health_servicer, app.service_names)
    return Running(
        server,
        health_servicer,
        port,
        health_server,
        internal_server=internal_server,
        internal_port=internal_port,
        watcher=watcher,
        instrumented=wrapped,
        supervisor=supervisor,
    )


async def _not_serving(health_servicer: health.aio.HealthServicer, service_names: Sequence[str]) -> None:
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)


async def stop(app: App, running: Running, grace_s: float, notice_s: float = 0.0) -> None:
    """Hands over, reports NOT_SERVING, keeps serving `notice_s`, drains, stops within grace_s, closes.

    The notice lets peers that probe health (admission) take this process's rooms and send its
    listeners elsewhere while it still answers, so clients that reconnect find the new owner.
    """
    try:
        await app.leave()
        await running.health.enter_graceful_shutdown()
        if notice_s > 0:
            await asyncio.sleep(notice_s)
        await app.drain()
        stopping = [running.server.stop(grace_s)]
        if running.internal_server is not None:
            stopping.append(running.internal_server.stop(grace_s))
        await asyncio.gather(*stopping)
    finally:
        if running.watcher is not None:
            running.watcher.cancel()
        if running.health_server is not None:
            await running.health_server.stop(None)
        for each in running.instrumented:
            await each.close()
        await app.close()


def metrics_host(config: Config, listen: str) -> str:
    """Where /metrics listens: server.metrics_host, else the host of the gRPC listen address."""
    return config.server.metrics_host or listen.rpartition(":")[0].strip("[]") or "0.0.0.0"


async def serve(
    app: App, config: Config, name: str, listen: str, metrics_port: int, internal: str = ""
) -> None:
    """Runs a service until SIGTERM or SIGINT, then drains it within server.grace_s."""
    build_info(name)
    serve_metrics(metrics_port, metrics_host(config, listen))
    try:
        running = await start(app, config, listen, internal)
    except BaseException:
        await app.close()
        raise
    log.info(
        "serving",
        name=name,
        listen=listen,
        port=running.port,
        internal_port=running.internal_port,
        metrics_port=metrics_port,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    # A background loop that died stops the process as SIGTERM would, then it exits non-zero (TaskDied).
    running.supervisor.on_failure(lambda _task, _exc: stopping.set())
    if running.supervisor.failed is not None:
        stopping.set()
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await stopping.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    notice_s = config.server.drain_notice_s
    log.info("draining", name=name, notice_s=notice_s, grace_s=config.server.grace_s)
    await stop(app, running, config.server.grace_s, notice_s)
    log.info("stopped", name=name)
    if running.supervisor.failed is not None:
        raise TaskDied(running.supervisor.failed)


class TaskDied(RuntimeError):
    """A background loop ended with an exception: the process stopped so that it is restarted."""

    def __init__(self, task: str) -> None:
        super().__init__(f"background task {task} died (logged with its traceback); stopped to be restarted")
        self.task = task


def run_service(name: str, build: Callable[[Config], App], section: str) -> None:
    """`python -m townhall.<service>`: loads config (a bad value exits 2 naming the key), serves."""
    parser = argparse.ArgumentParser(prog=f"python -m townhall.{name}", description=f"Townhall {name}")
    parser.add_argument("--config", help="TOML config file (else $TOWNHALL_CONFIG, then defaults)")
    args = parser.parse_args()
    try:
        config = load_config(args.config)
        # No key is ever a default: without the keys it needs, the service stops here, saying which.
        config.require_keys(name)
    except ConfigError as exc:
        _config_error(name, exc)
    logging.configure(config.log, name)
    tune_gc()
    own = getattr(config, section)

    async def main() -> None:
        # Built inside the event loop: Kafka clients bind to the running loop when created.
        await serve(build(config), config, name, own.listen, own.metrics_port, own.internal_listen)

    try:
        asyncio.run(main())
    except ConfigError as exc:  # keys are read when the app is built (a JWKS that does not parse)
        _config_error(name, exc)
    except (KafkaUnreachable, TaskDied) as exc:  # logged already; said once more where a person looks first
        print(f"townhall {name}: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc


def _config_error(name: str, exc: ConfigError) -> typing.NoReturn:
    print(f"townhall {name}: configuration error: {exc}", file=sys.stderr)
    raise SystemExit(2) from exc
