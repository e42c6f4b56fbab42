"""Chart-rendering fixtures: the real helm binary (built from source when missing) and rendered scenarios."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.chart.helpers import Manifest, build_tool, run_helm, template_args


@pytest.fixture(scope="session")
def helm() -> Path:
    """The helm binary in .cache/bin, built from source with the Go toolchain if it is not there yet."""
    return build_tool("helm")


@pytest.fixture(scope="session")
def render(helm: Path) -> Callable[..., list[Manifest]]:
    """render(scenario, *flags) -> the rendered manifests; fails the test on a helm error."""
    cache: dict[tuple[str | None, tuple[str, ...]], list[Manifest]] = {}

    def _render(scenario: str | None, *extra: str) -> list[Manifest]:
        key = (scenario, extra)
        if key not in cache:
            result = run_helm(helm, *template_args(scenario, *extra))
            if result.returncode != 0:
                pytest.fail(f"helm template {scenario} {extra} failed:\n{result.stderr}")
            cache[key] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        return cache[key]

    return _render
