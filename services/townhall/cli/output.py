"""What the read commands print: a table or coloured JSON for a person, one line of JSON with --json."""

from __future__ import annotations

import argparse
import json
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console

console = Console()


def as_json(data: Any) -> Any:
    """`data` with every protobuf message in it as the dict its JSON mapping gives (camelCase names)."""
    if isinstance(data, Message):
        return MessageToDict(data)
    if isinstance(data, list | tuple):
        return [as_json(item) for item in data]
    if isinstance(data, dict):
        return {key: as_json(value) for key, value in data.items()}
    return data


def print_json(data: Any) -> None:
    """One line of plain JSON on stdout (flushed: a stream of lines reaches a pipe as it comes)."""
    print(json.dumps(as_json(data), separators=(",", ":")), flush=True)


def emit(args: argparse.Namespace, data: Any) -> None:
    """`data` as one line of JSON with --json, else as coloured, indented JSON."""
    if getattr(args, "json", False):
        print_json(data)
    else:
        console.print_json(data=as_json(data))
