#!/bin/bash
# Starts a broker (and/or controller): kafka-server-start.sh server.properties [--override key=value ...].
# Logs to the console with config/log4j.properties; heap and GC as Apache Kafka's script sets them.
set -euo pipefail
base_dir=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 1 ] || [ "$1" = -daemon ]; then
  echo "usage: $0 server.properties [--override property=value]* (runs in the foreground)" >&2
  exit 1
fi
export KAFKA_HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xmx1G -Xms1G}
export KAFKA_JVM_PERFORMANCE_OPTS=${KAFKA_JVM_PERFORMANCE_OPTS:--server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -Djava.awt.headless=true}
export KAFKA_LOG4J_OPTS=${KAFKA_LOG4J_OPTS:--Dlog4j.configuration=file:$base_dir/config/log4j.properties}
exec "$base_dir/bin/kafka-run-class.sh" kafka.Kafka "$@"
