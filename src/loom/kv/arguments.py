"""Checks of what a caller hands the kv client, made before anything is sent.

Rules: a bad argument raises `InvalidArgument` that names it (never an `assert`: it is
the caller's input, STYLE rule 5), and nothing reaches the network; sizes are bounded by
`DEFAULT_LIMITS`; a bool is not a number. Names with a leading underscore are private to
`loom.kv`.
"""

from __future__ import annotations

from collections.abc import Sequence

from loom.core.errors import InvalidArgument
from loom.core.limits import DEFAULT_LIMITS
from loom.kv.options import ReadConsistency
from loom.kv.router import Address

TTL_S_MAX = 10 * 365 * 24 * 3600
INT64 = 2**63


def parse_seeds(addresses: str | Sequence[str]) -> list[Address]:
    """`"host:port"`, `"h1:p1,h2:p2"` or a list of them (the manager and/or any nodes)."""
    texts = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    seeds = []
    for text in (t.strip() for t in texts):
        host, sep, port = text.rpartition(":")
        if not sep or not host or not (port.isascii() and port.isdigit()):
            raise InvalidArgument(f"{text!r} is not HOST:PORT")
        if not 0 < int(port) < 65536:
            raise InvalidArgument(f"{text!r} is not HOST:PORT")
        seeds.append((host, int(port)))
    if not seeds:
        raise InvalidArgument("no address to connect to")
    return seeds


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_bytes(name: str, value: object, bytes_max: int) -> bytes:
    if not isinstance(value, bytes):
        raise InvalidArgument(f"{name} must be bytes, not {type(value).__name__}")
    if len(value) > bytes_max:
        raise InvalidArgument(f"{name} of {len(value)} bytes is over the limit of {bytes_max}")
    return value


def _check_key(name: str, value: object) -> bytes:
    return _check_bytes(name, value, DEFAULT_LIMITS.key_bytes_max)


def _check_consistency(consistency: object) -> None:
    if not isinstance(consistency, ReadConsistency):
        raise InvalidArgument("consistency must be kv.STRONG, kv.bounded(ms), ...")
