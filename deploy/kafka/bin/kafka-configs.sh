#!/bin/bash
# Describes and alters dynamic configs (topics, brokers, users: SCRAM credentials, quotas).
exec "$(dirname "$0")/kafka-run-class.sh" kafka.admin.ConfigCommand "$@"
