#!/bin/bash
# Describes the KRaft controller quorum.
exec "$(dirname "$0")/kafka-run-class.sh" org.apache.kafka.tools.MetadataQuorumCommand "$@"
