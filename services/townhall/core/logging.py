"""Structured JSON logs (structlog) with room, shard and request ids bound by the caller."""

from __future__ import annotations

import logging
import sys

import structlog

from townhall.core.config import LogConfig


def configure(config: LogConfig, service: str) -> None:
    """Sends structlog and stdlib logs as one JSON object per line to stderr."""
    level = getattr(logging, config.level.upper())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if config.json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr, format="%(message)s")
    # aiokafka is chatty at INFO about every rebalance; its warnings still come through.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger for one module."""
    return structlog.get_logger(name)
