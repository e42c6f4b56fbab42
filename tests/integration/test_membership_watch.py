"""Kubernetes membership against a fake API server on a real socket, driven by the real kubernetes client.

The server answers LIST with the EndpointSlices it holds and can stream watch events; it can also
accept a connection and then never send another byte (a half-open connection: the API server or a
load balancer in between went away without a FIN or RST). Membership must notice within its read
timeout, list again and carry on, and a process must never hang at start on a LIST that never answers.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes import client

from townhall.core.membership import KubernetesMembership

SERVICE = "townhall-admission-headless"
ME = "10.0.0.1:50051"


def endpoint_slice(name: str, addresses: list[str]) -> dict[str, Any]:
    """An EndpointSlice as the API server sends it (JSON), every address ready."""
    return {
        "metadata": {"name": name, "resourceVersion": "5", "labels": {"kubernetes.io/service-name": SERVICE}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
        "ports": [{"name": "grpc", "port": 50051, "protocol": "TCP"}],
    }


class FakeApiServer:
    """Serves /apis/discovery.k8s.io/v1/namespaces/<ns>/endpointslices: LIST from `slices`, WATCH per
    `watch_events` (sent, then silence until the test ends); `answer_lists=False` makes LISTs hang too."""

    def __init__(self) -> None:
        self.slices = [endpoint_slice("s1", ["10.0.0.1"])]
        self.watch_events: list[dict[str, Any]] = []
        self.answer_lists = True
        self.lists = 0
        self.watches = 0
        self.release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                assert url.path == "/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices", url.path
                assert query["labelSelector"] == [f"kubernetes.io/service-name={SERVICE}"]
                if query.get("watch") == ["true"]:
                    fake.watches += 1
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for event in fake.watch_events:
                        line = json.dumps(event).encode() + b"\n"
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                    fake.watch_events = []
                    fake.release.wait(60)  # half-open from here: no byte, no close
                    return
                fake.lists += 1
                if not fake.answer_lists:
                    fake.release.wait(60)
                    return
                body = json.dumps(
                    {
                        "kind": "EndpointSliceList",
                        "apiVersion": "discovery.k8s.io/v1",
                        "metadata": {"resourceVersion": str(10 + fake.lists)},
                        "items": fake.slices,
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def api(self) -> client.DiscoveryV1Api:
        """The real kubernetes client, pointed at this server."""
        configuration = client.Configuration(host=f"http://127.0.0.1:{self.server.server_address[1]}")
        return client.DiscoveryV1Api(client.ApiClient(configuration))


@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    fake = FakeApiServer()
    fake.thread.start()
    try:
        yield fake
    finally:
        fake.release.set()
        fake.server.shutdown()
        fake.server.server_close()


def wait_for(condition: Any, timeout: float) -> bool:
    """Polls `condition` every 50 ms for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_a_half_open_watch_is_given_up_and_the_members_listed_again(api_server: FakeApiServer) -> None:
    changes: list[list[str]] = []
    api_server.watch_events = [
        {"type": "MODIFIED", "object": endpoint_slice("s1", ["10.0.0.1", "10.0.0.2"])},
    ]
    members = KubernetesMembership(
        ME, SERVICE, "ns", "grpc", changes.append, api_server.api, watch_timeout_s=1, request_timeout_s=1.0
    )
    members.start()
    try:
        assert members.members() == [ME]
        # The watch delivers its event, then its connection goes silent for good.
        assert wait_for(lambda: members.members() == [ME, "10.0.0.2:50051"], timeout=10)
        # A third pod becomes ready; the silent watch will never say so. The read timeout (2 s) ends
        # it, and the LIST that follows finds the pod.
        api_server.slices = [endpoint_slice("s1", ["10.0.0.1", "10.0.0.2", "10.0.0.3"])]
        assert wait_for(lambda: "10.0.0.3:50051" in members.members(), timeout=15), members.members()
        assert api_server.lists >= 2
        assert wait_for(lambda: api_server.watches >= 2, timeout=10), "it watches again after listing"
        assert changes[-1] == [ME, "10.0.0.2:50051", "10.0.0.3:50051"]
    finally:
        members.stop()
    thread = members._thread
    assert thread is not None
    thread.join(timeout=10)
    assert not thread.is_alive(), "the watch thread must end within its read timeout after stop()"


def test_start_fails_instead_of_hanging_when_the_api_server_never_answers(api_server: FakeApiServer) -> None:
    api_server.answer_lists = False
    members = KubernetesMembership(ME, SERVICE, "ns", "grpc", api=api_server.api, request_timeout_s=0.5)
    started = time.monotonic()
    done: list[BaseException | None] = []

    def start() -> None:
        try:
            members.start()
            done.append(None)
        except Exception as exc:
            done.append(exc)

    runner = threading.Thread(target=start, daemon=True)
    runner.start()
    runner.join(timeout=20)
    assert done, "start() still waiting for a LIST that will never be answered"
    assert isinstance(done[0], Exception), "start() must fail (the pod restarts) rather than serve blind"
    assert api_server.lists >= 1
    assert time.monotonic() - started < 20
