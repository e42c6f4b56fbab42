#!/bin/bash
# Formats and inspects KRaft log directories (format, info, random-uuid).
exec "$(dirname "$0")/kafka-run-class.sh" kafka.tools.StorageTool "$@"
