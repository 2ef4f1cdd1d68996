"""Benchmarks: measurements, never tests. `make bench` runs them all (`python -m bench`)."""
