"""Every gRPC channel Townhall opens, and every server port: plaintext, TLS or mutual TLS from [tls].

Clients, peers, relay pulls, the CLI, the demo, load generators and benchmarks all dial through
`channel` (asyncio) or `blocking_channel`, so one config section decides how every connection is made.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from townhall.core.config import TlsConfig

Options = Sequence[tuple[str, Any]]

# How long one connection attempt may take (TCP, TLS, the server's HTTP/2 SETTINGS): gRPC's own default.
# gRPC reads it from "grpc.min_reconnect_backoff_ms", which despite its name is no backoff. Set to 100 ms
# it failed every call waiting for a connection that took longer to set up with UNAVAILABLE ("connection
# attempt timed out before receiving SETTINGS frame"): joins to a busy admission process, TLS over a
# slow network, probes that then found a busy peer down. A call's own deadline bounds the wait instead.
CONNECT_TIMEOUT_MS = 20_000
# A process that went away is dialled again 100 ms later, backing off to at most 2 s between attempts, so
# it is used again as soon as it is back (gRPC's defaults, 1 s growing to 2 minutes, leave it unused for
# minutes). A refused connection fails at once, whatever CONNECT_TIMEOUT_MS says.
RECONNECT_OPTIONS: Options = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
)


@functools.lru_cache(maxsize=16)
def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def client_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    """Trust the configured CA; present this process's certificate (used by servers requiring one)."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca),
        private_key=_read(tls.key) if tls.key else None,
        certificate_chain=_read(tls.cert) if tls.cert else None,
    )


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """The server's certificate; under mutual TLS, clients must present one signed by the CA."""
    return grpc.ssl_server_credentials(
        [(_read(tls.key), _read(tls.cert))],
        root_certificates=_read(tls.ca),
        require_client_auth=tls.require_client_cert,
    )


def _options(tls: TlsConfig, options: Options) -> list[tuple[str, Any]]:
    out = list(options)
    if tls.enabled and tls.server_name:
        out.append(("grpc.ssl_target_name_override", tls.server_name))
    return out


def channel(address: str, tls: TlsConfig, options: Options = ()) -> grpc.aio.Channel:
    """An asyncio channel to a Townhall server."""
    if not tls.enabled:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, client_credentials(tls), options=_options(tls, options))


def blocking_channel(address: str, tls: TlsConfig, options: Options = ()) -> grpc.Channel:
    """A synchronous channel (health waits, tools outside an event loop)."""
    if not tls.enabled:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, client_credentials(tls), options=_options(tls, options))


def add_port(server: grpc.aio.Server | grpc.Server, listen: str, tls: TlsConfig) -> int:
    """Binds `listen` with TLS when configured; the bound port (0 if it could not bind)."""
    if tls.enabled:
        return server.add_secure_port(listen, server_credentials(tls))
    return server.add_insecure_port(listen)
