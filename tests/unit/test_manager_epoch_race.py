"""Two managers race to store the same epoch number for a shard: the loser must see
that the stored assignment is not its own and announce only the winner's (one epoch,
one primary). Found by tests/integration/test_manager_ha.py under load: first the loser
compared only epoch numbers, saw "3 stored", and announced its own epoch 3; then it
announced its *old* primary under the winner's epoch number."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec

from loom.core.ids import Epoch, Incarnation, NodeId, ShardId
from loom.core.time import Instant
from loom.paxos.messages import Config
from loom.paxos.replica import Assignment
from loom.runtime.manager import ManagerRuntime, epoch_key
from loom.runtime.metastore_file import FileMetastore
from loom.shardmgr.core import (
    Announce,
    NodeReport,
    PersistEpoch,
    ShardManagerCore,
    ShardRecord,
    SmParams,
)

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
    assert ManagerRuntime._compare_and_swap_epoch(winner, output, mine) == mine

    theirs = record(3, "n3")
    output = PersistEpoch(shard=SHARD, expected=Epoch(2), assignment=theirs.assignment)
    assert ManagerRuntime._compare_and_swap_epoch(loser, output, theirs) == mine


def test_the_loser_of_a_race_announces_the_winners_assignment_and_nothing_else() -> None:
    """Both managers fail over the same dead primary at once; one stores epoch 2 first.
    The other must go on from the stored record: announce that same assignment, never
    its own and never its old primary under the new epoch number."""
    metastore: dict[ShardId, ShardRecord] = {}
    cores = [ShardManagerCore(params=SmParams(), rng=random.Random(seed)) for seed in (1, 2)]
    for core in cores:
        for node in ("n1", "n2", "n3"):
            core.on_report(report(node), Instant(0))
        core.create_shard(SHARD, (NodeId("n1"), NodeId("n2"), NodeId("n3")), Instant(0))
    first = persist(cores[0], metastore)
    persist(cores[1], metastore)  # the same record: it is ours too
    for core in cores:
        core.on_report(report("n2"), Instant(1000))
        core.on_report(report("n3"), Instant(1000))  # n1 (the primary) died
        core.tick(Instant(1000))
    winner = persist(cores[1], metastore)
    loser = persist(cores[0], metastore)
    assert [a.epoch for a in first] == [Epoch(1)]
    stored = metastore[SHARD].assignment
    assert stored.epoch == Epoch(2) and stored.primary != NodeId("n1")
    assert winner == [stored]
    assert loser == [stored]
    assert cores[0].shards[SHARD].current == stored
    cores[0].tick(Instant(1600))  # its periodic announcement repeats the same
    announced = [o.assignment for o in cores[0].outputs() if isinstance(o, Announce)]
    assert announced == [stored]


def report(node: str) -> NodeReport:
    return NodeReport(node=NodeId(node), incarnation=Incarnation(1), shards=())


def persist(core: ShardManagerCore, metastore: dict[ShardId, ShardRecord]) -> list[Assignment]:
    """Plays a shared metastore (compare-and-swap on the epoch) for `core`; returns what
    it announced."""
    announced = []
    while outputs := core.outputs():
        for output in outputs:
            if isinstance(output, PersistEpoch):
                held = metastore.get(output.shard)
                if (held.assignment.epoch if held else Epoch(0)) == output.expected:
                    metastore[output.shard] = core.record(output.shard, output.assignment)
                stored = metastore[output.shard]
                core.epoch_persisted(output.shard, output.assignment, stored=stored, now=Instant(0))
            elif isinstance(output, Announce):
                announced.append(output.assignment)
    return announced
