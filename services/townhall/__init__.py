"""Townhall: a backend for live audio rooms that absorbs a celebrity's join storm."""
