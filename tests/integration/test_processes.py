"""Starting a server child process and waiting until it serves (devtools/processes.py), the one way the
topology, the benchmarks and the tests do it: a bare server (no health service) serves once it answers, a
process that exits first fails at once, one that never listens times out; stop() ends them all."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from townhall_tools.devtools.kafka_broker import free_port
from townhall_tools.devtools.processes import start_serving, stop, wait_serving


def test_a_bare_server_serves_once_it_answers(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "townhall_tools.bench.bare_join_server", "--port", str(port)]
    with open(tmp_path / "bare.log", "ab") as log:
        process = start_serving("bare", argv, {}, f"127.0.0.1:{port}", log, timeout_s=30)
    try:
        assert process.poll() is None
    finally:
        stop([process], grace_s=5)
    assert process.poll() is not None


def test_a_process_that_exits_first_fails_at_once(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "raise SystemExit(3)"]
    started = time.monotonic()
    with open(tmp_path / "exits.log", "ab") as log, pytest.raises(RuntimeError, match="exited with 3"):
        start_serving("exits", argv, {}, f"127.0.0.1:{free_port()}", log, timeout_s=30)
    assert time.monotonic() - started < 15


def test_a_process_that_never_listens_times_out_and_is_stopped(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    with open(tmp_path / "mute.log", "ab") as log:
        process = subprocess.Popen(argv, stdout=log)
    try:
        with pytest.raises(TimeoutError, match="not serving"):
            wait_serving(process, f"127.0.0.1:{free_port()}", "mute", timeout_s=1.5)
    finally:
        stop([process], grace_s=5)
    assert process.returncode is not None
