"""Network conditions for tests and fault runs: a link whose connections take long to set up, or that is
cut without a reset."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any


class Link:
    """A TCP proxy's address and its switch: cut() holds every byte both ways and closes nothing, as a
    firewall dropping packets does (no reset, no FIN); mend() lets the held bytes through."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._flowing = asyncio.Event()
        self._flowing.set()

    def cut(self) -> None:
        self._flowing.clear()

    def mend(self) -> None:
        self._flowing.set()

    async def flowing(self) -> None:
        await self._flowing.wait()


@contextlib.asynccontextmanager
async def slow_handshake(target: str, delay_s: float) -> AsyncIterator[str]:
    """A TCP proxy to `target` that holds back the server's first bytes on each connection for `delay_s`.

    The client's connection then takes that long to set up (the server's HTTP/2 SETTINGS arrive late),
    as with a busy server or TLS over a mobile network; afterwards bytes pass at once. Yields its address.
    """
    async with link(target, delay_s) as proxy:
        yield proxy.address


@contextlib.asynccontextmanager
async def link(target: str, first_delay_s: float = 0.0) -> AsyncIterator[Link]:
    """A TCP proxy to `target` (see Link), holding back the server's first bytes on each connection for
    `first_delay_s`."""
    host, _, port = target.rpartition(":")
    handlers: set[asyncio.Task[Any]] = set()
    proxy: Link

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first_delay_s: float) -> None:
        try:
            data = await reader.read(65536)
            if first_delay_s:
                await asyncio.sleep(first_delay_s)
            while data:
                await proxy.flowing()
                writer.write(data)
                await writer.drain()
                data = await reader.read(65536)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(from_client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        task.add_done_callback(handlers.discard)
        try:
            from_server, to_server = await asyncio.open_connection(host, int(port))
            await asyncio.gather(
                pipe(from_client, to_server, 0.0), pipe(from_server, to_client, first_delay_s)
            )
        except OSError:
            to_client.close()
        except asyncio.CancelledError:
            # The proxy is closing and its connections with it. Ending quietly: asyncio logs a
            # connection handler's cancellation as an error.
            to_client.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    proxy = Link(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        yield proxy
    finally:
        proxy.mend()
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()
