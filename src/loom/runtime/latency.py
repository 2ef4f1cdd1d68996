"""An injected inter-region latency matrix, so locality is visible on one machine.

`LatencyMatrix` holds one-way delays in ms between region labels; `LinkDelays` is one
process's view of it: its own region and the region of every address it may call
(node addresses and the shard manager's, learned from the routing table).

Rules of this module:
- the delay is applied in the RPC layer (`RpcClient.connect(delay=…)`) by the side that opens
  the connection, on every message it sends and on every reply it receives — it knows
  both ends' regions, so each message on the link waits the matrix entry once;
- off is free: with no matrix there is no delay function and the RPC client takes its
  usual path;
- bad input is a typed error (`LatencyError`, an `InvalidArgument`): an unknown region,
  a negative or non-finite delay, a matrix with a pair missing;
- an unlabelled process (region "") or an address of unknown region is not delayed.

Formats: `"a-b=40,a-c=80,b-c=60"` (use `a:b=40` when labels contain '-'), or the path
of a `.json` / `.toml` file mapping region → {region: ms}, e.g. `{"a": {"b": 40}}`.
The environment variable `LOOM_LATENCY` gives clients the matrix (`kv.connect`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from loom.core.errors import InvalidArgument
from loom.shardmgr.routing import LABEL, REGIONS_MAX, RoutingTable

LATENCY_ENV = "LOOM_LATENCY"
ONE_WAY_MS_MAX = 10_000.0

Address = tuple[str, int]


class LatencyError(InvalidArgument):
    """A latency matrix or a region that does not fit it."""


@dataclass(frozen=True, slots=True)
class LatencyMatrix:
    """One-way ms between regions; symmetric; 0 within a region."""

    ms: Mapping[tuple[str, str], float]
    regions: frozenset[str]
    text: str  # as given: passed on to child processes

    def one_way_ms(self, a: str, b: str) -> float:
        if not a or not b or a == b:
            return 0.0
        return self.ms.get((a, b), 0.0)

    def check_region(self, region: str) -> None:
        """A process's own region must be in the matrix (or unlabelled)."""
        if region and region not in self.regions:
            raise LatencyError(
                f"region {region!r} is not in the latency matrix "
                f"(regions: {', '.join(sorted(self.regions))})"
            )


def parse_latency(text: str) -> LatencyMatrix:
    """A matrix from `a-b=40,…` or from a .json/.toml file's path."""
    stripped = text.strip()
    if stripped.endswith((".json", ".toml")):
        return _from_file(Path(stripped), text)
    entries = []
    for item in (i.strip() for i in stripped.split(",")):
        if not item:
            continue
        pair, sep, value = item.partition("=")
        if not sep:
            raise LatencyError(f"latency entry {item!r} is not REGION-REGION=MS")
        a, b = _pair(pair.strip())
        entries.append((a, b, _ms(value.strip(), item)))
    return _build(entries, text)


def _pair(text: str) -> tuple[str, str]:
    if ":" in text:
        a, _, b = text.partition(":")
    elif text.count("-") == 1:
        a, _, b = text.partition("-")
    else:
        raise LatencyError(f"{text!r}: write REGION-REGION, or REGION:REGION when labels have '-'")
    return a.strip(), b.strip()


def _ms(value: object, where: str) -> float:
    if isinstance(value, bool):
        raise LatencyError(f"{where}: {value!r} is not a number of ms")
    try:
        ms = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise LatencyError(f"{where}: {value!r} is not a number of ms") from None
    if not math.isfinite(ms) or not 0 <= ms <= ONE_WAY_MS_MAX:
        raise LatencyError(f"{where}: one-way delay must be in [0, {ONE_WAY_MS_MAX:g}] ms")
    return ms


def _from_file(path: Path, text: str) -> LatencyMatrix:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise LatencyError(f"cannot read latency file {path}: {error}") from None
    try:
        data = tomllib.loads(raw.decode()) if path.suffix == ".toml" else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise LatencyError(f"latency file {path}: {error}") from None
    if not isinstance(data, dict):
        raise LatencyError(f"latency file {path}: expected a table of region → {{region: ms}}")
    entries = []
    for a, row in sorted(data.items()):
        if not isinstance(row, dict):
            raise LatencyError(f"latency file {path}: {a!r} must map regions to ms")
        entries += [(a, b, _ms(value, f"{a}-{b}")) for b, value in sorted(row.items())]
    return _build(entries, text)


def _build(entries: Iterable[tuple[str, str, float]], text: str) -> LatencyMatrix:
    ms: dict[tuple[str, str], float] = {}
    for a, b, value in entries:
        for label in (a, b):
            if not label or not LABEL.fullmatch(label):
                raise LatencyError(f"{label!r} is not a valid region label")
        if a == b:
            if value != 0:
                raise LatencyError(f"{a}-{a}: the delay within a region is 0, not {value:g}")
            continue
        if ms.get((a, b), value) != value:
            raise LatencyError(f"{a}-{b} is given twice with different delays")
        ms[(a, b)] = ms[(b, a)] = value
    regions = frozenset(r for pair in ms for r in pair)
    if not regions:
        raise LatencyError("the latency matrix is empty")
    if len(regions) > REGIONS_MAX:
        raise LatencyError(f"at most {REGIONS_MAX} regions, not {len(regions)}")
    missing = [
        f"{a}-{b}" for a in sorted(regions) for b in sorted(regions) if a < b and (a, b) not in ms
    ]
    if missing:
        raise LatencyError(f"the latency matrix has no entry for {', '.join(missing)}")
    return LatencyMatrix(ms=ms, regions=regions, text=text)


def latency_from_env() -> LatencyMatrix | None:
    text = os.environ.get(LATENCY_ENV, "").strip()
    return parse_latency(text) if text else None


class LinkDelays:
    """One process's delays: its region, the matrix, and the regions of addresses."""

    def __init__(self, matrix: LatencyMatrix | None, region: str) -> None:
        if matrix is not None:
            matrix.check_region(region)
        self.matrix = matrix
        self.region = region
        self.regions: dict[Address, str] = {}

    def learn(self, table: RoutingTable) -> None:
        """Regions of the nodes and of the manager in this routing table."""
        if self.matrix is None:
            return
        for route in table.nodes:
            self.regions[(route.info.host, route.info.port)] = route.info.region
        host, _, port = table.manager.rpartition(":")
        if host and port.isdigit():
            self.regions[(host, int(port))] = table.manager_region

    def set_region(self, address: Address, region: str) -> None:
        if self.matrix is not None:
            self.regions[address] = region

    def delay_s(self, address: Address) -> float:
        """The one-way delay of a message to `address` (0.0 when off or unknown)."""
        if self.matrix is None or not self.region:
            return 0.0
        return self.matrix.one_way_ms(self.region, self.regions.get(address, "")) / 1000

    def delay_for(self, address: Address) -> Callable[[], float] | None:
        """For `RpcClient.connect(delay=…)`: None when off (the RPC path stays as is);
        else asked per message, so a region learned later applies to open connections."""
        if self.matrix is None or not self.region:
            return None
        return functools.partial(self.delay_s, address)


def client_links(latency: str | LatencyMatrix | None, region: str | None) -> LinkDelays:
    """A client's delays: `latency` as given, else $LOOM_LATENCY; off without a region."""
    if latency is not None and not isinstance(latency, str | LatencyMatrix):
        raise LatencyError("latency must be a str, a LatencyMatrix or None")
    matrix = parse_latency(latency) if isinstance(latency, str) else latency
    if matrix is None:
        matrix = latency_from_env()
    return LinkDelays(matrix, region or "")
