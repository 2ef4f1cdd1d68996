"""Benchmarks the `loom bench` command runs. They measure; they never assert a time."""
