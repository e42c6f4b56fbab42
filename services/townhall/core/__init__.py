"""What every Townhall service shares: config, logs, metrics, server lifecycle, Kafka, tickets."""
