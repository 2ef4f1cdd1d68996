"""The automatic split decision (loom.shardmgr.autosplit): thresholds, hysteresis,
cooldown and bounds."""

from __future__ import annotations

from loom.core.ids import ShardId
from loom.core.time import Instant
from loom.shardmgr.autosplit import AutoSplitter, KeyspaceLoad, ShardLoad, Split, SplitParams

PARAMS = SplitParams(
    bytes_max=1000, ops_per_s_max=100.0, shards_max=8, sustain_ms=1000.0, cooldown_ms=5000.0
)


def load(
    shards: int = 1,
    *,
    stored_bytes: int = 0,
    ops_per_s: float = 0.0,
    ushards: int = 64,
    resharding: bool = False,
) -> KeyspaceLoad:
    hot = ShardLoad(shard=ShardId(1), stored_bytes=stored_bytes, ops_per_s=ops_per_s)
    cold = [
        ShardLoad(shard=ShardId(1 + i), stored_bytes=0, ops_per_s=0.0) for i in range(1, shards)
    ]
    return KeyspaceLoad(name="ks", ushards=ushards, shards=(hot, *cold), resharding=resharding)


def at(ms: float) -> Instant:
    return Instant(ms)


def test_a_hot_pshard_splits_its_keyspace_only_after_it_stayed_hot_for_sustain_ms() -> None:
    splitter = AutoSplitter(PARAMS)
    assert splitter.decide([load(stored_bytes=2000)], at(0)) == []
    assert splitter.decide([load(stored_bytes=2000)], at(999)) == []
    [split] = splitter.decide([load(stored_bytes=2000)], at(1000))
    assert split == Split(name="ks", shards=2, reason="p-shard 1 stores 2000 bytes > 1000")


def test_a_break_below_the_threshold_restarts_the_sustain_time() -> None:
    splitter = AutoSplitter(PARAMS)
    splitter.decide([load(ops_per_s=500.0)], at(0))
    splitter.decide([load(ops_per_s=50.0)], at(600))
    assert splitter.decide([load(ops_per_s=500.0)], at(1200)) == []
    [split] = splitter.decide([load(ops_per_s=500.0)], at(2200))
    assert split.shards == 2 and "commands/s" in split.reason


def test_after_a_split_the_keyspace_waits_the_cooldown_and_never_splits_while_resharding() -> None:
    splitter = AutoSplitter(PARAMS)
    splitter.decide([load(stored_bytes=2000)], at(0))
    assert splitter.decide([load(stored_bytes=2000)], at(1000))
    # Resharding: nothing, and the over-time starts again afterwards.
    assert splitter.decide([load(2, stored_bytes=2000, resharding=True)], at(2000)) == []
    assert splitter.decide([load(2, stored_bytes=2000)], at(3000)) == []
    assert splitter.decide([load(2, stored_bytes=2000)], at(4500)) == []  # cooldown
    [split] = splitter.decide([load(2, stored_bytes=2000)], at(6000))
    assert split.shards == 4


def test_a_split_doubles_up_to_the_ushard_count_and_shards_max_then_stops() -> None:
    splitter = AutoSplitter(PARAMS)
    splitter.decide([load(5, stored_bytes=2000)], at(0))
    [split] = splitter.decide([load(5, stored_bytes=2000)], at(1000))
    assert split.shards == 8  # shards_max
    splitter = AutoSplitter(PARAMS)
    splitter.decide([load(2, stored_bytes=2000, ushards=3)], at(0))
    [split] = splitter.decide([load(2, stored_bytes=2000, ushards=3)], at(1000))
    assert split.shards == 3  # the μshard count
    splitter.decide([load(8, stored_bytes=2000)], at(10_000))
    assert splitter.decide([load(8, stored_bytes=2000)], at(20_000)) == []  # at the bound


def test_switched_off_or_with_a_threshold_off_nothing_splits() -> None:
    off = AutoSplitter(SplitParams(enabled=False, sustain_ms=0.0))
    assert off.decide([load(stored_bytes=10**12)], at(0)) == []
    no_bytes = AutoSplitter(SplitParams(bytes_max=None, sustain_ms=0.0))
    assert no_bytes.decide([load(stored_bytes=10**12)], at(0)) == []
    assert SplitParams(bytes_max=0).problem() is not None
    assert SplitParams().problem() is None
