"""`townhall keys`: a fresh set of keys for a deployment (no key is ever a default)."""

from __future__ import annotations

import argparse
import datetime
import json
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

from townhall.core.certs import Authority
from townhall.core.kafka import KAFKA_ADMIN, KAFKA_SERVICES
from townhall.core.tokens import new_es256


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Registers `keys`."""
    keys = sub.add_parser(
        "keys", help="print a fresh set of keys (service credentials, tickets, user tokens) for a deployment"
    )
    keys.add_argument("--kid", default="k1", help="the key id of every key (rotate with a new one: k2, ...)")
    keys.add_argument(
        "--helm", action="store_true", help="as Helm values (keys:) instead of TOWNHALL_* lines"
    )
    keys.add_argument(
        "--kafka-host",
        metavar="HOST",
        help="with --helm, also the bundled Kafka broker's users and certificate (kafka:) for its Service "
        "name HOST, e.g. <release>-kafka.<namespace>.svc.cluster.local",
    )
    keys.add_argument(
        "--no-user-keys",
        action="store_true",
        help="leave out the HS256 user token key (tokens come from a JWKS)",
    )


def fresh(kid: str, user_keys: bool = True) -> dict[str, str]:
    """New KID=KEY entries: HS256 secrets (user tokens, service credentials), an ES256 ticket key pair."""
    seed, public = new_es256()
    made = {
        "auth.service_keys": f"{kid}={secrets.token_urlsafe(36)}",
        "tickets.private_key": f"{kid}={seed}",
        "tickets.public_keys": f"{kid}={public}",
    }
    if user_keys:
        made["auth.keys"] = f"{kid}={secrets.token_urlsafe(36)}"
    return made


def chart_values(host: str, valid_days: int = 3650) -> dict[str, dict[str, Any]]:
    """The chart's `kafka:` secrets for a bundled broker reached at `host` (its Service name): a password
    per user (letters and digits) and a CA with the broker's certificate (PEM; the key PKCS#8)."""
    with tempfile.TemporaryDirectory() as folder:
        ca = Authority(Path(folder), "Townhall Kafka CA", datetime.timedelta(days=valid_days))
        short = host.split(".")
        names = tuple(
            dict.fromkeys([host, *(".".join(short[:n]) for n in range(1, len(short))), "localhost"])
        )
        pem = ca.issue("kafka-broker", dns=names, ips=("127.0.0.1",))
        tls = {"ca": ca.ca.read_text(), "cert": pem.cert.read_text(), "key": pem.key.read_text()}
    passwords = {user: secrets.token_hex(24) for user in (KAFKA_ADMIN, *KAFKA_SERVICES)}
    return {"users": {"passwords": passwords}, "tls": tls}


def run(args: argparse.Namespace) -> int:
    """Prints the keys: `TOWNHALL_*=...` lines, or the chart's `keys:` values."""
    made = fresh(args.kid, not args.no_user_keys)
    if args.helm:
        values = {
            "auth": [made["auth.keys"]] if "auth.keys" in made else [],
            "service": [made["auth.service_keys"]],
            "tickets": {
                "privateKey": made["tickets.private_key"],
                "publicKeys": [made["tickets.public_keys"]],
            },
        }
        print("# Townhall keys: keep this file secret (a sealed or encrypted Secret, not plain Git).")
        print("keys:")
        for name, value in values.items():
            print(f"  {name}: {json.dumps(value)}")
        if args.kafka_host:
            kafka = chart_values(args.kafka_host)
            print("kafka:")
            print(f"  users:\n    passwords: {json.dumps(kafka['users']['passwords'])}")
            print(f"  tls: {json.dumps(kafka['tls'])}")
        return 0
    if args.kafka_host:
        print("townhall keys: --kafka-host goes with --helm (the chart's kafka: values)", file=sys.stderr)
        return 2
    print("# Townhall keys: keep them secret. Admission needs every one; relays only the service and")
    print("# ticket public keys; notifiers the user and service keys (deploy/README.md, Keys).")
    for key, value in made.items():
        print(f"TOWNHALL_{key.replace('.', '_').upper()}={value}")
    return 0
