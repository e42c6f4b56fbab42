#!/bin/bash
# Runs a Kafka main class from the jars in <KAFKA_HOME>/libs (deploy/kafka/pom.xml's, fetched by Maven): the
# part of Apache Kafka's kafka-run-class.sh that the chart and apache/kafka's users rely on.
#   kafka-run-class.sh CLASS [ARGS...]
# Honours KAFKA_HEAP_OPTS, KAFKA_JVM_PERFORMANCE_OPTS, KAFKA_LOG4J_OPTS, KAFKA_OPTS, KAFKA_JMX_OPTS (with
# JMX_PORT), LOG_DIR, CLASSPATH and JAVA_HOME. The defaults suit the command-line tools: a small heap and a
# quick start (C1 only); kafka-server-start.sh sets the broker's.
set -euo pipefail
base_dir=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 1 ]; then
  echo "usage: $0 CLASS [ARGS...]" >&2
  exit 1
fi

# Only a log4j config of your own writes files here (the image's log to the console); the root
# filesystem may be read-only, so it is not an error if the folder cannot be made.
LOG_DIR=${LOG_DIR:-$base_dir/logs}
mkdir -p "$LOG_DIR" 2>/dev/null || true

heap=${KAFKA_HEAP_OPTS:--Xmx256M}
perf=${KAFKA_JVM_PERFORMANCE_OPTS:--XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true}
log4j=${KAFKA_LOG4J_OPTS:--Dlog4j.configuration=file:$base_dir/config/tools-log4j.properties}
jmx=${KAFKA_JMX_OPTS:-}
if [ -n "${JMX_PORT:-}" ]; then
  jmx="${jmx:--Dcom.sun.management.jmxremote -Dcom.sun.management.jmxremote.authenticate=false -Dcom.sun.management.jmxremote.ssl=false} -Dcom.sun.management.jmxremote.port=$JMX_PORT"
fi
java=java
if [ -n "${JAVA_HOME:-}" ]; then
  java=$JAVA_HOME/bin/java
fi

# The option variables hold several words each: split on purpose, as kafka-run-class.sh does.
# shellcheck disable=SC2086
exec "$java" $heap $perf $jmx $log4j "-Dkafka.logs.dir=$LOG_DIR" ${KAFKA_OPTS:-} \
  -cp "$base_dir/libs/*${CLASSPATH:+:$CLASSPATH}" "$@"
