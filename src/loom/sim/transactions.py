"""Transaction workloads of the simulated clients, and the invariants they must keep.

- bank: transfers between accounts of one μshard; the total never changes. Absent
  accounts hold INITIAL_BALANCE, so a transaction that leaves a key read as absent
  out of its read set (the `txn-skip-absent` bug) can spend money twice.
- audit: a read-only transaction reads every account at one snapshot (validated
  locally: every version read is at or below the snapshot) and must see the total.
- on-call (write skew): two doctors, absent = on call; a transaction takes one off
  call only if both are on. Serializability keeps at least one on call.
Reads of one transaction all go to one replica; the snapshot is that replica's
applied seq at the first read (DESIGN §5).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from loom.core.hashing import ushard_of
from loom.core.ids import Epoch, Generation, NodeId, RequestId, Seq, Version
from loom.host.requests import Consistency, ReadReply, ReadRequest, WriteRequest
from loom.kvstate.commands import TxnCommit, TxnRead, TxnWrite, encode_command

ACCOUNTS = tuple(b"acct:%d" % i for i in range(4))
INITIAL_BALANCE = 100
DOCTORS = (b"doc:x", b"doc:y")
BANK_SHARD_KEY = b"bank"
ONCALL_SHARD_KEY = b"oncall"
ATTEMPTS_MAX = 6
SNAPSHOT_INDEX_MAX = 2**31 - 1
USHARDS = 64  # the simulated keyspace's μshard count (loom.sim.workload)

Kind = Literal["transfer", "audit", "oncall", "oncall_audit"]


def decode_amount(value: bytes | None, absent: int) -> int:
    return absent if value is None else int(value)


@dataclass(slots=True, kw_only=True)
class Transaction:
    kind: Kind
    keys: tuple[bytes, ...]
    shard_key: bytes
    target: NodeId | None
    consistency: Consistency
    attempts: int = 1
    snapshot_seq: Seq | None = None
    # The μshard's generation at the replica read: versions compare as (generation, seq).
    snapshot_generation: Generation = Generation(0)
    epoch: Epoch = Epoch(0)
    seen: dict[bytes, tuple[bytes | None, Version | None]] = field(default_factory=dict)
    committing: bool = False

    def next_key(self) -> bytes | None:
        for key in self.keys:
            if key not in self.seen:
                return key
        return None

    def read_request(self, key: bytes) -> ReadRequest:
        return ReadRequest(
            token=0,
            ushard=ushard_of(self.shard_key, USHARDS),
            key=key,
            consistency=self.consistency,
        )

    def on_read(self, key: bytes, reply: ReadReply) -> bool:
        """Records a read; False if it falls outside the snapshot (restart the txn)."""
        if self.snapshot_seq is None:
            self.snapshot_seq = reply.applied_seq
            self.snapshot_generation = reply.generation
            self.epoch = reply.epoch
        if reply.generation != self.snapshot_generation:
            return False  # the μshard moved between two reads
        if reply.applied_seq < self.snapshot_seq:
            # The replica is behind the snapshot (it lost unsynced state in a crash, or
            # its disk was wiped): what it has is not the snapshot's state.
            return False
        version = reply.record_version
        if version is not None and (version.generation, version.seq) > (
            self.snapshot_generation,
            self.snapshot_seq,
        ):
            return False
        value = reply.item.value if reply.item is not None else None
        self.seen[key] = (value, version)
        return True

    def snapshot(self) -> Version:
        assert self.snapshot_seq is not None
        return Version(self.snapshot_generation, self.snapshot_seq, SNAPSHOT_INDEX_MAX)


def plan_transaction(rng: random.Random) -> Transaction:
    """A random transaction; the caller picks its replica (`target`)."""
    roll = rng.random()
    kind: Kind
    if roll < 0.45:
        kind, keys, shard_key = "transfer", tuple(rng.sample(ACCOUNTS, 2)), BANK_SHARD_KEY
    elif roll < 0.65:
        kind, keys, shard_key = "audit", ACCOUNTS, BANK_SHARD_KEY
    elif roll < 0.9:
        kind, keys, shard_key = "oncall", DOCTORS, ONCALL_SHARD_KEY
    else:
        kind, keys, shard_key = "oncall_audit", DOCTORS, ONCALL_SHARD_KEY
    return Transaction(
        kind=kind,
        keys=keys,
        shard_key=shard_key,
        target=None,
        consistency=Consistency.STRONG if rng.random() < 0.5 else Consistency.EVENTUAL,
    )


def commit_request(
    txn: Transaction, request: RequestId, rng: random.Random, *, skip_absent_bug: bool
) -> WriteRequest | None:
    """The commit of a read-write transaction, or None when it has nothing to write."""
    writes = _writes(txn, rng)
    if not writes:
        return None
    reads = tuple(
        TxnRead(key, version)
        for key, (_value, version) in sorted(txn.seen.items())
        if not (skip_absent_bug and version is None)
    )
    command = TxnCommit(
        request=request,
        ushard=ushard_of(txn.shard_key, USHARDS),
        snapshot=txn.snapshot(),
        epoch=txn.epoch,
        reads=reads,
        writes=writes,
    )
    return WriteRequest(token=0, command=encode_command(command))


def _writes(txn: Transaction, rng: random.Random) -> tuple[TxnWrite, ...]:
    if txn.kind == "transfer":
        src, dst = txn.keys
        balance = {k: decode_amount(v, INITIAL_BALANCE) for k, (v, _) in txn.seen.items()}
        amount = rng.randint(1, 30)
        if balance[src] < amount:
            return ()
        return (
            TxnWrite(src, b"%d" % (balance[src] - amount)),
            TxnWrite(dst, b"%d" % (balance[dst] + amount)),
        )
    if txn.kind == "oncall":
        on = {k: decode_amount(v, 1) for k, (v, _) in txn.seen.items()}
        if sum(on.values()) == len(on):
            return (TxnWrite(rng.choice(sorted(on)), b"0"),)
        return tuple(TxnWrite(k, b"1") for k in sorted(on) if on[k] == 0)
    return ()


def audit_problem(txn: Transaction) -> str | None:
    """The invariant a validated read-only snapshot must show, or None if it holds."""
    if txn.kind == "audit":
        total = sum(decode_amount(v, INITIAL_BALANCE) for v, _ in txn.seen.values())
        if total != INITIAL_BALANCE * len(ACCOUNTS):
            return f"bank: an audit at seq {txn.snapshot_seq} saw a total of {total}"
    if txn.kind == "oncall_audit":
        on = sum(decode_amount(v, 1) for v, _ in txn.seen.values())
        if on < 1:
            return f"write skew: nobody on call at seq {txn.snapshot_seq}"
    return None
