"""Deterministic simulation of loom's real protocol cores, and the checkers that judge it."""
