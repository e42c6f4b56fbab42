"""Local tooling: the Kafka broker from Apache's jars, the multi-process dev topology, its processes, kind."""
