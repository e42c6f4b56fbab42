#!/bin/bash
# Adds, lists and removes ACLs.
exec "$(dirname "$0")/kafka-run-class.sh" kafka.admin.AclCommand "$@"
