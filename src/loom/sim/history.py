"""Client histories as the checkers read them.

Times are the simulator's global virtual time in ms (never a node's clock). An
operation whose outcome the client never learned (timeout, lost reply, FAST_ACK
that was never confirmed) has `outcome == "unknown"` and `completed_ms is None`:
it may have taken effect at any point after it was invoked, or never.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

OpKind = Literal["read", "write", "delete", "increment"]
Outcome = Literal["ok", "failed", "unknown"]


class _Any:
    """Marker: the operation had no precondition."""

    def __repr__(self) -> str:
        return "ANY"


ANY = _Any()


@dataclass(frozen=True, slots=True, kw_only=True)
class Operation:
    """One client operation on one key, as recorded by the simulated client.

    - read: `output` is the value seen (None = absent); `outcome` "ok".
    - write: sets the value to `value` (values are unique per write in a run).
      `expect` is its precondition on the current value (ANY = unconditional;
      None = must be absent; bytes = must equal). outcome "failed" means the
      condition was reported false, i.e. the current value differed from `expect`.
    - delete: sets the value to None, with `expect` as for write.
    - increment: adds `delta` to the integer value (absent = 0); `output` is the
      new value returned.
    """

    op_id: int
    client: str
    key: bytes
    kind: OpKind
    invoked_ms: float
    completed_ms: float | None
    outcome: Outcome
    value: bytes | None = None
    expect: bytes | _Any | None = ANY
    delta: int = 0
    output: bytes | int | None = None

    def __post_init__(self) -> None:
        assert (self.outcome == "unknown") == (self.completed_ms is None)
        assert self.completed_ms is None or self.completed_ms >= self.invoked_ms
