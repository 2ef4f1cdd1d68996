"""The shard manager's metastore port: a small key-value store with compare-and-swap.

DESIGN §3–§4: epochs are allocated by compare-and-swap in the metastore and persisted
before they are announced, so no epoch is ever handed out twice. Backends: a local file
for one machine (`loom.runtime.metastore_file.FileMetastore`), etcd for HA, and the
in-memory twin here (`MemoryMetastore`) for the simulator and the tests. The same
contract suite (`tests/unit/test_metastore_contract.py`) runs against every backend.

Rules of the port:
- Every stored key has a **revision**, an int ≥ 1. Revisions come from one store-wide
  counter (as in etcd), so they increase strictly per key — also across a delete and a
  re-create, which rules out ABA: a revision once seen is never reused for a key.
- `compare_and_swap(key, expected_revision, value)` writes only if the key's current
  revision equals `expected_revision` (`None`: the key must not exist). Success and
  failure both answer the current `(value, revision)`, so a loser can retry without a
  second read.
- A conflict is an expected outcome, so it is a return value; a malformed request
  (key over 256 UTF-8 bytes, value over 1 MiB, a revision < 1) is our bug or a bad
  caller and raises `InvalidArgument`. An unreadable durable image raises
  `MetastoreCorrupt`: a backend never silently starts empty over it.
- This module is pure (no os/time/asyncio): `MetastoreState` holds the semantics once
  and the durable backends load it, apply one mutation and write it back.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import Protocol

from loom.core.errors import InvalidArgument, LoomError

METASTORE_KEY_BYTES_MAX = 256
METASTORE_VALUE_BYTES_MAX = 1024 * 1024


class MetastoreCorrupt(LoomError):
    """The metastore's durable image is unreadable or of an unknown format version.

    Not retryable: an operator must look. Starting empty instead would forget every
    allocated epoch and let the shard manager hand one out twice.
    """


@dataclass(frozen=True, slots=True, kw_only=True)
class CasResult:
    """`ok`: the write happened. `current`: the key's (value, revision) now, or None."""

    ok: bool
    current: tuple[bytes, int] | None


class Metastore(Protocol):
    """The port. Implementations are synchronous; asyncio drivers call them off the loop."""

    def get(self, key: str) -> tuple[bytes, int] | None:
        """The key's (value, revision), or None if it does not exist."""
        ...

    def compare_and_swap(self, key: str, expected_revision: int | None, value: bytes) -> CasResult:
        """Write `value` iff the key's revision is `expected_revision` (None: absent)."""
        ...

    def list(self, prefix: str) -> builtins.list[tuple[str, bytes, int]]:
        """Every (key, value, revision) whose key starts with `prefix`, sorted by key."""
        ...

    def delete(self, key: str, expected_revision: int) -> bool:
        """Delete iff the key exists at `expected_revision`; False otherwise."""
        ...


def validate_key(key: str) -> None:
    """Raise InvalidArgument unless `key` is a non-empty str of ≤ 256 UTF-8 bytes."""
    if not isinstance(key, str):
        raise InvalidArgument(f"metastore key must be str, not {type(key).__name__}")
    validate_prefix(key)
    if not key:
        raise InvalidArgument("metastore key must not be empty")


def validate_prefix(prefix: str) -> None:
    """Raise InvalidArgument unless `prefix` is a str of ≤ 256 UTF-8 bytes (may be empty)."""
    if not isinstance(prefix, str):
        raise InvalidArgument(f"metastore prefix must be str, not {type(prefix).__name__}")
    try:
        encoded = prefix.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument("metastore key is not valid UTF-8 (lone surrogate)") from exc
    if len(encoded) > METASTORE_KEY_BYTES_MAX:
        raise InvalidArgument(
            f"metastore key is {len(encoded)} bytes; the maximum is {METASTORE_KEY_BYTES_MAX}"
        )


def validate_value(value: bytes) -> None:
    """Raise InvalidArgument unless `value` is bytes of at most 1 MiB."""
    if not isinstance(value, bytes):
        raise InvalidArgument(f"metastore value must be bytes, not {type(value).__name__}")
    if len(value) > METASTORE_VALUE_BYTES_MAX:
        raise InvalidArgument(
            f"metastore value is {len(value)} bytes; the maximum is {METASTORE_VALUE_BYTES_MAX}"
        )


def validate_revision(revision: int | None, *, may_be_none: bool) -> None:
    """Raise InvalidArgument unless `revision` is an int ≥ 1 (or None where allowed)."""
    if revision is None and may_be_none:
        return
    # bool is an int subclass; True as a revision is a caller bug, not revision 1.
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 1:
        raise InvalidArgument(f"metastore revision must be an int >= 1, not {revision!r}")


@dataclass(slots=True, kw_only=True)
class MetastoreState:
    """The whole store: entries and the store-wide revision counter.

    `last_revision` never decreases and is persisted with the entries, so a revision is
    never reused after a delete or a restart.
    """

    entries: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    last_revision: int = 0

    def check_invariants(self) -> str | None:
        """A description of the first broken invariant, or None (used on loaded images)."""
        if not isinstance(self.last_revision, int) or self.last_revision < 0:
            return f"last_revision {self.last_revision!r} is not an int >= 0"
        for key, (value, revision) in self.entries.items():
            try:
                validate_key(key)
                validate_value(value)
                validate_revision(revision, may_be_none=False)
            except InvalidArgument as exc:
                return f"entry {key!r}: {exc}"
            if revision > self.last_revision:
                return f"entry {key!r} has revision {revision} > last_revision"
        return None

    def get(self, key: str) -> tuple[bytes, int] | None:
        validate_key(key)
        return self.entries.get(key)

    def compare_and_swap(self, key: str, expected_revision: int | None, value: bytes) -> CasResult:
        validate_key(key)
        validate_revision(expected_revision, may_be_none=True)
        validate_value(value)
        current = self.entries.get(key)
        current_revision = None if current is None else current[1]
        if current_revision != expected_revision:
            return CasResult(ok=False, current=current)
        self.last_revision += 1
        written = (value, self.last_revision)
        self.entries[key] = written
        return CasResult(ok=True, current=written)

    def list(self, prefix: str) -> builtins.list[tuple[str, bytes, int]]:
        validate_prefix(prefix)
        # Sorted by str order = Unicode code point order = UTF-8 byte order.
        return [
            (key, value, revision)
            for key, (value, revision) in sorted(self.entries.items())
            if key.startswith(prefix)
        ]

    def delete(self, key: str, expected_revision: int) -> bool:
        validate_key(key)
        validate_revision(expected_revision, may_be_none=False)
        current = self.entries.get(key)
        if current is None or current[1] != expected_revision:
            return False
        del self.entries[key]
        return True


class MemoryMetastore:
    """The in-memory twin: same contract, nothing durable (simulator and tests)."""

    def __init__(self) -> None:
        self._state = MetastoreState()

    def get(self, key: str) -> tuple[bytes, int] | None:
        return self._state.get(key)

    def compare_and_swap(self, key: str, expected_revision: int | None, value: bytes) -> CasResult:
        return self._state.compare_and_swap(key, expected_revision, value)

    def list(self, prefix: str) -> builtins.list[tuple[str, bytes, int]]:
        return self._state.list(prefix)

    def delete(self, key: str, expected_revision: int) -> bool:
        return self._state.delete(key, expected_revision)
