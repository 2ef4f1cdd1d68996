"""Run-level checks over what the simulated clients observed (DESIGN §10)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from loom.core.ids import Generation, ShardId, UShard, Version
from loom.host.requests import Consistency
from loom.sim.workload import ReadObservation, WriteAck

UNCHECKED_FRACTION_MAX = 0.01


def check_bounded_reads(reads: Sequence[ReadObservation], acks: Sequence[WriteAck]) -> list[str]:
    """A bounded(ms) read returns a version ≥ every write to its key acknowledged before
    (invocation − ms), in global virtual time."""
    by_key: dict[bytes, list[WriteAck]] = {}
    for ack in acks:
        by_key.setdefault(ack.key, []).append(ack)
    problems = []
    for read in reads:
        if read.consistency is not Consistency.BOUNDED or read.bound_ms is None:
            continue
        horizon = read.invoked_ms - read.bound_ms
        required: Version | None = None
        for ack in by_key.get(read.key, []):
            if ack.completed_ms < horizon and (required is None or ack.version > required):
                required = ack.version
        if required is not None and not _reflects(read, required):
            problems.append(
                f"bounded({read.bound_ms:g}ms) read of {read.key!r} by {read.client} at "
                f"{read.invoked_ms:.1f}ms saw {read.record_version}, but {required} was "
                f"acknowledged before {horizon:.1f}ms"
            )
    return problems


def _reflects(read: ReadObservation, write: Version) -> bool:
    """Whether the read's state includes `write`: a newer record, or no record at all (a
    collected tombstone) on a replica that applied the write's slot."""
    if read.record_version is None:
        # A generation above the write's holds everything of the μshard before its move.
        return read.generation > write.generation or (
            read.generation == write.generation and read.applied_seq >= write.seq
        )
    return read.record_version >= write


def check_read_your_writes(reads: Sequence[ReadObservation]) -> list[str]:
    problems = []
    for read in reads:
        if read.consistency is not Consistency.READ_YOUR_WRITES:
            continue
        own = read.own_write_version
        if own is not None and not _reflects(read, own):
            problems.append(
                f"read-your-writes read of {read.key!r} by {read.client} saw "
                f"{read.record_version}, below its own write {own}"
            )
    return problems


def check_durability(
    acks: Sequence[WriteAck],
    applied: dict[tuple[ShardId, int], tuple[bytes, ...]],
    homes: Mapping[tuple[UShard, Generation], ShardId] | None = None,
) -> list[str]:
    """No acknowledged QUORUM write is lost: the slot its version names holds its command.

    After a move, a retry answered from the moved dedupe table carries the version of
    the p-shard it applied on: `homes` names the p-shard of each μshard generation.
    """
    problems = []
    for ack in acks:
        shard = ack.shard
        if homes is not None:
            shard = homes.get((ack.ushard, ack.version.generation), shard)
        commands = applied.get((shard, int(ack.version.seq)), ())
        index = ack.version.index
        if index >= len(commands) or commands[index] != ack.command:
            problems.append(
                f"durability: write to {ack.key!r} acknowledged at {ack.completed_ms:.1f}ms as "
                f"version {ack.version} of shard {shard} is not in the log there"
            )
    return problems
