"""The project's own KRaft broker helper (devtools/kafka_broker.py)."""

from __future__ import annotations

from pathlib import Path

from townhall_tools.devtools.kafka_broker import Broker, free_port


def test_storage_formats_for_a_cluster_id_that_starts_with_a_dash(tmp_path: Path) -> None:
    """One random urlsafe cluster id in 32 starts with "-"; the format tool must not read it as an option."""
    broker = Broker(tmp_path / "kafka", port=free_port())
    broker.data_dir.mkdir(parents=True)
    broker.format("-" + "A" * 21, broker._properties())
    meta = (broker.data_dir / "logs" / "meta.properties").read_text()
    assert "cluster.id=-AAAAAAAAAAAAAAAAAAAAA" in meta
