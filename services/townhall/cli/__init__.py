"""The `townhall` command: local topology, demo, manual room/speak/listen, benchmarks."""
