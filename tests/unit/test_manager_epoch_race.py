"""Two managers race to store the same epoch number for a shard: the loser must see
that the stored assignment is not its own and announce nothing (one epoch, one
primary). Found by tests/integration/test_manager_ha.py under load: the loser compared
only epoch numbers, saw "3 stored", and announced its own epoch 3."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec

from loom.core.ids import Epoch, Incarnation, NodeId, ShardId
from loom.paxos.messages import Config
from loom.paxos.replica import Assignment
from loom.runtime.manager import ManagerRuntime, epoch_key
from loom.runtime.metastore_file import FileMetastore
from loom.shardmgr.core import PersistEpoch, ShardRecord

SHARD = ShardId(1)
CONFIG = Config(epoch=Epoch(1), acceptors=(NodeId("n1"), NodeId("n2"), NodeId("n3")))


def record(epoch: int, primary: str) -> ShardRecord:
    assignment = Assignment(
        epoch=Epoch(epoch),
        primary=NodeId(primary),
        primary_incarnation=Incarnation(1),
        config=CONFIG,
    )
    return ShardRecord(assignment=assignment, activated=False, since_activated=())


def test_the_loser_of_a_race_to_one_epoch_learns_it_is_not_its_own(tmp_path: Path) -> None:
    store = FileMetastore(tmp_path / "sm.json")
    encode = msgspec.msgpack.Encoder().encode
    key = epoch_key(SHARD)
    store.compare_and_swap(key, None, encode(record(2, "n2")))
    stale = store.get(key)  # both managers read epoch 2 here
    winner: Any = SimpleNamespace(metastore=store)
    loser: Any = SimpleNamespace(
        metastore=SimpleNamespace(get=lambda _: stale, compare_and_swap=store.compare_and_swap)
    )

    mine = record(3, "n1")
    output = PersistEpoch(shard=SHARD, expected=Epoch(2), assignment=mine.assignment)
    assert ManagerRuntime._compare_and_swap_epoch(winner, output, mine) == (Epoch(3), True)

    theirs = record(3, "n3")
    output = PersistEpoch(shard=SHARD, expected=Epoch(2), assignment=theirs.assignment)
    assert ManagerRuntime._compare_and_swap_epoch(loser, output, theirs) == (Epoch(3), False)
