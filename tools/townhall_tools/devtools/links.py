"""Network conditions for tests and fault runs: a link whose connections take long to set up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any


@contextlib.asynccontextmanager
async def slow_handshake(target: str, delay_s: float) -> AsyncIterator[str]:
    """A TCP proxy to `target` that holds back the server's first bytes on each connection for `delay_s`.

    The client's connection then takes that long to set up (the server's HTTP/2 SETTINGS arrive late),
    as with a busy server or TLS over a mobile network; afterwards bytes pass at once. Yields its address.
    """
    host, _, port = target.rpartition(":")
    handlers: set[asyncio.Task[Any]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first_delay_s: float) -> None:
        try:
            data = await reader.read(65536)
            if first_delay_s:
                await asyncio.sleep(first_delay_s)
            while data:
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
            await asyncio.gather(pipe(from_client, to_server, 0.0), pipe(from_server, to_client, delay_s))
        except OSError:
            to_client.close()
        except asyncio.CancelledError:
            # The proxy is closing and its connections with it. Ending quietly: asyncio logs a
            # connection handler's cancellation as an error.
            to_client.close()

    proxy = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
    finally:
        proxy.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await proxy.wait_closed()
