#!/bin/bash
# Writes lines from stdin to a topic.
exec "$(dirname "$0")/kafka-run-class.sh" kafka.tools.ConsoleProducer "$@"
