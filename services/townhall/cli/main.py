"""`townhall`: one command for the local topology, the demo, manual use and benchmarks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from townhall.core import logging
from townhall.core.config import LogConfig

DEFAULT_ROOT = Path(".townhall")


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

    dev = sub.add_parser("dev", help="start Kafka and the services locally; Ctrl-C stops them")
    dev.add_argument("--admission", type=int, default=1, help="admission processes")
    dev.add_argument("--relays", type=int, default=1, help="relay processes")
    dev.add_argument("--notifiers", type=int, default=1, help="notifier processes")
    dev.add_argument(
        "--crowd", type=int, default=1, help="admission processes of the crowd lane (own no rooms; 0: none)"
    )
    dev.add_argument("--ports", choices=("fixed", "auto"), default="fixed", help="fixed or free ports")
    dev.add_argument("--run-demo", action="store_true", help="run the demo, stop, exit with its status")

    demo = sub.add_parser("demo", help="run the scripted celebrity-room demo against `townhall dev`")
    demo.add_argument("--followers", type=int, default=20, help="followers, all connected to Inbox")
    demo.add_argument("--listeners", type=int, default=20, help="listeners that join and subscribe")
    demo.add_argument("--audio", type=Path, help="audio file to speak (default: a generated voice)")

    sub.add_parser("kafka", help="run the local Kafka broker in the foreground")

    room = sub.add_parser("room", help="create, start, end, get or list rooms")
    room.add_argument("action", choices=("create", "start", "end", "get", "list"))
    room.add_argument("arg", nargs="?", help="title (create) or room id (start, end, get)")
    room.add_argument("--user", type=int, required=True, help="your user id")
    room.add_argument("--speaker", type=int, action="append", default=[], help="speaker id (create)")

    follow = sub.add_parser("follow", help="follow a user")
    follow.add_argument("followee", type=int)
    follow.add_argument("--user", type=int, required=True, help="your user id")

    inbox = sub.add_parser("inbox", help="print your notifications as they arrive")
    inbox.add_argument("--user", type=int, required=True, help="your user id")
    inbox.add_argument("--seconds", type=float, default=60.0, help="stop after this long")

    speak = sub.add_parser("speak", help="join a room and speak an audio file into it (Opus)")
    speak.add_argument("file", type=Path, help="any audio file PyAV reads (WAV, MP3, OGG...)")
    speak.add_argument("--room", required=True)
    speak.add_argument("--user", type=int, required=True, help="your user id (host or speaker)")

    listen = sub.add_parser("listen", help="join a room and record what you hear to a WAV file")
    listen.add_argument("--room", required=True)
    listen.add_argument("--user", type=int, required=True, help="your user id")
    listen.add_argument("--out", type=Path, required=True, help="WAV file to write")
    listen.add_argument("--seconds", type=float, default=30.0, help="stop after this long")

    from townhall.cli import graph, keys, moderation

    moderation.add_parser(sub)
    graph.add_parser(sub)
    keys.add_parser(sub)

    from townhall.cli import loadtest

    loadtest.add_parser(sub)

    from townhall.cli import faults

    faults.add_parser(sub)

    bench = sub.add_parser("bench", help="run the benchmarks; figures on screen, JSON in --out")
    bench.add_argument("--out", type=Path, default=DEFAULT_ROOT / "bench")
    bench.add_argument("--listeners", type=int, nargs="+", default=[100, 500, 1000, 2000])
    bench.add_argument("--seconds", type=float, default=10.0, help="measured seconds per step")
    bench.add_argument("--storm-seconds", type=float, default=60.0, help="join storm: seconds per phase")
    bench.add_argument("--followers", type=int, default=10_000_000, help="notify: the celebrity's followers")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `townhall` command."""
    args = _parser().parse_args(argv)
    logging.configure(LogConfig(level="warning", json=False), "cli")
    if args.command == "token":
        from townhall.cli.manual import print_token

        sys.exit(print_token(args))
    if args.command == "certs":
        from townhall.devtools.certs import Authority

        ca = Authority(args.folder)
        pem = ca.issue("townhall", dns=(args.name, "localhost"), ips=("127.0.0.1",))
        for key, value in (
            ("ENABLED", "true"), ("CERT", pem.cert.resolve()), ("KEY", pem.key.resolve()),
            ("CA", ca.ca.resolve()), ("SERVER_NAME", args.name),
        ):  # fmt: skip
            print(f"export TOWNHALL_TLS_{key}={value}")
        print("# and TOWNHALL_TLS_REQUIRE_CLIENT_CERT=true for mutual TLS")
        sys.exit(0)
    if args.command == "dev":
        from townhall.cli.dev import run_dev

        sys.exit(run_dev(args))
    if args.command == "demo":
        from townhall.cli.demo import run_demo

        manifest = args.root / "topology.json"
        sys.exit(
            run_demo(
                manifest,
                args.followers,
                args.listeners,
                args.audio,
                args.admission,
                args.notifier,
                args.crowd,
                args.config,
            )
        )
    if args.command == "kafka":
        from townhall.cli.dev import run_kafka

        sys.exit(run_kafka(args.root))
    if args.command == "keys":
        from townhall.cli import keys as keys_cli

        sys.exit(keys_cli.run(args))
    if args.command == "graph":
        from townhall.cli import graph as graph_cli

        sys.exit(graph_cli.run(args))
    if args.command == "loadtest":
        from townhall.cli import loadtest as loadtest_cli

        sys.exit(loadtest_cli.run(args))
    if args.command == "faults":
        from townhall.cli import faults as faults_cli

        sys.exit(faults_cli.run(args))
    if args.command == "bench":
        from townhall.cli.bench import run_bench

        sys.exit(run_bench(args))
    from townhall.cli import manual

    sys.exit(manual.run(args))


if __name__ == "__main__":
    main()
