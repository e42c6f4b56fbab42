"""free_port: the ports a topology is given before any of its servers binds are all different."""

from __future__ import annotations

from townhall_tools.devtools.kafka_broker import free_port


def test_ports_handed_out_one_after_another_are_all_different() -> None:
    # 500 picks from the 12,768-port range: without a memory of the ports handed out, two would match
    # (the birthday bound: all but certain), and two servers of one topology would get the same port.
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)
