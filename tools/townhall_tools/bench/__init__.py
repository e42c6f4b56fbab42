"""Benchmarks: figures on screen and JSON on disk, measured against a bare-gRPC ceiling; never tests."""
