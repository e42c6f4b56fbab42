"""The README's architecture diagram: the same text as its source, and true to the code's Kafka topics.

docs/architecture.mmd is the source; README.md carries a copy in a ```mermaid block (GitHub renders it).
Its topic nodes and the arrows into and out of them are checked against Topics.access(), the table the
broker's ACLs are granted from, so a topic added or a reader changed in the code fails here until the
picture follows.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
from pathlib import Path
from types import ModuleType

import pytest

from townhall.core.kafka import Topics
from townhall.core.provenance import ADMISSION, NOTIFIER, RELAY

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "docs" / "architecture.mmd"
PREFIX = "townhall"
# A node: id, then a shape's opening bracket and a quoted label.
NODE = re.compile(r'^\s*(\w+)(?:\[/|\[\(|\(\[|\[)"(.*?)"')
LABELLED = re.compile(r'\s*(?:--|==|-\.)\s*"[^"]*"\s*(-->|==>|\.->)')
ARROW = re.compile(r"\s*(?:-->|==>|-\.->)\s*")
SERVICE = re.compile(r"^<b>(\w+)</b>")


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("readme_diagram", REPO / "deploy/tools/readme_diagram.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _graph(source: str) -> tuple[dict[str, str], set[tuple[str, str]]]:
    """Node id -> label, and every arrow (from, to), of a flowchart written as docs/architecture.mmd is."""
    nodes: dict[str, str] = {}
    arrows: set[tuple[str, str]] = set()
    for raw in source.splitlines():
        line = raw.strip()
        if not line or line.startswith(("%%", "flowchart", "classDef", "class ")):
            continue
        if node := NODE.match(line):
            nodes[node[1]] = node[2]
            continue
        # `a -- "label" --> b` reads as `a --> b`; `a & b --> c --> d` is four arrows.
        steps = [step.split("&") for step in ARROW.split(LABELLED.sub(r" \1 ", line))]
        assert len(steps) > 1, f"not a node or an arrow: {raw!r}"
        for sources, targets in itertools.pairwise(steps):
            arrows |= {(a.strip(), b.strip()) for a in sources for b in targets}
    return nodes, arrows


def test_readme_block_is_the_source() -> None:
    tool = _tool()
    readme = (REPO / "README.md").read_text()
    assert tool.embedded(readme) == tool.block(SOURCE.read_text()), "run `make diagram`"


def test_sync_replaces_only_the_block() -> None:
    tool = _tool()
    old, new = "flowchart TB\n  a --> b", "flowchart TB\n  a --> c\n"
    fresh = tool.synced(f"# T\n\nbefore\n\n{tool.block(old)}\n\nafter\n", new)
    assert fresh == f"# T\n\nbefore\n\n{tool.block(new)}\n\nafter\n"
    with pytest.raises(ValueError, match="no diagram block"):
        tool.synced("# no block\n", "flowchart TB\n")


def test_every_arrow_joins_declared_nodes() -> None:
    nodes, arrows = _graph(SOURCE.read_text())
    assert arrows
    assert {end for arrow in arrows for end in arrow} <= set(nodes)


def test_topics_with_their_writers_and_readers_as_in_the_code() -> None:
    nodes, arrows = _graph(SOURCE.read_text())
    service = {node: m[1] for node, label in nodes.items() if (m := SERVICE.match(label))}
    assert set(service.values()) == {ADMISSION, RELAY, NOTIFIER}
    # Topic nodes are parallelograms ([/"..."/]); one node may stand for two topics (the fan-out lanes).
    topics = {
        name: node
        for node, label in nodes.items()
        if f'{node}[/"' in SOURCE.read_text()
        for name in label.split("<br/>")
    }
    names = Topics(PREFIX)
    assert {f"{PREFIX}.{name}" for name in topics} == set(names.all())
    drawn: dict[str, tuple[set[str], set[str]]] = {s: (set(), set()) for s in (ADMISSION, RELAY, NOTIFIER)}
    for a, b in arrows:
        if b in topics.values() and a in service:
            drawn[service[a]][0].update(f"{PREFIX}.{n}" for n, node in topics.items() if node == b)
        if a in topics.values() and b in service:
            drawn[service[b]][1].update(f"{PREFIX}.{n}" for n, node in topics.items() if node == a)
    expected = {s: (set(writes), set(reads)) for s, (writes, reads) in names.access().items()}
    assert drawn == expected
