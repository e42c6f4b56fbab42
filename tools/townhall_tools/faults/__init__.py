"""Fault injection on the local topology: kill or stop processes, measure what users notice."""
