"""Network partitions between containers: iptables DROP rules inside a container's own network namespace
(`nsenter -t PID -n iptables`, the host's iptables binary; the images need none and no capability).

Every rule lives in one chain of our own, TOWNHALL-CUT, jumped to from INPUT and OUTPUT, so healing is one
flush whatever was cut, and `heal_all` undoes anything a crashed run left behind. Cuts are bounded in time by
`hold_cut`, which heals in a `finally`. Needs root (as Docker itself does).
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterable

from townhall_tools.hosts.cluster import Cluster, Host

CHAIN = "TOWNHALL-CUT"
# The longest any cut may last, whatever a caller asks: a partition that never heals is a bug of the harness.
MAX_CUT_S = 120.0


def _iptables(cluster: Cluster, host: Host, *args: str, check: bool = True) -> int:
    done = subprocess.run(
        ["nsenter", "-t", str(cluster.pid(host)), "-n", "iptables", "-w", "5", *args],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"iptables {' '.join(args)} in {host.name}: {done.stderr.strip()}")
    return done.returncode


def _chain(cluster: Cluster, host: Host) -> None:
    """Creates the chain and its two jumps once."""
    if _iptables(cluster, host, "-nL", CHAIN, check=False) != 0:
        _iptables(cluster, host, "-N", CHAIN)
    for hook in ("INPUT", "OUTPUT"):
        if _iptables(cluster, host, "-C", hook, "-j", CHAIN, check=False) != 0:
            _iptables(cluster, host, "-I", hook, "1", "-j", CHAIN)


def cut(cluster: Cluster, host: Host, peers: Iterable[str]) -> None:
    """Drops every packet between `host` and each peer address (both directions, any protocol)."""
    _chain(cluster, host)
    for ip in peers:
        _iptables(cluster, host, "-A", CHAIN, "-s", ip, "-j", "DROP")
        _iptables(cluster, host, "-A", CHAIN, "-d", ip, "-j", "DROP")


def heal(cluster: Cluster, host: Host) -> None:
    """Removes every cut of `host` (flushes the chain; a container without it has nothing to heal)."""
    if cluster.running(host):
        _iptables(cluster, host, "-F", CHAIN, check=False)


def heal_all(cluster: Cluster) -> None:
    """Heals every running container."""
    for host in cluster.hosts:
        heal(cluster, host)


async def hold_cut(cluster: Cluster, cuts: dict[Host, list[str]], hold_s: float) -> None:
    """Cuts each host from its peers' addresses for `hold_s` seconds (at most MAX_CUT_S), then heals every one
    of them, also when cancelled or when a cut fails half-way."""
    if not 0 < hold_s <= MAX_CUT_S:
        raise ValueError(f"a cut lasts 0..{MAX_CUT_S:.0f} s, not {hold_s}")
    try:
        for host, peers in cuts.items():
            await asyncio.to_thread(cut, cluster, host, peers)
        await asyncio.sleep(hold_s)
    finally:
        for host in cuts:
            await asyncio.to_thread(heal, cluster, host)
