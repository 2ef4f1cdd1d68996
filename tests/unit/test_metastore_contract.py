"""The metastore contract of `loom.shardmgr.metastore`, run against every backend.

The same tests run on MemoryMetastore and on FileMetastore (in tmp_path). File-only
tests cover reopening, corrupt images, and real processes racing to allocate epochs.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import loom
from loom.core.errors import InvalidArgument
from loom.runtime.metastore_file import FileMetastore, encode_image
from loom.shardmgr.metastore import (
    METASTORE_KEY_BYTES_MAX,
    METASTORE_VALUE_BYTES_MAX,
    MemoryMetastore,
    Metastore,
    MetastoreCorrupt,
    MetastoreState,
)

KEY = "shards/7/epoch"


@pytest.fixture(params=["memory", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Metastore:
    if request.param == "memory":
        return MemoryMetastore()
    return FileMetastore(tmp_path / "sm.json")


def create(store: Metastore, key: str, value: bytes) -> int:
    result = store.compare_and_swap(key, None, value)
    assert result.ok and result.current is not None
    return result.current[1]


# --- get and compare-and-swap -------------------------------------------------


def test_get_returns_none_for_a_missing_key(store: Metastore) -> None:
    assert store.get(KEY) is None


def test_cas_with_no_expected_revision_creates_an_absent_key(store: Metastore) -> None:
    result = store.compare_and_swap(KEY, None, b"1")
    assert result.ok
    assert result.current is not None
    assert result.current[0] == b"1"
    assert result.current[1] >= 1
    assert store.get(KEY) == result.current


def test_create_fails_when_the_key_exists_and_returns_the_current_record(
    store: Metastore,
) -> None:
    revision = create(store, KEY, b"1")
    result = store.compare_and_swap(KEY, None, b"other")
    assert not result.ok
    assert result.current == (b"1", revision)
    assert store.get(KEY) == (b"1", revision)


def test_cas_with_the_current_revision_replaces_the_value(store: Metastore) -> None:
    revision = create(store, KEY, b"1")
    result = store.compare_and_swap(KEY, revision, b"2")
    assert result.ok
    assert result.current is not None
    assert result.current[0] == b"2"
    assert store.get(KEY) == result.current


def test_cas_with_a_stale_revision_fails_and_returns_the_current_record(
    store: Metastore,
) -> None:
    first = create(store, KEY, b"1")
    second = store.compare_and_swap(KEY, first, b"2").current
    assert second is not None
    result = store.compare_and_swap(KEY, first, b"3")
    assert not result.ok
    assert result.current == second
    assert store.get(KEY) == second


def test_cas_with_a_revision_on_an_absent_key_fails_and_returns_none(store: Metastore) -> None:
    result = store.compare_and_swap(KEY, 1, b"1")
    assert not result.ok
    assert result.current is None
    assert store.get(KEY) is None


def test_revisions_increase_strictly_per_key_even_across_delete_and_recreate(
    store: Metastore,
) -> None:
    seen = [create(store, KEY, b"0")]
    for i in range(1, 5):
        if i == 2:
            create(store, "shards/other", b"x")  # other keys' writes move the counter too
        current = store.compare_and_swap(KEY, seen[-1], str(i).encode()).current
        assert current is not None
        seen.append(current[1])
    assert store.delete(KEY, seen[-1])
    seen.append(create(store, KEY, b"again"))
    assert all(a < b for a, b in itertools.pairwise(seen))


# --- list ---------------------------------------------------------------------


def test_list_returns_the_keys_under_a_prefix_sorted_by_key(store: Metastore) -> None:
    for key in ["shards/b", "shards/é", "nodes/1", "shards/a", "shards/a/x", "shardsz"]:
        create(store, key, key.encode())
    listed = store.list("shards/")
    assert [key for key, _, _ in listed] == ["shards/a", "shards/a/x", "shards/b", "shards/é"]
    for key, value, revision in listed:
        assert value == key.encode()
        assert store.get(key) == (value, revision)
    assert [key for key, _, _ in store.list("")] == sorted(
        ["shards/b", "shards/é", "nodes/1", "shards/a", "shards/a/x", "shardsz"]
    )
    assert store.list("absent/") == []


# --- delete -------------------------------------------------------------------


def test_delete_with_the_current_revision_removes_the_key(store: Metastore) -> None:
    revision = create(store, KEY, b"1")
    assert store.delete(KEY, revision)
    assert store.get(KEY) is None
    assert store.list("") == []


def test_delete_with_a_stale_revision_keeps_the_key(store: Metastore) -> None:
    first = create(store, KEY, b"1")
    current = store.compare_and_swap(KEY, first, b"2").current
    assert not store.delete(KEY, first)
    assert store.get(KEY) == current


def test_delete_of_an_absent_key_returns_false(store: Metastore) -> None:
    assert not store.delete(KEY, 1)


# --- limits -------------------------------------------------------------------


def test_a_key_and_value_at_the_limits_are_accepted(store: Metastore) -> None:
    key = "k" * (METASTORE_KEY_BYTES_MAX - 2) + "é"  # 256 UTF-8 bytes
    value = b"v" * METASTORE_VALUE_BYTES_MAX
    revision = create(store, key, value)
    assert store.get(key) == (value, revision)
    assert store.list(key) == [(key, value, revision)]


BAD_KEYS: list[object] = [
    "",
    "k" * (METASTORE_KEY_BYTES_MAX + 1),
    "é" * 129,  # 129 characters, 258 bytes: the limit is in bytes
    "\ud800",  # a lone surrogate has no UTF-8 encoding
    b"bytes-key",
    None,
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_a_bad_key_raises_invalid_argument_on_every_call(store: Metastore, key: object) -> None:
    with pytest.raises(InvalidArgument):
        store.get(key)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        store.compare_and_swap(key, None, b"1")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        store.delete(key, 1)  # type: ignore[arg-type]
    assert store.list("") == []


@pytest.mark.parametrize("value", [b"v" * (METASTORE_VALUE_BYTES_MAX + 1), "text", bytearray(b"x")])
def test_a_bad_value_raises_invalid_argument(store: Metastore, value: object) -> None:
    with pytest.raises(InvalidArgument):
        store.compare_and_swap(KEY, None, value)  # type: ignore[arg-type]
    assert store.get(KEY) is None


@pytest.mark.parametrize("revision", [0, -1, True, 1.0, "1"])
def test_a_bad_revision_raises_invalid_argument(store: Metastore, revision: object) -> None:
    with pytest.raises(InvalidArgument):
        store.compare_and_swap(KEY, revision, b"1")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        store.delete(KEY, revision)  # type: ignore[arg-type]


def test_a_prefix_over_the_key_limit_raises_invalid_argument(store: Metastore) -> None:
    with pytest.raises(InvalidArgument):
        store.list("p" * (METASTORE_KEY_BYTES_MAX + 1))


# --- FileMetastore only -------------------------------------------------------


def test_file_metastore_survives_reopen_without_reusing_a_revision(tmp_path: Path) -> None:
    path = tmp_path / "sm.json"
    first = FileMetastore(path)
    kept = create(first, "shards/1/epoch", b"5")
    gone = create(first, KEY, b"1")
    assert first.delete(KEY, gone)
    reopened = FileMetastore(path)
    assert reopened.get("shards/1/epoch") == (b"5", kept)
    assert reopened.get(KEY) is None
    assert create(reopened, KEY, b"again") > gone
    assert not (tmp_path / "sm.json.tmp").exists()


def test_two_file_metastores_on_one_path_see_each_others_writes(tmp_path: Path) -> None:
    a = FileMetastore(tmp_path / "sm.json")
    b = FileMetastore(tmp_path / "sm.json")
    revision = create(a, KEY, b"1")
    assert b.get(KEY) == (b"1", revision)
    assert not b.compare_and_swap(KEY, None, b"2").ok


def image_with(**fields: object) -> bytes:
    image: dict[str, object] = {
        "format": "loom-metastore",
        "version": 1,
        "last_revision": 3,
        "entries": [{"key": "a", "value": "MQ==", "revision": 3}],
    }
    image.update(fields)
    return json.dumps(image).encode()


CORRUPT_IMAGES = {
    "empty": b"",
    "not json": b"{not json",
    "truncated": encode_image(MetastoreState(entries={"a": (b"1", 1)}, last_revision=1))[:-5],
    "unknown version": image_with(version=2),
    "missing version": b'{"format": "loom-metastore"}',
    "foreign format": image_with(format="something-else"),
    "unknown field": image_with(extra=1),
    "bad base64": image_with(entries=[{"key": "a", "value": "!!", "revision": 3}]),
    "revision above counter": image_with(last_revision=2),
    "zero revision": image_with(entries=[{"key": "a", "value": "MQ==", "revision": 0}]),
    "duplicate key": image_with(
        entries=[
            {"key": "a", "value": "MQ==", "revision": 1},
            {"key": "a", "value": "Mg==", "revision": 2},
        ]
    ),
}


@pytest.mark.parametrize("raw", CORRUPT_IMAGES.values(), ids=CORRUPT_IMAGES.keys())
def test_a_corrupt_file_raises_on_open_instead_of_starting_empty(
    tmp_path: Path, raw: bytes
) -> None:
    path = tmp_path / "sm.json"
    path.write_bytes(raw)
    with pytest.raises(MetastoreCorrupt):
        FileMetastore(path)
    assert path.read_bytes() == raw


def test_a_file_corrupted_after_open_raises_and_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "sm.json"
    store = FileMetastore(path)
    create(store, KEY, b"1")
    path.write_bytes(image_with(version=99))
    with pytest.raises(MetastoreCorrupt):
        store.get(KEY)
    with pytest.raises(MetastoreCorrupt):
        store.compare_and_swap(KEY, None, b"1")
    assert path.read_bytes() == image_with(version=99)


# Each process allocates epochs for one shard by read + CAS until it has won ALLOCATIONS
# times, then prints the epochs it believes it allocated. It waits for a line on stdin
# so that all processes start racing together.
ALLOCATOR = """
import json, sys
from loom.runtime.metastore_file import FileMetastore
store = FileMetastore(sys.argv[1])
key, wanted = sys.argv[2], int(sys.argv[3])
sys.stdin.readline()
mine = []
for _ in range(100_000):
    if len(mine) == wanted:
        break
    current = store.get(key)
    expected, epoch = (None, 1) if current is None else (current[1], int(current[0]) + 1)
    if store.compare_and_swap(key, expected, str(epoch).encode()).ok:
        mine.append(epoch)
print(json.dumps(mine))
"""

PROCESSES = 3
ALLOCATIONS = 50


def test_racing_processes_never_allocate_the_same_epoch_twice(tmp_path: Path) -> None:
    path = tmp_path / "sm.json"
    src = str(Path(loom.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", ALLOCATOR, str(path), KEY, str(ALLOCATIONS)]
    processes = [
        subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for _ in range(PROCESSES)
    ]
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        process.stdin.flush()
    allocated: list[set[int]] = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err.decode()
        epochs = json.loads(out)
        assert len(epochs) == ALLOCATIONS
        allocated.append(set(epochs))
    total = PROCESSES * ALLOCATIONS
    for i, mine in enumerate(allocated):
        for theirs in allocated[i + 1 :]:
            assert mine.isdisjoint(theirs)
    assert set().union(*allocated) == set(range(1, total + 1))
    final = FileMetastore(path).get(KEY)
    assert final is not None
    assert final[0] == str(total).encode()
