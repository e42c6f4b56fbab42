"""Townhall's tooling, not the service: the local topology, benchmarks, fault runs and load generators."""
