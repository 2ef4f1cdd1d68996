"""Keyspaces, their μshard → p-shard mappings, placement, and the routing table.

DESIGN §2: `ushard = stable_hash(shard_key or key) % ushards`; a keyspace's mapping
sends each μshard to one p-shard. The mapping is a sorted tuple of ranges
`(first μshard, p-shard)`: *compact* mapping is one range per p-shard; moves
(resharding, Akkio placement) split ranges further without changing the format.

The routing table is what clients and nodes cache: keyspaces, p-shard members and
primaries, node addresses. It is advisory — a stale table only costs a `NOT_PRIMARY`
answer and a refresh; safety rests on ballots and epochs, never on routing.

Pure: no IO. Wire format v1 (msgspec structs).
"""

from __future__ import annotations

import bisect
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import msgspec
from msgspec import Struct
from msgspec.structs import replace

from loom.core.ids import NodeId, ShardId, UShard
from loom.shardmgr.tenancy import Tenant, TokenGrant

DEFAULT_TIER = "wildcard"
KEYSPACE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
LABEL = re.compile(r"[A-Za-z0-9_.-]{0,64}")
SHARDS_PER_KEYSPACE_MAX = 1024
USHARDS_MAX = 65_536
REPLICATION_FACTORS = (1, 3, 5)
REGIONS_MAX = 16
MAPPINGS = ("compact", "akkio")
# Quota limits: far above what one cluster serves, low enough that float and int
# arithmetic on them stays exact (token buckets, byte shares).
QUOTA_RATE_MAX = 1e9
QUOTA_BYTES_MAX = 2**60


class NodeInfo(Struct, frozen=True, kw_only=True):
    """What a node says about itself in its heartbeats."""

    node: NodeId
    host: str
    port: int
    region: str = ""
    zone: str = ""
    tier: str = DEFAULT_TIER
    pid: int = 0


class KeyspaceSpec(Struct, frozen=True, kw_only=True):
    """What an operator asks for; checked by `problem()` before anything is allocated."""

    name: str
    shards: int = 1
    replication: int = 3
    ushards: int = 4096
    tier: str = DEFAULT_TIER
    regions: tuple[str, ...] = ()
    # μshard → p-shard mapping policy: "compact" (contiguous ranges, moved only by
    # resharding) or "akkio" (each μshard moves to where it is accessed; ADR 0013).
    mapping: str = "compact"

    def problem(self) -> str | None:
        """Why this spec cannot be created, or None."""
        if not KEYSPACE_NAME.fullmatch(self.name):
            return (
                f"keyspace name {self.name!r} must be 1-64 characters of letters, digits, "
                "'_', '.', '-', not starting with '.' or '-'"
            )
        if not 1 <= self.shards <= SHARDS_PER_KEYSPACE_MAX:
            return f"shards must be 1..{SHARDS_PER_KEYSPACE_MAX}, not {self.shards}"
        if self.replication not in REPLICATION_FACTORS:
            return f"replication must be one of {REPLICATION_FACTORS}, not {self.replication}"
        if not self.shards <= self.ushards <= USHARDS_MAX:
            return f"ushards must be {self.shards}..{USHARDS_MAX} (≥ shards), not {self.ushards}"
        if not LABEL.fullmatch(self.tier) or not self.tier:
            return f"tier {self.tier!r} is not a valid label"
        if len(self.regions) > REGIONS_MAX or not all(
            r and LABEL.fullmatch(r) for r in self.regions
        ):
            return f"regions must be at most {REGIONS_MAX} valid labels"
        if self.mapping not in MAPPINGS:
            return f"mapping must be one of {', '.join(MAPPINGS)}, not {self.mapping!r}"
        return None


