"""Starting and stopping Kafka clients within bounded time, so a slow broker never hangs a process."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from aiokafka.errors import KafkaError

from townhall.core import logging
from townhall.core.kafka import KAFKA_ERRORS, KafkaUnreachable

log = logging.get(__name__)


class KafkaClient(Protocol):
    """What AIOKafkaProducer and AIOKafkaConsumer have in common here."""

    async def start(self) -> Any:
        """Connects to the cluster."""

    async def stop(self) -> Any:
        """Closes connections."""


C = TypeVar("C", bound=KafkaClient)


def describe(exc: BaseException) -> str:
    """An exception as one line for a log field: its type and message, without repeating the type."""
    text = str(exc)
    name = type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}"


async def started(
    make: Callable[[], C],
    what: str,
    bootstrap: str,
    attempts: int = 5,
    attempt_timeout_s: float = 10.0,
    backoff_s: float = 1.0,
) -> C:
    """A started client from `make`, trying a fresh one up to `attempts` times."""
    for attempt in range(1, attempts + 1):
        client = make()
        try:
            await asyncio.wait_for(client.start(), attempt_timeout_s)
            return client
        except (KafkaError, OSError, TimeoutError) as exc:
            await stopped(client, what)
            if attempt == attempts:
                raise KafkaUnreachable(
                    f"cannot start the {what}: Kafka at {bootstrap} not reachable after {attempts} attempts "
                    f"({describe(exc)})"
                ) from exc
            log.warning(
                "kafka not reachable, retrying",
                client=what,
                bootstrap=bootstrap,
                attempt=attempt,
                attempts=attempts,
                error=describe(exc),
            )
            await asyncio.sleep(backoff_s * attempt)
    raise AssertionError("unreachable")


async def stopped(client: KafkaClient | None, what: str, timeout_s: float = 10.0) -> None:
    """Stops `client` (flushing what it can) within `timeout_s`; errors are logged, not raised."""
    if client is None:
        return
    try:
        await asyncio.wait_for(client.stop(), timeout_s)
    except KAFKA_ERRORS as exc:
        log.warning("kafka client did not stop cleanly", client=what, error=describe(exc))
