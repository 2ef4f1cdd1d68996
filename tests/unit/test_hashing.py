"""Key → μshard routing must be identical in every process (PITFALLS 18)."""

import os
import subprocess
import sys

import pytest

from loom.core.hashing import stable_hash64, ushard_of

# xxh3-64, seed 0. The first is the reference value of XXH3_64bits("").
VECTORS = [
    (b"", 3244421341483603138, 1218),
    (b"a", 16629034431890738719, 3615),
    (b"user:1", 4276021600403166465, 1281),
    (b"acct:0", 1163885583063186142, 2782),
    (bytes(range(16)), 9463720498221773019, 219),
]


@pytest.mark.parametrize(("key", "digest", "ushard"), VECTORS)
def test_stable_hash_matches_the_published_vectors(key: bytes, digest: int, ushard: int) -> None:
    assert stable_hash64(key) == digest
    assert ushard_of(key, 4096) == ushard


def test_routing_is_identical_in_a_process_with_another_hash_seed() -> None:
    code = (
        "from loom.core.hashing import ushard_of;"
        "print([ushard_of(k, 4096) for k in (b'', b'a', b'user:1', b'acct:0')])"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str([v[2] for v in VECTORS[:4]])
