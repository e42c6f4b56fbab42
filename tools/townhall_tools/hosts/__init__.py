"""Townhall on many hosts: every process in a container of its own (its own address, CPU quota and memory
limit) on one Docker network, a 3-broker KRaft Kafka, and network partitions and host loss (docs/hosts.md)."""
