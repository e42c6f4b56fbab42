"""Structured JSON logs (structlog) with room, shard and request ids bound by the caller.

Libraries that log through the standard library (aiokafka, kubernetes, grpc, asyncio) come out the same
way: one JSON object per line with the same keys (event, level, timestamp, service), plus `logger`, the
library's logger name, and `exception` when the record carries one.
"""

from __future__ import annotations

import logging
import sys

import structlog

from townhall.core.config import LogConfig

# The handler configure() gave the root logger: a second configure replaces it, and leaves the others.
_handler: logging.Handler | None = None


def configure(config: LogConfig, service: str) -> None:
    """Sends structlog and stdlib logs as one JSON object per line to stderr.

    Stdlib loggers are shown from WARNING (or the configured level if it is higher): aiokafka is
    chatty at INFO about every rebalance, kubernetes and grpc at DEBUG; their warnings still come through.
    """
    global _handler
    level = getattr(logging, config.level.upper())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if config.json else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)

    def name_service(
        _logger: object, _method: str, event: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        # A library's own thread does not see the context bound above.
        event.setdefault("service", service)
        return event

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, name_service, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    root.setLevel(max(level, logging.WARNING))


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger for one module."""
    return structlog.get_logger(name)
