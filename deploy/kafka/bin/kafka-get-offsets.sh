#!/bin/bash
# Prints partitions' offsets.
exec "$(dirname "$0")/kafka-run-class.sh" org.apache.kafka.tools.GetOffsetShell "$@"
