"""Leader election among `loom sm` processes by an etcd lease (DESIGN §4: several sm, one leads).

**What this is for, and what it is not.** Leadership only keeps two shard managers from
fighting (both moving replicas, both bumping epochs). It is NOT what makes epochs safe:
every epoch is allocated by compare-and-swap in the metastore and persisted before it is
announced, so two processes that both believe they lead still never hand out one epoch
twice, and Paxos ballots keep replicas safe even then (DESIGN §3). A leader that has
been deposed without knowing it can waste an epoch, never duplicate one.

Rules:
- **Winning**: grant a lease of `ttl_s`, then one txn `create_revision(key) == 0 → put(key,
  name, lease)`. The key dies with the lease, so a crashed leader frees it after at most
  the TTL; `resign`/`close` revoke the lease and free it at once. While another process
  leads, `campaign` polls the key every `poll_interval_s` (a poll is one cheap range; a
  watch stream would add a long-lived request to keep healthy for little gain).
- **Losing before etcd does**: the term ends on our monotonic clock at
  `sent + min(asked, granted TTL) · (1 − clock_drift)`, where `sent` is when the grant or
  the last successful keepalive was *sent* (PITFALLS 16): etcd started counting no earlier,
  so we stop believing strictly before the server can expire the lease. `is_leader`
  reads the clock on every call, so it is right even if the keepalive task is starved;
  the keepalive task sets `lost` and records `lost_reason`. A keepalive answered with
  TTL 0 (etcd says the lease is gone) ends the term at once.
- **Tasks and time**: the only task is the keepalive task of the current term; it is
  owned here and cancelled by `resign`/`close`. Every request runs under
  `request_timeout_s` per endpoint, and a keepalive never past the term's end.
  `campaign` waits as long as someone else leads: bound it with `asyncio.timeout` or
  cancel it. Failed polls back off exponentially with jitter, capped at `backoff_max_s`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec

from loom.core.errors import InvalidArgument, Unavailable
from loom.runtime.metastore_etcd import (
    ANSWER_BYTES_MAX,
    AnswerT,
    AttemptFailed,
    EndpointRing,
    RangeAnswer,
    TxnAnswer,
    Verdict,
    compare_absent,
    decode_answer,
    encode_request,
    failure_error,
    judge_error_answer,
    judge_transport_error,
    validate_timeout,
)

LEADER_KEY_DEFAULT = "/loom/sm/leader"
NAME_BYTES_MAX = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class LeadershipParams:
    """Timings. etcd counts lease TTLs in whole seconds and may raise a short one."""

    ttl_s: int = 3
    renew_interval_s: float = 1.0  # a third of the TTL: two keepalives may fail
    retry_interval_s: float = 0.2  # after a failed keepalive
    poll_interval_s: float = 0.1  # while another process leads
    request_timeout_s: float = 1.0
    clock_drift: float = 0.05  # ρ: bound on our clock's rate error against etcd's
    backoff_max_s: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.ttl_s, int) or not 1 <= self.ttl_s <= 3600:
            raise InvalidArgument(f"ttl_s must be an int in 1..3600, not {self.ttl_s!r}")
        if not 0 <= self.clock_drift < 0.5:
            raise InvalidArgument("clock_drift must be in [0, 0.5)")
        term_s = self.ttl_s * (1 - self.clock_drift)
        for name in ("renew_interval_s", "retry_interval_s", "poll_interval_s"):
            if not 0 < getattr(self, name) < term_s:
                raise InvalidArgument(f"{name} must be in (0, ttl_s·(1−clock_drift))")
        validate_timeout(self.request_timeout_s)
        if not 0 < self.backoff_max_s <= 60:
            raise InvalidArgument("backoff_max_s must be in (0, 60]")


class LeaseGrantAnswer(msgspec.Struct):
    ID: int = 0
    TTL: int = 0


class KeepAliveResult(msgspec.Struct):
    ID: int = 0
    TTL: int = 0  # 0 (omitted): etcd no longer knows the lease


class KeepAliveAnswer(msgspec.Struct):
    """One message of the keepalive stream; an error message has no `result`."""

    result: KeepAliveResult | None = None


@dataclass(slots=True, kw_only=True)
class _Term:
    name: str
    lease_id: int
    deadline: float  # time.monotonic() at which we stop believing we lead
    ended: bool = False
    task: asyncio.Task[None] | None = None


class AsyncGateway:
    """The JSON gateway from asyncio, with the same failover verdicts as the metastore."""

    def __init__(self, endpoints: list[str], timeout_s: float) -> None:
        self._ring = EndpointRing(endpoints)
        self._timeout_s = validate_timeout(timeout_s)
        self._client = httpx.AsyncClient(timeout=self._timeout_s, trust_env=False)

    async def call(
        self, path: str, body: dict[str, Any], answer_type: type[AnswerT], *, mutation: bool
    ) -> AnswerT:
        failures: list[str] = []
        last: AttemptFailed | None = None
        for endpoint in self._ring.order():
            try:
                answer = await self._attempt(endpoint + path, body, answer_type, mutation=mutation)
            except AttemptFailed as failed:
                self._ring.failed(endpoint)
                failures.append(f"{endpoint}: {failed.description}")
                last = failed
                if failed.verdict is not Verdict.TRY_NEXT:
                    break
                continue
            self._ring.answered(endpoint)
            return answer
        raise failure_error(path, failures, last)

    async def _attempt(
        self, url: str, body: dict[str, Any], answer_type: type[AnswerT], *, mutation: bool
    ) -> AnswerT:
        try:
            async with asyncio.timeout(self._timeout_s):
                raw, status = await self._post(url, body)
        except TimeoutError as exc:
            verdict = Verdict.UNKNOWN if mutation else Verdict.TRY_NEXT
            raise AttemptFailed(verdict, "no answer within the request timeout") from exc
        except httpx.HTTPError as exc:
            verdict = judge_transport_error(exc, mutation=mutation)
            raise AttemptFailed(verdict, f"{type(exc).__name__}: {exc}") from exc
        if status != httpx.codes.OK:
            raise judge_error_answer(status, raw, mutation=mutation)
        try:
            return decode_answer(raw, answer_type)
        except msgspec.MsgspecError as exc:
            verdict = Verdict.UNKNOWN if mutation else Verdict.TRY_NEXT
            raise AttemptFailed(verdict, f"malformed answer: {exc}") from exc

    async def _post(self, url: str, body: dict[str, Any]) -> tuple[bytes, int]:
        async with self._client.stream("POST", url, content=encode_request(body)) as response:
            raw = await read_bounded(response.aiter_bytes())
            return raw, response.status_code

    async def aclose(self) -> None:
        await self._client.aclose()


async def read_bounded(chunks: AsyncIterator[bytes]) -> bytes:
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > ANSWER_BYTES_MAX:
            raise httpx.ReadError(f"answer over {ANSWER_BYTES_MAX} bytes")
    return bytes(body)


def validate_name(name: str) -> bytes:
    """The UTF-8 bytes of a leader name or key; InvalidArgument unless 1..256 of them."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument("a leader name must be a non-empty str")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument("a leader name is not valid UTF-8 (lone surrogate)") from exc
    if len(encoded) > NAME_BYTES_MAX:
        raise InvalidArgument(f"a leader name is at most {NAME_BYTES_MAX} UTF-8 bytes")
    return encoded


