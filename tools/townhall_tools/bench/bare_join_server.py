"""The unary ceiling: a bare grpc.aio server answering Admission.Join with a pre-serialised grant.

Same method path, server options and process settings as admission, and a reply of the size a
real grant has (a signed ticket and a relay address), so one load generator measures both. No
interceptor, room state, leases, budget or signing: admission's cost over this is its own.

`python -m townhall_tools.bench.bare_join_server --port P` runs it until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc

from townhall.core.config import DEV_ENV, Config, load
from townhall.core.process import tune_gc
from townhall.core.server import server_options
from townhall.core.tickets import TicketSigner
from townhall.v1.admission_pb2 import Grant, JoinRequest, JoinResponse
from townhall.v1.common_pb2 import Role

SERVICE = "townhall.v1.Admission"


def sample_reply() -> bytes:
    """A JoinResponse the size of a real grant (a listener ticket for a 16-character room id)."""
    signer = TicketSigner.from_config(load(env=DEV_ENV).tickets)
    ticket = signer.issue("r" * 16, 2**40, Role.ROLE_LISTENER, "127.0.0.1:50052")
    grant = Grant(ticket=signer.sign(ticket), relay_address="127.0.0.1:50052", role=Role.ROLE_LISTENER)
    grant.expires_at_ms = ticket.expires_at * 1000
    return JoinResponse(grant=grant).SerializeToString()


def handler() -> grpc.GenericRpcHandler:
    """Join answers the same bytes to everyone."""
    reply = sample_reply()

    async def join(request: JoinRequest, context: grpc.aio.ServicerContext) -> bytes:
        return reply

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Join": grpc.unary_unary_rpc_method_handler(
                join, request_deserializer=JoinRequest.FromString, response_serializer=lambda data: data
            )
        },
    )


async def serve(port: int) -> None:
    """Serves until SIGTERM/SIGINT."""
    server = grpc.aio.server(options=server_options(Config()))
    server.add_generic_rpc_handlers((handler(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(0.5)


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m townhall_tools.bench.bare_join_server", description=__doc__
    )
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    tune_gc()  # admission's process settings, so the comparison is of the code, not of the GC
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
