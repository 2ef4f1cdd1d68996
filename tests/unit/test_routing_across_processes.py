"""Key → μshard → p-shard routing is the same in every process (PITFALLS 18).

Clients, nodes and the shard manager are separate processes, each with its own
`PYTHONHASHSEED`; if any of them routed a key differently, a write could land on a
p-shard that a read never asks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from loom.core.hashing import ushard_of
from loom.core.ids import ShardId, UShard
from loom.shardmgr.routing import Keyspace, KeyspaceSpec, compact_ranges

# (ushards, p-shard ids) of the keyspaces every process routes through.
LAYOUTS: list[tuple[int, list[int]]] = [
    (4096, [1]),
    (4096, list(range(10, 17))),
    (65_536, list(range(1000, 2024))),
    (3, [5, 6, 7]),
]


def fixed_keys() -> list[bytes]:
    keys = [b"", b"\x00", b"\xff", b"\x00" * 16, bytes(range(256)), b"k" * 4096]
    keys += [f"user:{i}".encode() for i in range(120)]
    keys += [i.to_bytes(8, "big") for i in range(0, 2**64, 2**58)]  # 64 fixed-width ints
    texts = ["ключ", "鍵", "🔑", "café", "naïve/ü", "ﬁ", "e\u0301", "\u200b"]
    keys += [t.encode() for t in texts]
    keys += [t.encode("utf-16-le") for t in texts[:2]]
    keys += [b"order:2024-01-01/" * n for n in (1, 8, 15, 60)]  # xxh3's length classes
    assert len(keys) == len(set(keys))
    return keys


def routes(keys: list[bytes]) -> list[list[int]]:
    """Per key: its μshard and p-shard under every layout."""
    keyspaces = [
        Keyspace(
            spec=KeyspaceSpec(name="ks", shards=len(shards), ushards=ushards),
            placements=(),
            ranges=compact_ranges(ushards, [ShardId(s) for s in shards]),
        )
        for ushards, shards in LAYOUTS
    ]
    answer = []
    for key in keys:
        row: list[int] = [ushard_of(key, 4096)]
        for keyspace in keyspaces:
            ushard = ushard_of(key, keyspace.spec.ushards)
            row += [ushard, keyspace.shard_of(ushard)]
        answer.append(row)
    return answer


# The subprocess reads the keys and layouts as JSON on stdin and prints the same rows,
# plus its own salted hash() of a constant (to prove the seeds really differ).
CHILD = """
import json, sys
from loom.core.hashing import ushard_of
from loom.core.ids import ShardId
from loom.shardmgr.routing import Keyspace, KeyspaceSpec, compact_ranges
given = json.load(sys.stdin)
keyspaces = [
    Keyspace(
        spec=KeyspaceSpec(name="ks", shards=len(shards), ushards=ushards),
        placements=(),
        ranges=compact_ranges(ushards, [ShardId(s) for s in shards]),
    )
    for ushards, shards in given["layouts"]
]
rows = []
for key in (bytes.fromhex(k) for k in given["keys"]):
    row = [ushard_of(key, 4096)]
    for keyspace in keyspaces:
        ushard = ushard_of(key, keyspace.spec.ushards)
        row += [ushard, keyspace.shard_of(ushard)]
    rows.append(row)
print(json.dumps({"salted": hash("loom routing"), "rows": rows}))
"""


def test_routing_is_identical_in_processes_with_different_hash_seeds() -> None:
    keys = fixed_keys()
    assert 190 <= len(keys) <= 260
    expected = routes(keys)
    stdin = json.dumps({"layouts": LAYOUTS, "keys": [k.hex() for k in keys]})
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD],
            env=dict(os.environ, PYTHONHASHSEED=seed),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in ("1", "4242")
    ]
    answers = []
    for child in children:
        out, err = child.communicate(stdin, timeout=60)
        assert child.returncode == 0, err
        answers.append(json.loads(out))
    # The children really hash differently from each other...
    assert answers[0]["salted"] != answers[1]["salted"]
    # ...and still route every key exactly as this process does.
    for answer in answers:
        assert answer["rows"] == expected


def test_every_layout_routes_each_key_to_one_of_its_shards() -> None:
    for row in routes(fixed_keys()):
        for (ushards, shards), ushard, shard in zip(LAYOUTS, row[1::2], row[2::2], strict=True):
            assert 0 <= ushard < ushards
            assert shard in shards


# key → μshard with ushards=4096 (xxh3-64, seed 0), computed once and written down: a
# changed hash function or modulus would move every stored key, so it must fail loudly.
# Lengths cover xxh3's code paths: 1-3, 4-8, 9-16, 17-128, 129-240 and >240 bytes.
# (tests/unit/test_hashing.py pins b"", b"a", b"user:1", b"acct:0" and bytes(range(16)).)
VECTORS = [
    (b"k", 2077),
    (b"\x00", 3291),
    ("🔑".encode(), 1502),
    ("café".encode(), 1663),
    (b"acct:9", 1030),
    ("ключ".encode(), 3806),
    (b"hello world", 2187),
    (b"order:2024-01-01/42" * 5, 577),
    (b"y" * 200, 894),
    (bytes(range(256)), 3441),
    (b"x" * 4096, 147),
]


@pytest.mark.parametrize(("key", "ushard"), VECTORS, ids=lambda v: repr(v)[:24])
def test_ushard_of_matches_the_pinned_vectors(key: bytes, ushard: int) -> None:
    assert ushard_of(key, 4096) == UShard(ushard)
