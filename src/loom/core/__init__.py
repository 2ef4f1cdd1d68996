"""Shared vocabulary: ids, time, limits, errors, stable hashing. Pure, no IO."""