class EtcdLeadership:
    """One contender; at most one contender per etcd key leads at a time (by lease)."""

    def __init__(
        self,
        endpoints: list[str],
        *,
        key: str = LEADER_KEY_DEFAULT,
        params: LeadershipParams | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._params = params or LeadershipParams()
        self._key = validate_name(key)
        self._gateway = AsyncGateway(endpoints, self._params.request_timeout_s)
        self._rng = rng or random.Random()
        self._term: _Term | None = None
        self._last_term: _Term | None = None
        self._lost = asyncio.Event()
        self.lost_reason: str | None = None

    async def __aenter__(self) -> EtcdLeadership:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    @property
    def is_leader(self) -> bool:
        term = self._term
        return term is not None and not term.ended and time.monotonic() < term.deadline

    @property
    def term_deadline(self) -> float | None:
        """`time.monotonic()` at which the current (or last) term ends unless renewed."""
        term = self._term or self._last_term
        return None if term is None else term.deadline

    @property
    def lost(self) -> asyncio.Event:
        """Set when the current term ends (deposed or resigned); cleared on a new win."""
        return self._lost

    async def leader(self) -> str | None:
        """The current leader's name (to redirect clients), or None; Unavailable if etcd is."""
        body = {"key": self._key}
        answer = await self._gateway.call("/v3/kv/range", body, RangeAnswer, mutation=False)
        return answer.kvs[0].value.decode("utf-8", "replace") if answer.kvs else None

    async def campaign(self, name: str) -> None:
        """Return once this process leads as `name`. Waits while another process leads."""
        encoded = validate_name(name)
        if self.is_leader:
            raise InvalidArgument("already leading; resign before campaigning again")
        await self._finish_term()
        delay = self._params.poll_interval_s
        while True:
            try:
                if await self.leader() is None and await self._try_win(name, encoded):
                    return
                delay = self._params.poll_interval_s
            except Unavailable:
                delay = min(2 * delay, self._params.backoff_max_s)
            await asyncio.sleep(delay * self._rng.uniform(0.5, 1.0))

    async def resign(self) -> None:
        """Stop leading at once, then revoke the lease so a rival need not wait the TTL."""
        term = self._term
        if term is None:
            return
        was_leading = not term.ended  # else the keepalive task revoked (or tried to)
        self._end(term, "resigned")
        await self._finish_term()
        if was_leading:
            await self._revoke(term.lease_id)

    async def close(self) -> None:
        """Resign and release the HTTP client. Cancel a running `campaign` first."""
        await self.resign()
        await self._gateway.aclose()

    # ---------------------------------------------------------------- steps

    async def _try_win(self, name: str, encoded: bytes) -> bool:
        sent = time.monotonic()
        body = {"TTL": str(self._params.ttl_s)}
        grant = await self._gateway.call("/v3/lease/grant", body, LeaseGrantAnswer, mutation=True)
        if grant.ID == 0 or grant.TTL <= 0:
            raise Unavailable(f"etcd granted no usable lease: {grant!r}")
        deadline = self._term_end(sent, grant.TTL)
        put = {"key": self._key, "value": encoded, "lease": str(grant.ID)}
        txn = {"compare": [compare_absent(self._key)], "success": [{"request_put": put}]}
        try:
            answer = await self._gateway.call("/v3/kv/txn", txn, TxnAnswer, mutation=True)
        except Unavailable:
            await self._revoke(grant.ID)  # if the put landed after all, this deletes it
            raise
        if not answer.succeeded or time.monotonic() >= deadline:
            await self._revoke(grant.ID)
            return False
        term = _Term(name=name, lease_id=grant.ID, deadline=deadline)
        self._term = term
        self._lost.clear()
        self.lost_reason = None
        term.task = asyncio.create_task(self._keep_alive(term), name=f"lease-keepalive-{name}")
        return True

    async def _keep_alive(self, term: _Term) -> None:
        """Renew until the term ends; then revoke, so a rival need not wait out the TTL."""
        delay = self._params.renew_interval_s
        while not term.ended:
            remaining = term.deadline - time.monotonic()
            if remaining <= 0:
                self._end(term, "the lease was not renewed within its TTL")
                break
            await asyncio.sleep(min(delay, remaining))
            granted = await self._renew(term)
            if granted == 0:
                self._end(term, "etcd says the lease has expired")
            delay = (
                self._params.retry_interval_s if granted is None else self._params.renew_interval_s
            )
        await self._revoke(term.lease_id)

    async def _renew(self, term: _Term) -> int | None:
        """One keepalive: the granted TTL, 0 if etcd lost the lease, None if no answer."""
        sent = time.monotonic()
        budget = term.deadline - sent
        if budget <= 0:
            return None
        body = {"ID": str(term.lease_id)}
        try:
            async with asyncio.timeout(budget):
                answer = await self._gateway.call(
                    "/v3/lease/keepalive", body, KeepAliveAnswer, mutation=False
                )
        except (TimeoutError, Unavailable):
            return None
        if answer.result is None:
            return None
        if answer.result.TTL <= 0:
            return 0
        term.deadline = max(term.deadline, self._term_end(sent, answer.result.TTL))
        return answer.result.TTL

    async def _revoke(self, lease_id: int) -> bool:
        """Best effort: an unrevoked lease still expires within its TTL."""
        body = {"ID": str(lease_id)}
        try:
            await self._gateway.call("/v3/lease/revoke", body, msgspec.Raw, mutation=False)
        except Unavailable:
            return False
        return True

    def _term_end(self, sent: float, granted_ttl_s: int) -> float:
        ttl_s = min(self._params.ttl_s, granted_ttl_s)
        return sent + ttl_s * (1 - self._params.clock_drift)

    def _end(self, term: _Term, reason: str) -> None:
        if term.ended:
            return
        term.ended = True
        self.lost_reason = reason
        self._lost.set()

    async def _finish_term(self) -> None:
        """Cancel and reap the keepalive task of the last term, if any."""
        term, self._term = self._term, None
        if term is None:
            return
        self._last_term = term
        self._end(term, "the lease was not renewed within its TTL")  # if still running
        if term.task is None:
            return
        term.task.cancel()
        await asyncio.wait({term.task})
        if not term.task.cancelled() and (failure := term.task.exception()) is not None:
            raise failure  # a bug in the keepalive task: do not hide it