class Quota(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A keyspace's cluster-wide limits; None is unlimited. Nodes enforce their share of
    it (`loom.shardmgr.quotas`, ADR 0008)."""

    reads_per_s: float | None = None
    writes_per_s: float | None = None
    bytes_max: int | None = None

    def problem(self) -> str | None:
        """Why this quota cannot be set, or None."""
        for name, rate in (("reads_per_s", self.reads_per_s), ("writes_per_s", self.writes_per_s)):
            if rate is not None and not (math.isfinite(rate) and 0 < rate <= QUOTA_RATE_MAX):
                return f"{name} must be in (0, {QUOTA_RATE_MAX:g}] or unlimited, not {rate!r}"
        if self.bytes_max is not None and not 0 < self.bytes_max <= QUOTA_BYTES_MAX:
            return f"bytes_max must be 1..{QUOTA_BYTES_MAX} or unlimited, not {self.bytes_max!r}"
        return None

    def is_unlimited(self) -> bool:
        return self.reads_per_s is None and self.writes_per_s is None and self.bytes_max is None


UNLIMITED = Quota()


class ShardPlacement(Struct, frozen=True, array_like=True):
    """A p-shard of a keyspace and its first acceptors (the first is its first primary)."""

    shard: ShardId
    acceptors: tuple[NodeId, ...]
    # The μshards the p-shard was created with, as [first, end) ranges; None (records
    # of before moves): every μshard. A p-shard a reshard adds starts with none. Fixed
    # for the p-shard's life: its replicas' ownership defaults (kvstate.ownership).
    initial: tuple[tuple[int, int], ...] | None = None

    def initial_ushards(self) -> frozenset[UShard] | None:
        if self.initial is None:
            return None
        return frozenset(UShard(u) for first, end in self.initial for u in range(first, end))


class Keyspace(Struct, frozen=True, kw_only=True):
    spec: KeyspaceSpec
    placements: tuple[ShardPlacement, ...]
    # Sorted (first μshard, p-shard) ranges covering 0..ushards-1, starting at 0.
    ranges: tuple[tuple[int, ShardId], ...]
    mapping_version: int = 1
    # Multi-tenancy (ADR 0008): the owning tenant ("" before auth) and the quota.
    tenant: str = ""
    quota: Quota = UNLIMITED
    # A shrink (loom.shardmgr.shrink): the p-shards being retired. While they are still
    # in `placements`, their μshards move to the others; once removed from
    # `placements`, their replicas are being dropped on the nodes.
    retiring: tuple[ShardId, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    def shard_of(self, ushard: int) -> ShardId:
        """The p-shard that owns `ushard` under this mapping."""
        assert 0 <= ushard < self.spec.ushards
        index = bisect.bisect_right(self.ranges, ushard, key=lambda r: r[0]) - 1
        return self.ranges[index][1]

    def shards(self) -> tuple[ShardId, ...]:
        return tuple(p.shard for p in self.placements)

    def placement(self, shard: ShardId) -> ShardPlacement | None:
        return next((p for p in self.placements if p.shard == shard), None)

    def mapping(self) -> dict[UShard, ShardId]:
        return {UShard(u): self.shard_of(u) for u in range(self.spec.ushards)}

    def with_ushard(self, ushard: int, shard: ShardId) -> Keyspace:
        """The next mapping version, with `ushard` on `shard` (a committed move)."""
        assert 0 <= ushard < self.spec.ushards and shard in self.shards()
        owners = [self.shard_of(u) for u in range(self.spec.ushards)]
        owners[ushard] = shard
        ranges = tuple(
            (u, owner) for u, owner in enumerate(owners) if u == 0 or owners[u - 1] != owner
        )
        return msgspec.structs.replace(
            self, ranges=ranges, mapping_version=self.mapping_version + 1
        )


def compact_ranges(ushards: int, shards: Sequence[ShardId]) -> tuple[tuple[int, ShardId], ...]:
    """Contiguous, near-equal μshard ranges, one per p-shard, in order."""
    assert 1 <= len(shards) <= ushards
    return tuple((i * ushards // len(shards), shard) for i, shard in enumerate(shards))


class ShardRoute(Struct, frozen=True, kw_only=True):
    shard: ShardId
    keyspace: str
    epoch: int
    primary: NodeId
    acceptors: tuple[NodeId, ...]
    followers: tuple[NodeId, ...] = ()
    ready: bool = False  # the primary has activated


class NodeRoute(Struct, frozen=True, kw_only=True):
    info: NodeInfo
    alive: bool


class RoutingTable(Struct, frozen=True, kw_only=True, tag="rt1"):
    """`version` orders tables from one manager: (manager term, change counter)."""

    version: tuple[int, int]
    keyspaces: tuple[Keyspace, ...]
    shards: tuple[ShardRoute, ...]
    nodes: tuple[NodeRoute, ...]
    manager: str = ""  # the leading shard manager's HOST:PORT, for operator calls
    manager_region: str = ""  # its region label (the latency matrix, runtime/latency.py)
    # Multi-tenancy (ADR 0008). `auth`: requests must carry a token. `tokens` (hashes,
    # never secrets) reach nodes only: what nodes and the manager serve to clients is
    # `for_clients()`, without them.
    auth: bool = False
    tenants: tuple[Tenant, ...] = ()
    tokens: tuple[TokenGrant, ...] = ()

    def for_clients(self) -> RoutingTable:
        return replace(self, tokens=()) if self.tokens else self


EMPTY_TABLE = RoutingTable(version=(0, 0), keyspaces=(), shards=(), nodes=())


# ------------------------------------------------------------------ placement


class PlacementError(Exception):
    """Not enough live nodes in the tier/regions for the replication asked."""


def place(
    spec: KeyspaceSpec,
    shards: Sequence[ShardId],
    nodes: Iterable[NodeInfo],
    replicas_on: Mapping[NodeId, int],
    primaries_on: Mapping[NodeId, int],
) -> tuple[ShardPlacement, ...]:
    """Acceptors for each new p-shard: spread over regions, then zones, then the least
    loaded nodes; the first acceptor (the first primary) on the node with fewest
    primaries. `replicas_on`/`primaries_on`: the load already on each node."""
    eligible = [
        n for n in nodes if n.tier == spec.tier and (not spec.regions or n.region in spec.regions)
    ]
    if len(eligible) < spec.replication:
        where = f"tier {spec.tier!r}" + (
            f" in regions {list(spec.regions)}" if spec.regions else ""
        )
        raise PlacementError(
            f"replication {spec.replication} needs {spec.replication} live nodes in {where}; "
            f"{len(eligible)} available"
        )
    replicas = Counter(replicas_on)
    primaries = Counter(primaries_on)
    placements = []
    for shard in shards:
        chosen: list[NodeInfo] = []
        for _ in range(spec.replication):
            regions = Counter(n.region for n in chosen)
            zones = Counter((n.region, n.zone) for n in chosen)
            best = min(
                (n for n in eligible if n not in chosen),
                key=lambda n: (
                    regions[n.region],
                    zones[(n.region, n.zone)],
                    replicas[n.node],
                    n.node,
                ),
            )
            chosen.append(best)
            replicas[best.node] += 1
        first = min(chosen, key=lambda n: (primaries[n.node], n.node))
        primaries[first.node] += 1
        acceptors = (first.node, *(n.node for n in chosen if n is not first))
        placements.append(ShardPlacement(shard, acceptors))
    return tuple(placements)
