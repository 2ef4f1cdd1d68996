"""Fault settings of a simulation run, by named profile."""

from __future__ import annotations

from dataclasses import dataclass

# "moves" is "all" plus μshard moves; "all" keeps its schedules of before moves existed,
# so the seeds recorded for deliberate bugs keep catching them.
# "handoffs" is "all" plus planned primary hand-offs (the manager's transfer_primary,
# which releases the old primary's lease), drawn from their own random stream.
PROFILES = ("none", "network", "crash", "all", "moves", "handoffs")


@dataclass(frozen=True, slots=True, kw_only=True)
class Faults:
    loss: float = 0.0
    duplicate: float = 0.0
    # Probability that a message takes a long detour (reordering past later ones).
    detour: float = 0.0
    detour_ms_max: float = 0.0
    partitions: bool = False
    crashes: bool = False
    # Clock rates drift within ±(this fraction of the protocol's bound).
    drift_fraction: float = 0.0
    sm_chaos: bool = False
    reconfigure: bool = False
    # μshards move between p-shards while the load runs (loom.sim.moves).
    moves: bool = False
    # Planned primary hand-offs while the load runs (loom.sim.chaos).
    handoffs: bool = False

    @staticmethod
    def profile(name: str) -> Faults:
        match name:
            case "none":
                return Faults()
            case "network":
                return Faults(
                    loss=0.03,
                    duplicate=0.02,
                    detour=0.03,
                    detour_ms_max=1000.0,
                    partitions=True,
                    drift_fraction=1.0,
                )
            case "crash":
                return Faults(crashes=True, drift_fraction=1.0, reconfigure=True)
            case "all" | "moves" | "handoffs":
                return Faults(
                    moves=name == "moves",
                    handoffs=name == "handoffs",
                    loss=0.03,
                    duplicate=0.02,
                    detour=0.03,
                    detour_ms_max=1000.0,
                    partitions=True,
                    crashes=True,
                    drift_fraction=1.0,
                    sm_chaos=True,
                    reconfigure=True,
                )
            case _:
                raise ValueError(f"unknown fault profile {name!r}; choose from {PROFILES}")
