"""`FileMetastore`: the shard manager's metastore for one machine, in one JSON file.

It implements `loom.shardmgr.metastore.Metastore` durably, so that several `loom sm`
processes on one machine can never hand out the same epoch twice. The semantics live
once in the pure `MetastoreState`; this module only loads it, applies one mutation and
writes it back. Why each step of a mutation (`compare_and_swap`, `delete`) is there:

1. **Exclusive `fcntl.flock` on `<path>.lock`.** Two processes doing read-CAS-write at
   once would both see revision r and both "win". The lock serialises every mutation
   on the machine. It sits on a separate, never-replaced file because the data file's
   inode changes on every write (step 4): a lock on the old inode would not exclude a
   process that opened the new one. The lock file is never deleted for the same reason.
   flock locks belong to the open file description, so two `FileMetastore`s in one
   process exclude each other too, and a crashed holder's lock dies with it.
2. **Re-read the data file under the lock.** Another process may have written since we
   last looked; a CAS decided against a cached image would be a lost update.
3. **Apply the CAS to the image.** A failed CAS writes nothing and answers the current
   (value, revision).
4. **Write `<path>.tmp`, fsync it, `os.replace` it over `<path>`, fsync the directory.**
   Writing in place could leave a torn file after a crash. fsync before the rename makes
   the new contents durable before any name points at them; `os.replace` is atomic, so
   readers and a crash see the old image or the new one, never a mix; the directory
   fsync makes the rename itself durable — without it a power cut could bring the old
   image back after we answered `ok`, and the epoch would be handed out again. The temp
   name is fixed because only the lock holder writes it; a leftover from a crash is
   truncated by the next writer.

Reads (`get`, `list`) take no lock: `os.replace` means any open of `<path>` sees one
complete image, written and fsynced before the rename, and a mutation that answered has
already renamed its image into place.

A missing data file is an empty store (first start). A file that does not parse, has
an unknown format or version, or breaks an invariant raises `MetastoreCorrupt` — on
open and on every access — and is never silently treated as empty, which would forget
every epoch ever allocated.

Calls block (disk IO and fsync; a mutation may wait for another process's lock):
asyncio drivers run them via `asyncio.to_thread`.

Format, version 1: a JSON object `{"format": "loom-metastore", "version": 1,
"last_revision": int, "entries": [{"key": str, "value": base64, "revision": int}]}` with
entries sorted by key.
"""

from __future__ import annotations

import builtins
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec

from loom.shardmgr.metastore import CasResult, MetastoreCorrupt, MetastoreState

FILE_FORMAT = "loom-metastore"
FILE_VERSION = 1


class _Header(msgspec.Struct):
    """Read first, leniently, so an unknown version is reported as such."""

    format: str | None = None
    version: int | None = None


class _Entry(msgspec.Struct, forbid_unknown_fields=True):
    key: str
    value: bytes
    revision: int


class _ImageV1(msgspec.Struct, forbid_unknown_fields=True):
    format: str
    version: int
    last_revision: int
    entries: list[_Entry]


def decode_image(raw: bytes, *, source: str) -> MetastoreState:
    """Parse a version-1 image; raise MetastoreCorrupt (naming `source`) if it is not one."""
    try:
        header = msgspec.json.decode(raw, type=_Header)
    except msgspec.DecodeError as exc:
        raise MetastoreCorrupt(f"metastore file {source} is not a valid image: {exc}") from exc
    if header.format != FILE_FORMAT:
        raise MetastoreCorrupt(f"metastore file {source} has format {header.format!r}")
    if header.version != FILE_VERSION:
        raise MetastoreCorrupt(
            f"metastore file {source} has version {header.version!r}; "
            f"this loom reads version {FILE_VERSION}"
        )
    try:
        image = msgspec.json.decode(raw, type=_ImageV1)
    except msgspec.DecodeError as exc:
        raise MetastoreCorrupt(f"metastore file {source} is not a valid image: {exc}") from exc
    state = MetastoreState(last_revision=image.last_revision)
    for entry in image.entries:
        if entry.key in state.entries:
            raise MetastoreCorrupt(f"metastore file {source} repeats key {entry.key!r}")
        state.entries[entry.key] = (entry.value, entry.revision)
    broken = state.check_invariants()
    if broken is not None:
        raise MetastoreCorrupt(f"metastore file {source} is inconsistent: {broken}")
    return state


def encode_image(state: MetastoreState) -> bytes:
    entries = [
        _Entry(key=key, value=value, revision=revision)
        for key, (value, revision) in sorted(state.entries.items())
    ]
    image = _ImageV1(
        format=FILE_FORMAT,
        version=FILE_VERSION,
        last_revision=state.last_revision,
        entries=entries,
    )
    return msgspec.json.encode(image)


class FileMetastore:
    """The whole store in one file at `path`; safe across processes on one machine."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        self._lock_path = self._path.with_name(self._path.name + ".lock")
        self._tmp_path = self._path.with_name(self._path.name + ".tmp")
        # Fail at start, not at the first epoch bump, if the file is unreadable.
        self._load()

    @property
    def path(self) -> Path:
        return self._path

    def get(self, key: str) -> tuple[bytes, int] | None:
        return self._load().get(key)

    def list(self, prefix: str) -> builtins.list[tuple[str, bytes, int]]:
        return self._load().list(prefix)

    def compare_and_swap(self, key: str, expected_revision: int | None, value: bytes) -> CasResult:
        with self._exclusive():
            state = self._load()
            result = state.compare_and_swap(key, expected_revision, value)
            if result.ok:
                self._store(state)
            return result

    def delete(self, key: str, expected_revision: int) -> bool:
        with self._exclusive():
            state = self._load()
            deleted = state.delete(key, expected_revision)
            if deleted:
                self._store(state)
            return deleted

    # ---------------------------------------------------------------- file steps

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            # Closing the descriptor releases the flock even if unlocking is skipped.
            os.close(fd)

    def _load(self) -> MetastoreState:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return MetastoreState()
        return decode_image(raw, source=str(self._path))

    def _store(self, state: MetastoreState) -> None:
        data = encode_image(state)
        fd = os.open(self._tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self._tmp_path, self._path)
        dir_fd = os.open(self._path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
