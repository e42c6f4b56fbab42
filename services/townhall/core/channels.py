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
