"""The local broker's set-up, without starting Java."""

from __future__ import annotations

from townhall.devtools.kafka_broker import _cluster_id


def test_a_cluster_id_never_starts_with_a_dash_which_kafka_storage_would_read_as_an_option() -> None:
    ids = [_cluster_id() for _ in range(3000)]  # about 47 would start with '-' otherwise
    assert not any(i.startswith("-") for i in ids)
    assert all(len(i) == 22 for i in ids)
