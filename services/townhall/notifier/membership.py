"""The notifiers' membership: static (notifier.members) or the pods of the notifier StatefulSet.

Graph keys live on their owner's volume, so ownership must follow the StatefulSet's identities, not its
ready pods: a notifier that restarts (a rolling update, a crash) keeps its keys and gets them back on
the same volume, and its keys are unavailable meanwhile instead of being served, empty, by another
notifier. The members are therefore pods 0..spec.replicas-1 by their stable addresses (the headless
Service's pod names), read from the Kubernetes API, and they change only when the StatefulSet is
scaled; its metadata.generation, which grows with every change of its spec, is the view's epoch.
(Admission, whose state is all in Kafka, follows the ready endpoints instead: core/membership.py.)

So the notifiers do not narrow their members to the ones that answer probes, as admission does
(core/membership.ProbedMembership): a dead notifier's keys given to another could not be settled there
(the holder does not answer its handover, notifier/handover.py), so they would be UNAVAILABLE all the
same, and every crash would move them away and back. Calls for them are UNAVAILABLE until it is back
(forwarding retries within its budget, core/forwarding.py), and then served whole
(tests/integration/test_notifier_sharded.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from townhall.core import logging
from townhall.core.config import NotifierConfig
from townhall.core.tasks import cancel, supervise

log = logging.get(__name__)

POLL_S = 2.0
REQUEST_TIMEOUT_S = 10.0
_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

OnChange = Callable[[list[str], int], Awaitable[object]]


class Membership(Protocol):
    """Who the notifiers are (host:port each) and the epoch of that view."""

    # Whether the members can change while the process runs (a scaled StatefulSet; not static ones).
    changes: bool

    async def read(self) -> tuple[list[str], int]:
        """The members and the epoch now."""

    def start(self, on_change: OnChange) -> None:
        """Calls `on_change(members, epoch)` whenever they change, until close()."""

    async def close(self) -> None:
        """Stops watching."""


class StaticMembership:
    """notifier.members: the local topology and tests; they never change while the process runs."""

    changes = False

    def __init__(self, members: tuple[str, ...]) -> None:
        self._members = list(members)

    async def read(self) -> tuple[list[str], int]:
        return list(self._members), 0

    def start(self, on_change: OnChange) -> None:
        """Nothing to watch."""

    async def close(self) -> None:
        """Nothing to stop."""


class StatefulSetMembership:
    """Pods 0..replicas-1 of a StatefulSet by their stable addresses, polled from the Kubernetes API."""

    changes = True

    def __init__(
        self, statefulset: str, namespace: str, member: str, api: Any = None, poll_s: float = POLL_S
    ) -> None:
        self._statefulset = statefulset
        self._namespace = namespace
        # An address with "{pod}" where each pod's name goes, e.g. "{pod}.notifier-headless.ns.svc:50053".
        self._member = member
        self._api = api
        self._poll_s = poll_s
        self._last: tuple[list[str], int] | None = None
        self._task: asyncio.Task[None] | None = None

    def members_of(self, replicas: int) -> list[str]:
        """The addresses of pods 0..replicas-1."""
        return [self._member.format(pod=f"{self._statefulset}-{i}") for i in range(replicas)]

    async def read(self) -> tuple[list[str], int]:
        if self._api is None:
            from kubernetes import client, config

            config.load_incluster_config()
            self._api = client.AppsV1Api()
        sts = await asyncio.to_thread(
            self._api.read_namespaced_stateful_set,
            self._statefulset,
            self._namespace,
            _request_timeout=REQUEST_TIMEOUT_S,
        )
        replicas = sts.spec.replicas if sts.spec.replicas is not None else 1
        view = (self.members_of(int(replicas)), int(sts.metadata.generation or 0))
        self._last = view
        return view

    def start(self, on_change: OnChange) -> None:
        self._task = supervise(self._poll(on_change), "notifier-membership")

    async def close(self) -> None:
        await cancel(self._task)
        self._task = None

    async def _poll(self, on_change: OnChange) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            before = self._last
            try:
                view = await self.read()
            except api_errors() as exc:  # API restart, network: keep the last view, try again
                log.warning("notifier membership not read; keeping the last one", error=repr(exc))
                continue
            if view != before:
                await on_change(*view)


def api_errors() -> tuple[type[Exception], ...]:
    """What a Kubernetes API read raises while the API server is away, slow or refusing (an error answer,
    a dropped or timed-out connection): the membership keeps its last view and reads again."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    return (ApiException, HTTPError, OSError, TimeoutError)


def membership_for(config: NotifierConfig) -> Membership:
    """Static members from config, or the pods of the notifier StatefulSet."""
    if config.membership == "kubernetes":
        namespace = config.kube_namespace or (
            _NAMESPACE_FILE.read_text().strip() if _NAMESPACE_FILE.exists() else "default"
        )
        return StatefulSetMembership(config.kube_statefulset, namespace, config.kube_member)
    return StaticMembership(config.members)
