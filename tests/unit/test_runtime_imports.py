"""The runtime ships alone: every module of the `townhall` package imports without the tooling
(townhall_tools) or the packages only the CLI, the benchmarks and the tools bring (rich, psutil, av,
matplotlib); the CLI without the tooling; the client library with its extra's packages only.

Each check runs in a fresh interpreter whose import system refuses those packages, as an install of the
matching extra would: a module that imports one at its top fails here before it fails in the image."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# Only the CLI, the benchmarks and the tools need these; the tooling is its own distribution.
TOOLING = ("townhall_tools", "rich", "psutil", "av", "matplotlib")
# What the server extra adds to the client's: a client install has none of it.
SERVER_ONLY = ("aiokafka", "kubernetes", "numpy", "grpc_health", "grpc_reflection")

_CHECK = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys

    blocked, wanted, skipped = (set(a.split(",")) - {""} for a in sys.argv[1:4])


    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in blocked:
                raise ImportError(f"{name} is not installed here")
            return None


    sys.meta_path.insert(0, Refuse())
    import townhall

    names = [m.name for m in pkgutil.walk_packages(townhall.__path__, "townhall.")]
    def under(name, prefixes):
        return any(name == p or name.startswith(p + ".") for p in prefixes)


    checked = [n for n in names if under(n, wanted) and (n in wanted or not under(n, skipped))]
    failed = []
    for name in checked:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            failed.append(f"{name}: {exc}")
    print(json.dumps({"names": names, "checked": checked, "failed": failed}))
    """
)


def _run(
    blocked: tuple[str, ...], wanted: tuple[str, ...], skipped: tuple[str, ...] = ()
) -> dict[str, list[str]]:
    """Imports the modules under `wanted` (package prefixes; those under `skipped` not, unless named in
    `wanted`) with `blocked` refused: every module's name, those checked, and those that failed."""
    done = subprocess.run(
        [sys.executable, "-c", _CHECK, ",".join(blocked), ",".join(wanted), ",".join(skipped)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, list[str]] = json.loads(done.stdout)
    return result


def _imports(blocked: tuple[str, ...], wanted: tuple[str, ...]) -> list[str]:
    """The modules under `wanted` (package prefixes) that fail to import with `blocked` refused."""
    return _run(blocked, wanted)["failed"]


def test_every_runtime_module_imports_without_the_tooling() -> None:
    # Everything under townhall/ but the CLI's commands (the cli extra): the services with their entry
    # modules, core, the generated code and the client library; and the CLI's entry point, which names no
    # tooling (the tools' commands come from an entry point).
    run = _run(TOOLING, ("townhall", "townhall.cli.main"), skipped=("townhall.cli",))
    assert run["failed"] == []
    checked = set(run["checked"])
    assert {"townhall.admission.__main__", "townhall.relay.__main__", "townhall.notifier.__main__"} <= checked
    assert {"townhall.client", "townhall.live", "townhall.cli.main", "townhall.core.server"} <= checked
    # The tooling is in no subpackage of the runtime.
    tooling = ("townhall.bench", "townhall.faults", "townhall.devtools")
    assert not any(n.startswith(tooling) for n in run["names"])


def test_the_cli_imports_without_the_tooling() -> None:
    assert _imports(tuple(m for m in TOOLING if m not in ("rich", "av")), ("townhall.cli",)) == []


def test_the_client_library_imports_with_the_client_extra_only() -> None:
    assert _imports((*TOOLING, *SERVER_ONLY), ("townhall.client", "townhall.live")) == []


def test_a_module_that_imports_tooling_is_caught() -> None:
    # The check itself: refusing a package the runtime does import makes its importers fail.
    assert any(f.startswith("townhall.core.kafka:") for f in _imports(("aiokafka",), ("townhall.core",)))
