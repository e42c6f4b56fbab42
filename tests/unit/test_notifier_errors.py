"""The notifier's one exception policy: its loops retry the errors they can meet (Kafka away, the
Kubernetes API away, the store's disk, a peer not answering) and end, under the supervisor, on any other."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import MaxRetryError

from townhall.core.kafka import KAFKA_ERRORS
from townhall.core.tasks import Supervisor
from townhall.notifier.membership import StatefulSetMembership
from townhall.notifier.planner import PLAN_ERRORS
from townhall.notifier.store import STORE_ERRORS, Moved


class FlakyApi:
    """A Kubernetes AppsV1Api that answers with each of `answers` in turn: a replica count, or raises."""

    def __init__(self, *answers: int | BaseException) -> None:
        self._answers = list(answers)

    def read_namespaced_stateful_set(self, *_args: Any, **_kwargs: Any) -> Any:
        answer = self._answers.pop(0) if len(self._answers) > 1 else self._answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return SimpleNamespace(
            spec=SimpleNamespace(replicas=answer), metadata=SimpleNamespace(generation=answer)
        )


async def _watch(api: FlakyApi) -> tuple[asyncio.Task[None], list[tuple[list[str], int]], Supervisor]:
    membership = StatefulSetMembership("notifier", "ns", "{pod}.h:1", api=api, poll_s=0.001)
    views: list[tuple[list[str], int]] = []

    async def on_change(members: list[str], epoch: int) -> None:
        views.append((members, epoch))

    supervisor = Supervisor()
    with supervisor.active():
        membership.start(on_change)
    assert membership._task is not None
    return membership._task, views, supervisor


async def test_membership_keeps_polling_through_api_errors() -> None:
    api = FlakyApi(ApiException(status=503), MaxRetryError(None, "/", "refused"), TimeoutError(), 2)
    task, views, supervisor = await _watch(api)
    for _ in range(200):
        if views:
            break
        await asyncio.sleep(0.005)
    task.cancel()
    assert views == [(["notifier-0.h:1", "notifier-1.h:1"], 2)]
    assert supervisor.failed is None


async def test_membership_poll_ends_under_the_supervisor_on_an_unplanned_error() -> None:
    task, _views, supervisor = await _watch(FlakyApi(ApiException(status=503), KeyError("spec")))
    await asyncio.wait([task], timeout=5)
    await asyncio.sleep(0)
    assert isinstance(task.exception(), KeyError), "retried for ever instead of surfacing"
    assert supervisor.failed == "notifier-membership"


@pytest.mark.parametrize(
    "error",
    [
        KafkaConnectionError(),
        ConnectionResetError(),
        TimeoutError(),
        AssertionError("partition not assigned"),
    ],
)
def test_kafka_faults_are_retried_by_every_kafka_loop(error: Exception) -> None:
    assert isinstance(error, KAFKA_ERRORS)
    assert isinstance(error, PLAN_ERRORS)


def test_planning_retries_store_and_handover_faults_and_nothing_else() -> None:
    import sqlite3

    from townhall.core.errors import Unavailable

    for error in (sqlite3.OperationalError("database is locked"), Unavailable("holder"), Moved("k", "o", 1)):
        assert isinstance(error, PLAN_ERRORS)
    assert isinstance(sqlite3.OperationalError(), STORE_ERRORS)
    for bug in (KeyError("x"), TypeError("x"), ValueError("x"), AttributeError("x")):
        assert not isinstance(bug, PLAN_ERRORS), f"{type(bug).__name__} would be retried for ever"
