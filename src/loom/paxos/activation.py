"""Phase 1 of a new primary: collect promises, then choose the log it re-proposes.

Rules (DESIGN §3, PITFALLS 3, 15):
- promises must come from a majority of *every* config since the last activated one;
  a promise that reveals an unknown later config adds it to that set;
- every slot at or below the highest commit point among the promises is chosen: its
  value must be found among the promises, else activation cannot proceed here; where
  a promiser left the slot out because it truncated it, only a value some promiser
  has committed counts (an older accepted value elsewhere may not be the chosen one);
- above it, each slot takes the value of the highest ballot among the promises and
  holes become no-ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loom.core.ids import Ballot, Epoch, NodeId, Seq
from loom.paxos.messages import Config, Entry, Promise


@dataclass(slots=True, kw_only=True)
class Candidacy:
    ballot: Ballot
    config: Config
    activated_epoch: Epoch
    required: list[Config]
    # The candidate's commit point when it prepared: promises omit entries at or below it.
    own_commit_seq: Seq
    promises: dict[NodeId, Promise] = field(default_factory=dict)

    def targets(self) -> list[NodeId]:
        return sorted({node for config in self.required for node in config.acceptors})

    def add(self, node: NodeId, promise: Promise, *, follow_prior_configs: bool) -> list[NodeId]:
        """Records a promise; returns acceptors newly required (to prepare them too)."""
        self.promises[node] = promise
        prior = promise.prior_config
        if (
            follow_prior_configs
            and prior is not None
            and prior.epoch > self.activated_epoch
            and all(prior != known for known in self.required)
        ):
            before = set(self.targets())
            self.required.append(prior)
            return sorted(set(self.targets()) - before)
        return []

    def has_quorum(self) -> bool:
        return all(
            sum(1 for node in config.acceptors if node in self.promises) >= config.majority()
            for config in self.required
        )


def choose_log(
    candidacy: Candidacy, *, own_entries: dict[Seq, Entry], noop_below_commit_bug: bool
) -> list[Entry] | None:
    """The entries above the candidate's commit point, re-stamped with its ballot.

    None when a chosen slot's value is not among the promises (a promiser truncated
    it): the candidate must not invent one.
    """
    c0 = candidacy.own_commit_seq
    promises = candidacy.promises.values()
    highest_commit = max([c0, *(p.commit_seq for p in promises)])
    # Slots at or below this were left out of some promise because that acceptor
    # truncated them: its (chosen) value is missing from the highest-ballot vote.
    truncated = max([c0, *(p.truncated_seq for p in promises)])
    best: dict[Seq, Entry] = {}
    committed: dict[Seq, Entry] = {}  # values their promiser has committed: chosen
    for node in sorted(candidacy.promises):
        promise = candidacy.promises[node]
        for entry in promise.entries:
            if entry.seq <= c0:
                continue
            known = best.get(entry.seq)
            if known is None or entry.ballot > known.ballot:
                best[entry.seq] = entry
            if entry.seq <= promise.commit_seq:
                committed[entry.seq] = entry
    for seq in range(c0 + 1, min(truncated, highest_commit) + 1):
        # Chosen, and an acceptor that may hold the chosen value left it out: only a
        # value someone committed is known to be it; an older accepted value (say a
        # lagging acceptor's own, from before it missed the slot's real choice) is not.
        if Seq(seq) in committed:
            best[Seq(seq)] = committed[Seq(seq)]
        else:
            best.pop(Seq(seq), None)
    return _fill(candidacy, best, highest_commit, own_entries, noop_below_commit_bug)


def _fill(
    candidacy: Candidacy,
    best: dict[Seq, Entry],
    highest_commit: Seq,
    own_entries: dict[Seq, Entry],
    noop_below_commit_bug: bool,
) -> list[Entry] | None:
    c0 = candidacy.own_commit_seq
    top = max([highest_commit, *best])
    chosen: list[Entry] = []
    for seq in range(c0 + 1, top + 1):
        slot = Seq(seq)
        value = best.get(slot)
        if noop_below_commit_bug and slot <= highest_commit:
            # Deliberate bug: trusts only its own log below the commit point.
            value = own_entries.get(slot)
        if value is None:
            if slot <= highest_commit and not noop_below_commit_bug:
                return None
            chosen.append(Entry(candidacy.ballot, slot, 0, candidacy.ballot.epoch, ()))
        else:
            chosen.append(Entry(candidacy.ballot, slot, value.wall_ms, value.epoch, value.commands))
    return chosen
