"""The `townhall` command: its own commands always, the tools' (dev, demo, kafka, loadtest, faults, bench)
only where townhall-tools registers them through the `townhall.commands` entry point."""

from __future__ import annotations

import argparse

import pytest

from townhall.cli import main as cli

TOOLS = {"dev", "demo", "kafka", "loadtest", "faults", "bench"}
OWN = {
    "token",
    "certs",
    "room",
    "follow",
    "unfollow",
    "followers",
    "inbox",
    "speak",
    "listen",
    "mod",
    "graph",
    "keys",
    "status",
}


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    sub = next(a for a in parser._actions if a.dest == "command")
    return set(sub.choices or ())


def test_the_tools_commands_come_from_the_installed_entry_point() -> None:
    parser = cli._parser()
    assert _commands(parser) >= OWN | TOOLS
    assert parser.parse_args(["bench", "--seconds", "2"]).run.__module__ == "townhall_tools.cli.commands"


def test_without_the_tools_only_the_own_commands_and_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "entry_points", lambda group: [])
    parser = cli._parser()
    assert _commands(parser) == OWN
    assert "make setup" in (parser.epilog or "")
    with pytest.raises(SystemExit):
        parser.parse_args(["dev"])
