"""The ceiling: a bare grpc.aio server that writes one pre-serialised chunk per tick to every stream.

It serves the same method path as Relay.Subscribe, with the relay's server options and process
settings, and chunks of the size the relay makes (frames of `payload` bytes, `frames` per
chunk, capture times spread over the interval), so one load generator measures both. No
interceptor, queue, ring, tickets or publish path: the relay's cost over this is what the
relay itself adds.

`python -m townhall_tools.bench.bare_stream_server --port P` runs it until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time

import grpc

from townhall.core.config import Config
from townhall.core.process import tune_gc
from townhall.core.server import server_options
from townhall.core.tasks import cancel
from townhall.v1.relay_pb2 import AudioFrame, Chunk, SubscribeRequest

METHOD_SERVICE = "townhall.v1.Relay"


class Ticker:
    """Builds and serialises one chunk per interval and wakes every stream waiting for it."""

    def __init__(self, interval_s: float, frames: int, payload: int) -> None:
        self._interval = interval_s
        self._frames = frames
        self._payload = os.urandom(payload)
        self.sequence = 0
        # One future per waiting stream, as the relay has: a shared future would be cancelled
        # by the first client that hangs up while awaiting it.
        self.waiters: list[asyncio.Future[bytes]] = []

    def chunk(self) -> bytes:
        """The next chunk: frames captured over the last interval, as a speaker would send them."""
        self.sequence += 1
        now_us = time.time_ns() // 1_000
        step_us = int(self._interval * 1e6 / self._frames)
        frames = [
            AudioFrame(
                speaker_id=1,
                sequence=self.sequence * self._frames + i,
                capture_ts_us=now_us - (self._frames - 1 - i) * step_us,
                payload=self._payload,
            )
            for i in range(self._frames)
        ]
        return Chunk(sequence=self.sequence, emitted_ts_us=now_us, frames=frames).SerializeToString()

    async def run(self) -> None:
        """Ticks forever on a drift-free schedule."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += self._interval
            await asyncio.sleep(max(0.0, due - loop.time()))
            data = self.chunk()
            waiters, self.waiters = self.waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(data)


def handler(ticker: Ticker) -> grpc.GenericRpcHandler:
    """Subscribe: every tick, write the shared bytes (a stream busy writing misses ticks)."""

    async def subscribe(request: SubscribeRequest, context: grpc.aio.ServicerContext) -> None:
        loop = asyncio.get_running_loop()
        while True:
            waiter = loop.create_future()
            ticker.waiters.append(waiter)
            await context.write(await waiter)

    return grpc.method_handlers_generic_handler(
        METHOD_SERVICE,
        {
            "Subscribe": grpc.unary_stream_rpc_method_handler(
                subscribe,
                request_deserializer=SubscribeRequest.FromString,
                response_serializer=lambda data: data,
            )
        },
    )


async def serve(port: int, interval_s: float, frames: int, payload: int) -> None:
    """Serves until SIGTERM/SIGINT."""
    ticker = Ticker(interval_s, frames, payload)
    # The relay's own server options, so both differ only in what runs per message.
    server = grpc.aio.server(options=server_options(Config()))
    server.add_generic_rpc_handlers((handler(ticker),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    tick = asyncio.create_task(ticker.run())
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await cancel(tick)
    await server.stop(0.5)


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m townhall_tools.bench.bare_stream_server", description=__doc__
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunk-ms", type=int, default=100)
    parser.add_argument("--frames", type=int, default=5, help="frames per chunk")
    parser.add_argument("--payload", type=int, default=60, help="bytes per frame payload")
    args = parser.parse_args()
    tune_gc()  # the relay's process settings, so the comparison is of the code, not of the GC
    asyncio.run(serve(args.port, args.chunk_ms / 1000, args.frames, args.payload))


if __name__ == "__main__":
    main()
