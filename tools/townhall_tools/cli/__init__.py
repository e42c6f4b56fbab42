"""The tooling's `townhall` commands (dev, demo, kafka, loadtest, faults, bench), in commands.py."""
