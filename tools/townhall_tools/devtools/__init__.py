"""Local tooling: the Kafka broker from Apache's jars and the multi-process dev topology."""
