"""How a kv request is retried, and which answers end its retries (DESIGN §5).

Rules: a write keeps the request id `_RequestIds.open()` gave it across every retry, so
the replicated dedupe table applies it once (PITFALLS 5); the floor (every sequence below
it is finished) travels with each write so the table can forget. Backoff is exponential
with full jitter, capped at `BACKOFF_MAX_S`, and never shorter than the server's
retry-after. A definite refusal becomes a typed error here (`_result`, `_raise_failure`);
what one attempt learned otherwise is noted in `_Attempts` for the next. Nothing here
sends or sleeps: the caller (transport.py) does. Names with a leading underscore are
private to `loom.kv`.
"""

from __future__ import annotations

import heapq
import itertools
import random
import secrets
from dataclasses import dataclass
from typing import Literal

from loom.core.errors import (
    ConditionFailed,
    InvalidArgument,
    LoomError,
    NotFound,
    PermissionDenied,
    TransactionConflict,
    Unavailable,
)
from loom.core.ids import ClientId, NodeId, RequestId, RequestSeq
from loom.kvstate.commands import Applied, Result
from loom.runtime.codec import Failure

BACKOFF_BASE_S = 0.01
BACKOFF_MAX_S = 0.5

Target = Literal["primary", "nearest"]


def _result(result: Result) -> Applied:
    """The applied result, or the typed error a rejection means."""
    if isinstance(result, Applied):
        return result
    match result.reason:
        case "condition":
            raise ConditionFailed(
                result.message + (f" (current version {result.current})" if result.current else "")
            )
        case "conflict" | "epoch" | "horizon":
            raise TransactionConflict(result.message)
        case _:
            raise InvalidArgument(result.message)


def _backoff_delay(attempt: int, retry_after_ms: int) -> float:
    """Seconds before retry `attempt`: exponential backoff with full jitter, at least the
    server's retry-after."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** min(attempt, 16))
    return max(retry_after_ms / 1000, random.uniform(0, ceiling))


def _raise_failure(failure: Failure) -> None:
    error: type[LoomError] = {
        "invalid": InvalidArgument,
        "not_found": NotFound,
        "permission": PermissionDenied,
    }.get(failure.kind, Unavailable)
    raise error(failure.message, retry_after_ms=failure.retry_after_ms or None)


class _RequestIds:
    """Request ids of this client and its floor: every sequence below it is finished."""

    def __init__(self) -> None:
        self.client = ClientId(secrets.token_hex(8))
        self._next = itertools.count(1)
        self._open: list[int] = []  # a heap; finished ones are dropped lazily
        self._finished: set[int] = set()

    def open(self) -> RequestId:
        seq = next(self._next)
        heapq.heappush(self._open, seq)
        return RequestId(self.client, RequestSeq(seq))

    def finish(self, request: RequestId) -> None:
        self._finished.add(request.seq)
        while self._open and self._open[0] in self._finished:
            self._finished.discard(heapq.heappop(self._open))

    def floor(self) -> RequestSeq:
        return RequestSeq(self._open[0]) if self._open else RequestSeq(0)


@dataclass(slots=True, kw_only=True)
class _Attempts:
    """What one request's attempts learned so far."""

    target: Target
    is_write: bool
    hint: NodeId | None = None
    uncertain: bool = False  # a write attempt got no definite answer
    overloaded: bool = False
    throttled: bool = False  # the last attempt was over a quota (THROTTLED)
    problem: str = "no attempt"
    retry_after_ms: int = 0
