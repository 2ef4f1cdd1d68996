"""Identifiers. Plain ints never cross a module boundary (STYLE rule 2).

Epoch (leadership generation) and Seq (log slot) never share a word.
"""

from __future__ import annotations

from typing import NewType

from msgspec import Struct

NodeId = NewType("NodeId", str)
ShardId = NewType("ShardId", int)
Epoch = NewType("Epoch", int)
Seq = NewType("Seq", int)
Incarnation = NewType("Incarnation", int)
UShard = NewType("UShard", int)
Generation = NewType("Generation", int)
# A μshard move, allocated by the shard manager; grows per μshard (never reused).
MoveId = NewType("MoveId", int)
ClientId = NewType("ClientId", str)
RequestSeq = NewType("RequestSeq", int)


class Ballot(Struct, frozen=True, array_like=True, order=True):
    """A Paxos ballot: (epoch, primary node, primary incarnation), ordered lexicographically.

    Epochs come from the shard manager's compare-and-swap, so two ballots with the
    same epoch but different primaries only arise from a faulty manager; the strict
    promise rule still keeps them apart.
    """

    epoch: Epoch
    node: NodeId
    incarnation: Incarnation

    def __str__(self) -> str:
        return f"{self.epoch}.{self.node}.{self.incarnation}"


ZERO_BALLOT = Ballot(epoch=Epoch(0), node=NodeId(""), incarnation=Incarnation(0))


class Version(Struct, frozen=True, array_like=True, order=True):
    """Names one command: μshard generation, log slot, index in the entry (PITFALLS 17)."""

    generation: Generation
    seq: Seq
    index: int

    def __str__(self) -> str:
        return f"{self.generation}:{self.seq}.{self.index}"


ZERO_VERSION = Version(generation=Generation(0), seq=Seq(0), index=0)


class RequestId(Struct, frozen=True, array_like=True, order=True):
    """Client id + per-client sequence; the unit of exactly-once writes (PITFALLS 5)."""

    client: ClientId
    seq: RequestSeq
