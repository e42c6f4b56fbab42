#!/bin/bash
# Lists and describes consumer groups (lag), resets their offsets.
exec "$(dirname "$0")/kafka-run-class.sh" org.apache.kafka.tools.consumer.group.ConsumerGroupCommand "$@"
