"""Logs: Townhall's own and the libraries' (stdlib logging) come out as the same one-line JSON."""

from __future__ import annotations

import json
import logging as stdlib
from collections.abc import Iterator

import pytest
import structlog

from townhall.core import logging
from townhall.core.config import LogConfig

KEYS = {"event", "level", "timestamp", "service"}


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = stdlib.getLogger()
    level = root.level
    yield
    if logging._handler is not None:
        root.removeHandler(logging._handler)
        logging._handler = None
    root.setLevel(level)
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


def test_a_library_record_is_one_json_line_with_townhalls_keys(capsys: pytest.CaptureFixture[str]) -> None:
    logging.configure(LogConfig(level="info"), "relay")
    logging.get("townhall.relay.test").warning("room started", room="r1")
    stdlib.getLogger("aiokafka.consumer.group_coordinator").warning("group %s rebalanced", "g1")
    ours, theirs = lines(capsys)
    assert ours.keys() >= KEYS and theirs.keys() >= KEYS
    assert theirs == {
        "event": "group g1 rebalanced",
        "level": "warning",
        "timestamp": theirs["timestamp"],
        "service": "relay",
        "logger": "aiokafka.consumer.group_coordinator",
    }
    assert theirs["timestamp"].endswith("Z") and theirs["timestamp"][:4] == ours["timestamp"][:4]


def test_library_levels_are_respected(capsys: pytest.CaptureFixture[str]) -> None:
    logging.configure(LogConfig(level="info"), "admission")
    stdlib.getLogger("aiokafka").info("rebalancing")  # chatty: libraries show from WARNING
    stdlib.getLogger("kubernetes.watch").error("watch ended")
    assert [(r["logger"], r["level"]) for r in lines(capsys)] == [("kubernetes.watch", "error")]
    logging.configure(LogConfig(level="error"), "admission")  # a stricter level applies to them too
    stdlib.getLogger("grpc").warning("not shown")
    stdlib.getLogger("grpc").critical("shown")
    assert [(r["event"], r["level"]) for r in lines(capsys)] == [("shown", "critical")]
    assert (
        sum(isinstance(h.formatter, structlog.stdlib.ProcessorFormatter) for h in stdlib.getLogger().handlers)
        == 1
    )


def test_a_library_exception_stays_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    logging.configure(LogConfig(level="info"), "notifier")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        stdlib.getLogger("asyncio").exception("Task exception was never retrieved")
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    record = json.loads(err)
    assert (record["event"], record["level"], record["service"]) == (
        "Task exception was never retrieved",
        "error",
        "notifier",
    )
    assert "RuntimeError: boom" in record["exception"]
