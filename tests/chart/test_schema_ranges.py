"""The chart's schema never admits a config value the processes refuse: where values.schema.json bounds
a config key, its bounds lie within the range core/config.py declares next to the field."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from tests.chart.helpers import CHART
from townhall.core.config import Config, Range, declared_ranges

SERVICES = ("admission", "relay", "notifier")


def declared() -> dict[str, Range]:
    """section.key -> the Range core/config.py declares for it."""
    return {
        f"{section.name}.{name}": declared
        for section in dataclasses.fields(Config)
        for name, declared in declared_ranges(section.default_factory).items()
    }


def bounded_in_schema() -> list[tuple[str, dict[str, Any]]]:
    """(section.key, its schema) for every config key the schema gives a numeric bound."""
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]
    sections = {name: spec for name, spec in schema["config"]["properties"].items()}
    sections.update({name: schema[name]["properties"]["config"] for name in SERVICES})
    rows = []
    for section, spec in sorted(sections.items()):
        for key, prop in sorted(spec.get("properties", {}).items()):
            if {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & set(prop):
                rows.append((f"{section}.{key}", prop))
    return rows


@pytest.mark.parametrize(("key", "prop"), bounded_in_schema(), ids=[k for k, _ in bounded_in_schema()])
def test_schema_bounds_lie_within_the_declared_range(key: str, prop: dict[str, Any]) -> None:
    ranges = declared()
    assert key in ranges, f"{key} is bounded in the chart's schema but declares no Range in core/config.py"
    declared_range = ranges[key]
    low = declared_range.low if not isinstance(declared_range.low, str) else None
    high = declared_range.high if not isinstance(declared_range.high, str) else None
    lowest = prop.get("minimum", prop.get("exclusiveMinimum"))
    zero_allowed = declared_range.zero is not None
    if low is not None and not (zero_allowed and lowest == 0):
        assert lowest is not None, f"{key}: the schema admits values below {low}"
        if declared_range.open_low:
            assert lowest > low or ("exclusiveMinimum" in prop and lowest >= low), f"{key}: admits {low}"
        else:
            assert lowest >= low, f"{key}: the schema admits {lowest}, the process refuses below {low}"
    if high is not None:
        highest = prop.get("maximum", prop.get("exclusiveMaximum"))
        assert highest is not None and highest <= high, f"{key}: the schema admits above {high}"
