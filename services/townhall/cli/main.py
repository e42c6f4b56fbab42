"""`townhall`: rooms, follows, notifications, audio, moderation, the follow graph and keys from a shell;
with the tools installed (`make setup`), also the local topology, demo, load tests, faults, benchmarks."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TypeAlias

from townhall.core import logging
from townhall.core.config import LogConfig

DEFAULT_ROOT = Path(".townhall")
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="townhall", description=__doc__)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="local state folder (.townhall)")
    parser.add_argument(
        "--admission", help="admission host:port[,host:port...] (default: every one in topology.json)"
    )
    parser.add_argument("--notifier", help="notifier host:port (default: from topology.json)")
    parser.add_argument(
        "--crowd",
        help="admission's crowd lane host:port, for rooms that draw a crowd (default: topology.json)",
    )
    parser.add_argument("--config", help="TOML config with keys and TLS (else $TOWNHALL_CONFIG, TOWNHALL_*)")
    parser.add_argument(
        "--token", help="a user token to call with (default: one minted with the development key)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print what read commands show as JSON (get, list, status, ...)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    token = sub.add_parser("token", help="print a user token signed with the development key (auth.keys)")
    token.add_argument("--user", type=int, required=True, help="the user id (sub)")
    token.add_argument(
        "--grants", default="host,moderate,publish,subscribe", help="comma-separated grants (default: all)"
    )
    token.add_argument("--ttl-s", type=float, default=3600.0, help="lifetime in seconds")

    certs = sub.add_parser(
        "certs", help="write a throwaway CA and a certificate for local TLS; print the env"
    )
    certs.add_argument("folder", type=Path, help="where to write ca.pem, townhall.pem, townhall-key.pem")
    certs.add_argument(
        "--name", default="townhall.local", help="the name in the certificate (tls.server_name)"
    )

    room = sub.add_parser("room", help="create, schedule, start, end, get, list or watch rooms")
    room.add_argument("action", choices=("create", "schedule", "start", "end", "get", "list", "watch"))
    room.add_argument("arg", nargs="?", help="title (create) or room id (schedule, start, end, get, watch)")
    room.add_argument("--user", type=int, required=True, help="your user id")
    room.add_argument("--speaker", type=int, action="append", default=[], help="speaker id (create)")
    room.add_argument(
        "--seconds", type=float, default=0.0, help="watch: stop after this long (0: until it ends)"
    )
    room.add_argument(
        "--at", help="schedule: when it starts, ISO 8601 (2026-12-24T18:00, local time unless it says)"
    )
    room.add_argument("--in-s", type=float, help="schedule: it starts this many seconds from now")

    follow = sub.add_parser("follow", help="follow a user")
    follow.add_argument("followee", type=int)
    follow.add_argument("--user", type=int, required=True, help="your user id")

    unfollow = sub.add_parser("unfollow", help="stop following a user")
    unfollow.add_argument("followee", type=int)
    unfollow.add_argument("--user", type=int, required=True, help="your user id")

    followers = sub.add_parser("followers", help="your followers: how many, and the first --limit ids")
    followers.add_argument("--user", type=int, required=True, help="your user id")
    followers.add_argument("--limit", type=int, default=100, help="ids to show, 0..100000 (default 100)")

    inbox = sub.add_parser("inbox", help="print your notifications as they arrive")
    inbox.add_argument("--user", type=int, required=True, help="your user id")
    inbox.add_argument("--seconds", type=float, default=60.0, help="stop after this long")
    inbox.add_argument(
        "--resume",
        default="",
        metavar="CURSOR",
        help="first show what was sent since this cursor (printed at exit)",
    )

    speak = sub.add_parser("speak", help="join a room and speak an audio file into it (Opus)")
    speak.add_argument("file", type=Path, help="any audio file PyAV reads (WAV, MP3, OGG...)")
    speak.add_argument("--room", required=True)
    speak.add_argument("--user", type=int, required=True, help="your user id (host or speaker)")

    listen = sub.add_parser("listen", help="join a room and record what you hear to a WAV file")
    listen.add_argument("--room", required=True)
    listen.add_argument("--user", type=int, required=True, help="your user id")
    listen.add_argument("--out", type=Path, required=True, help="WAV file to write")
    listen.add_argument("--seconds", type=float, default=30.0, help="stop after this long")

    from townhall.cli import graph, keys, moderation, status

    moderation.add_parser(sub)
    status.add_parser(sub)
    graph.add_parser(sub)
    keys.add_parser(sub)

    tools = _tool_commands(sub)
    if not tools:
        parser.epilog = (
            "dev, demo, kafka, loadtest, faults and bench come with Townhall's tools (townhall-tools, "
            "installed by `make setup`)"
        )
    accept_globals_after_commands(parser)
    return parser


def _tool_commands(sub: Subparsers) -> list[str]:
    """Adds the commands of every installed `townhall.commands` entry point (townhall-tools: dev, demo,
    bench, ...); the runtime package itself names no tooling. The names of those found."""
    found = entry_points(group="townhall.commands")
    for point in found:
        point.load()(sub)
    return [point.name for point in found]


def accept_globals_after_commands(parser: argparse.ArgumentParser) -> None:
    """Lets every command (and sub-command) take the global flags after its name too, as in
    `townhall room get X --admission host:port --json`. Where a command has a flag of the same name
    (`dev --admission N`: how many processes), the command's own flag is the one it takes."""
    shared = [a for a in parser._actions if a.option_strings and a.dest != "help"]

    def visit(command: argparse.ArgumentParser) -> None:
        for action in command._actions:
            if not isinstance(action, argparse._SubParsersAction):
                continue
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                group = child.add_argument_group("global flags (also before the command)")
                for flag in shared:
                    if any(name in child._option_string_actions for name in flag.option_strings):
                        continue
                    # SUPPRESS: a flag not repeated after the command keeps the value given before it.
                    kwargs: dict[str, Any] = {
                        "dest": flag.dest,
                        "default": argparse.SUPPRESS,
                        "help": flag.help,
                    }
                    if isinstance(flag, argparse._StoreTrueAction):
                        kwargs["action"] = "store_true"
                    else:
                        kwargs.update(type=flag.type, metavar=flag.metavar)
                    group.add_argument(*flag.option_strings, **kwargs)
                visit(child)

    visit(parser)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `townhall` command."""
    try:
        parser = _parser()
    except ModuleNotFoundError as exc:  # a server-only install (the image): no rich, no av
        sys.exit(
            f"townhall: {exc.name} is missing; the command needs the cli extra: pip install 'townhall[cli]'"
        )
    args = parser.parse_args(argv)
    logging.configure(LogConfig(level="warning", json=False), "cli")
    if args.command == "token":
        from townhall.cli.manual import print_token

        sys.exit(print_token(args))
    if args.command == "certs":
        from townhall.core.certs import Authority

        ca = Authority(args.folder)
        pem = ca.issue("townhall", dns=(args.name, "localhost"), ips=("127.0.0.1",))
        for key, value in (
            ("ENABLED", "true"), ("CERT", pem.cert.resolve()), ("KEY", pem.key.resolve()),
            ("CA", ca.ca.resolve()), ("SERVER_NAME", args.name),
        ):  # fmt: skip
            print(f"export TOWNHALL_TLS_{key}={value}")
        print("# and TOWNHALL_TLS_REQUIRE_CLIENT_CERT=true for mutual TLS")
        sys.exit(0)
    if args.command == "keys":
        from townhall.cli import keys as keys_cli

        sys.exit(keys_cli.run(args))
    if args.command == "graph":
        from townhall.cli import graph as graph_cli

        sys.exit(graph_cli.run(args))
    if args.command == "status":
        from townhall.cli import status as status_cli

        sys.exit(status_cli.run(args))
    if hasattr(args, "run"):  # a command that says what runs it: the tools' commands
        sys.exit(args.run(args))
    from townhall.cli import manual

    sys.exit(manual.run(args))


if __name__ == "__main__":
    main()
