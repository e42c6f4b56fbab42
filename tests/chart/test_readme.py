"""The chart's README stays true: its values table says what values.yaml and the schema say."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from tests.chart.helpers import CHART

README = CHART / "README.md"
ROW = re.compile(r"^\| `([^`]+)` \| `([^`]*)` \| (.+) \|$")


def table(text: str) -> dict[str, str]:
    """key -> default (YAML text) of every row between the values-table markers."""
    start = text.index("<!-- values-table")
    end = text.index("<!-- end of values-table -->")
    lines = text[start:end].splitlines()[1:]
    assert lines[:2] == ["| key | default | what |", "|---|---|---|"], lines[:2]
    rows = {}
    for line in lines[2:]:
        found = ROW.match(line)
        assert found, f"not a | `key` | `default` | what | row: {line}"
        assert found.group(1) not in rows, f"{found.group(1)} twice"
        rows[found.group(1)] = found.group(2)
    return rows


def lookup(tree: Any, key: str) -> Any:
    """The value at a dotted key; KeyError if a part is missing."""
    for part in key.split("."):
        tree = tree[part]
    return tree


def schema_has(schema: dict[str, Any], key: str) -> bool:
    """Whether the schema takes a dotted key: it names every part, or leaves an object open below one."""
    for part in key.split("."):
        if "properties" not in schema and schema.get("additionalProperties", True) is not False:
            return True  # a free-form object (a securityContext, annotations)
        properties = schema.get("properties", {})
        if part not in properties:
            return False
        schema = properties[part]
    return True


ROWS = table(README.read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())


@pytest.mark.parametrize(("key", "default"), ROWS.items(), ids=list(ROWS))
def test_every_row_is_a_key_of_values_yaml_with_its_default(key: str, default: str) -> None:
    try:
        actual = lookup(VALUES, key)
    except (KeyError, TypeError):
        pytest.fail(f"{key} is not in values.yaml")
    assert yaml.safe_load(default) == actual, f"{key}: README says {default}, values.yaml has {actual!r}"
    assert schema_has(SCHEMA, key), f"{key} is not in values.schema.json"


def test_every_section_of_values_yaml_has_a_row() -> None:
    documented = {key.split(".")[0] for key in ROWS}
    assert set(VALUES) - documented == set()


def test_the_alerts_the_readme_names_exist() -> None:
    rules = yaml.safe_load((CHART / "files" / "rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    named = set(re.findall(r"`(Townhall[A-Z]\w+)`", README.read_text()))
    assert named and named <= alerts


def test_the_table_checker_catches_a_wrong_default() -> None:
    text = README.read_text().replace("| `admission.replicas` | `2` |", "| `admission.replicas` | `3` |")
    assert table(text)["admission.replicas"] == "3" != str(VALUES["admission"]["replicas"])
