#!/bin/bash
# Describes and upgrades the cluster's feature levels (metadata.version).
exec "$(dirname "$0")/kafka-run-class.sh" org.apache.kafka.tools.FeatureCommand "$@"
