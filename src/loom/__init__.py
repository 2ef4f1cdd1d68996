"""loom: a sharded, replicated key-value store and a background-function platform."""

if not __debug__:  # pragma: no cover - STYLE rule 5: our invariants are asserts
    raise RuntimeError("loom refuses to run under python -O: its invariants are assertions")

__version__ = "0.1.0"
