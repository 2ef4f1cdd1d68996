"""`EtcdMetastore`: the shard manager's metastore in etcd, for several `loom sm` processes.

It implements `loom.shardmgr.metastore.Metastore` over etcd's JSON gateway (etcd ≥ 3.4
serves gRPC-as-JSON under `/v3/...` on its client URL; keys and values travel as base64,
int64 fields as strings). ADR 0006 says why this and not a gRPC client. Rules:

- **Revision = etcd `mod_revision`.** It comes from etcd's store-wide counter, so it
  increases strictly per key, also across a delete and a re-create (no ABA), which is
  exactly the port's rule. Keys live under `prefix` (default `/loom/`).
- **compare_and_swap is one etcd Txn**: compare `mod_revision == expected` (or
  `create_revision == 0` for "absent"); success: put, then range; failure: range. Both
  answers carry the current (value, revision), and after a put that revision must be the
  txn's header revision — anything else is an answer we do not understand.
- **list is a consistent snapshot**: pages of `LIST_PAGE_ENTRIES`, every page after the
  first read at the first page's revision, so a concurrent writer cannot make us see a
  mix. At most `LIST_ENTRIES_MAX` entries; more is `InvalidArgument` (narrow the prefix).
- **Failover between endpoints.** A request that certainly did not reach etcd (no
  connection, a member without a leader) goes to the next endpoint. A *mutation* that
  may have reached etcd but got no answer is not replayed elsewhere: it raises
  `EtcdOutcomeUnknown` (an `Unavailable` and an `OutcomeUnknown`). Replaying it would be
  safe for epochs (a CAS either lands once or reports the new revision) but would tell a
  winner it lost. Reads fail over on any failure.
- **Errors**: every failure becomes `Unavailable` (or `InvalidArgument` when etcd calls
  the request malformed, e.g. too large); no httpx or msgspec exception escapes. Keys or
  values under our prefix that break the port's limits raise `MetastoreCorrupt`.
- **Limits**: at most `ENDPOINTS_MAX` endpoints; every request under `timeout_s` per
  endpoint; every answer at most `ANSWER_BYTES_MAX` bytes.

Calls block on the network: asyncio drivers run them via `asyncio.to_thread`. One
instance may be shared by threads (httpx's pool is thread-safe; our only own state, the
preferred endpoint, sits under a lock). The pure helpers here (answer types, verdicts,
`EndpointRing`) are shared with `loom.runtime.leadership`.
"""

from __future__ import annotations

import builtins
import threading
import time
from collections.abc import Iterable
from enum import Enum, auto
from typing import Any, TypeVar, assert_never

import httpx
import msgspec

from loom.core.errors import InvalidArgument, LoomError, OutcomeUnknown, Unavailable
from loom.shardmgr.metastore import (
    CasResult,
    MetastoreCorrupt,
    validate_key,
    validate_prefix,
    validate_revision,
    validate_value,
)

ENDPOINTS_MAX = 16
REQUEST_TIMEOUT_S_DEFAULT = 2.0
ANSWER_BYTES_MAX = 96 * 1024 * 1024  # LIST_PAGE_ENTRIES values of 1 MiB, base64, fit
LIST_PAGE_ENTRIES = 64
LIST_ENTRIES_MAX = 100_000
LIST_RESTARTS_MAX = 3
PREFIX_BYTES_MAX = 256

# gRPC status codes the gateway answers with (google.golang.org/grpc/codes).
GRPC_INVALID_ARGUMENT = 3
GRPC_OUT_OF_RANGE = 11
# etcd refuses these before proposing anything, so no member applied the request.
NOT_PROPOSED_MESSAGES = ("etcdserver: no leader", "etcdserver: not capable")


class EtcdCompacted(Unavailable):
    """A read at a fixed revision found it compacted away; read again at a newer one."""


class EtcdOutcomeUnknown(Unavailable, OutcomeUnknown):
    """A mutation may or may not have been applied: etcd got it, no answer came back.

    Read the key again before deciding anything; a compare-and-swap retried blindly
    reports "lost" when its first attempt won.
    """


# --------------------------------------------------------------------- answers


class Header(msgspec.Struct):
    """Every etcd answer has one; requiring it keeps a stray HTTP server's `{}` from
    reading as "no such key"."""

    revision: int


class KeyValue(msgspec.Struct):
    """One etcd record. The gateway omits zero fields: an empty value has no `value`."""

    key: bytes
    create_revision: int = 0
    mod_revision: int = 0
    value: bytes = b""
    lease: int = 0


class RangeAnswer(msgspec.Struct):
    header: Header
    kvs: list[KeyValue] = []
    more: bool = False


class ResponseOp(msgspec.Struct):
    response_range: RangeAnswer | None = None


class TxnAnswer(msgspec.Struct):
    header: Header
    succeeded: bool = False
    responses: list[ResponseOp] = []


class ErrorAnswer(msgspec.Struct):
    code: int = 0
    message: str = ""


AnswerT = TypeVar("AnswerT")


def decode_answer(raw: bytes, answer_type: type[AnswerT]) -> AnswerT:
    """Decode a gateway answer; lax mode turns etcd's quoted int64s into ints."""
    return msgspec.json.decode(raw, type=answer_type, strict=False)


def encode_request(body: dict[str, Any]) -> bytes:
    """JSON with bytes as base64, which is how the gateway expects keys and values."""
    return msgspec.json.encode(body)


def compare_absent(key: bytes) -> dict[str, Any]:
    """A txn compare that holds iff `key` does not exist (etcd's create_revision is 0)."""
    return {"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}


def compare_mod_revision(key: bytes, revision: int) -> dict[str, Any]:
    """A txn compare that holds iff `key` exists and was last written at `revision`."""
    return {"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def prefix_range_end(key: bytes) -> bytes:
    """The `range_end` that selects every key starting with `key` (etcd's rule)."""
    end = bytearray(key)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\x00"  # every key >= key
    end[-1] += 1
    return bytes(end)


# -------------------------------------------------------------------- failures


class Verdict(Enum):
    """What a failed attempt at one endpoint allows next."""

    TRY_NEXT = auto()  # not applied anywhere; another member may answer
    UNKNOWN = auto()  # a mutation may have been applied; stop and say so
    REFUSED = auto()  # etcd calls the request malformed; every member would refuse it
    COMPACTED = auto()  # the revision a read asked for is compacted on every member


class AttemptFailed(Exception):
    """One endpoint failed to answer; carries what the caller may do about it."""

    def __init__(self, verdict: Verdict, description: str) -> None:
        super().__init__(description)
        self.verdict = verdict
        self.description = description


def judge_transport_error(exc: httpx.HTTPError, *, mutation: bool) -> Verdict:
    """A connect-phase failure sent nothing; later failures may have delivered the request."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return Verdict.TRY_NEXT
    return Verdict.UNKNOWN if mutation else Verdict.TRY_NEXT


def judge_error_answer(status: int, raw: bytes, *, mutation: bool) -> AttemptFailed:
    """Turn a non-200 gateway answer into a verdict and a readable description."""
    try:
        error = decode_answer(raw, ErrorAnswer)
    except msgspec.MsgspecError:
        error = ErrorAnswer(message=raw[:200].decode("utf-8", "replace"))
    description = f"HTTP {status}, gRPC code {error.code}: {error.message}"
    if error.code == GRPC_INVALID_ARGUMENT:
        return AttemptFailed(Verdict.REFUSED, description)
    if error.code == GRPC_OUT_OF_RANGE and not mutation:
        return AttemptFailed(Verdict.COMPACTED, description)
    if not mutation or error.message in NOT_PROPOSED_MESSAGES:
        return AttemptFailed(Verdict.TRY_NEXT, description)
    return AttemptFailed(Verdict.UNKNOWN, description)


def failure_error(path: str, failures: list[str], last: AttemptFailed | None) -> LoomError:
    """After the attempts ended a call: the typed error that tells the caller what happened."""
    summary = "; ".join(failures)
    verdict = Verdict.TRY_NEXT if last is None else last.verdict
    match verdict:
        case Verdict.REFUSED:
            return InvalidArgument(f"etcd refused {path}: {summary}")
        case Verdict.UNKNOWN:
            return EtcdOutcomeUnknown(f"etcd may or may not have applied {path}: {summary}")
        case Verdict.COMPACTED:
            return EtcdCompacted(f"etcd compacted the revision {path} asked for: {summary}")
        case Verdict.TRY_NEXT:
            return Unavailable(f"no etcd endpoint answered {path}: {summary}")
        case _:
            assert_never(verdict)


def read_bounded(chunks: Iterable[bytes], deadline: float) -> bytes:
    """Collect an answer body, refusing one over ANSWER_BYTES_MAX or past `deadline`."""
    body = bytearray()
    for chunk in chunks:
        body += chunk
        if len(body) > ANSWER_BYTES_MAX:
            raise httpx.ReadError(f"answer over {ANSWER_BYTES_MAX} bytes")
        if time.monotonic() > deadline:
            raise httpx.ReadTimeout("answer took longer than the request timeout")
    return bytes(body)


class EndpointRing:
    """The endpoints in failover order: start at the last one that answered."""

    def __init__(self, endpoints: list[str]) -> None:
        self.endpoints = validate_endpoints(endpoints)
        self._preferred = 0
        self._lock = threading.Lock()

    def order(self) -> list[str]:
        with self._lock:
            start = self._preferred
        return self.endpoints[start:] + self.endpoints[:start]

    def answered(self, endpoint: str) -> None:
        with self._lock:
            self._preferred = self.endpoints.index(endpoint)

    def failed(self, endpoint: str) -> None:
        """Move on, so the next call does not start at a member that just failed."""
        with self._lock:
            if self.endpoints[self._preferred] == endpoint:
                self._preferred = (self._preferred + 1) % len(self.endpoints)


def validate_endpoints(endpoints: list[str]) -> list[str]:
    """Raise InvalidArgument unless there are 1..ENDPOINTS_MAX http(s) URLs."""
    if not isinstance(endpoints, list) or not 1 <= len(endpoints) <= ENDPOINTS_MAX:
        raise InvalidArgument(f"etcd endpoints must be a list of 1..{ENDPOINTS_MAX} URLs")
    cleaned = []
    for endpoint in endpoints:
        try:
            url = httpx.URL(endpoint)
        except (httpx.InvalidURL, TypeError) as exc:
            raise InvalidArgument(f"etcd endpoint {endpoint!r} is not a URL: {exc}") from exc
        if url.scheme not in {"http", "https"} or not url.host:
            raise InvalidArgument(f"etcd endpoint {endpoint!r} must be http(s)://host:port")
        cleaned.append(str(endpoint).rstrip("/"))
    return cleaned


def validate_timeout(timeout_s: float) -> float:
    if not isinstance(timeout_s, int | float) or not 0 < timeout_s <= 60:
        raise InvalidArgument(f"etcd timeout_s must be in (0, 60], not {timeout_s!r}")
    return float(timeout_s)


# ------------------------------------------------------------------ the client


class SyncGateway:
    """POSTs to the JSON gateway with failover; decodes the answer inside the attempt."""

    def __init__(self, endpoints: list[str], timeout_s: float) -> None:
        self._ring = EndpointRing(endpoints)
        self._timeout_s = validate_timeout(timeout_s)
        # trust_env=False: endpoints are explicit; a proxy from the environment must not
        # sit between the shard manager and its metastore.
        self._client = httpx.Client(timeout=self._timeout_s, trust_env=False)

    def call(
        self, path: str, body: dict[str, Any], answer_type: type[AnswerT], *, mutation: bool
    ) -> AnswerT:
        failures: list[str] = []
        last: AttemptFailed | None = None
        for endpoint in self._ring.order():
            try:
                answer = self._attempt(endpoint, path, body, answer_type, mutation=mutation)
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

    def _attempt(
        self,
        endpoint: str,
        path: str,
        body: dict[str, Any],
        answer_type: type[AnswerT],
        *,
        mutation: bool,
    ) -> AnswerT:
        deadline = time.monotonic() + self._timeout_s
        try:
            with self._client.stream("POST", endpoint + path, content=encode_request(body)) as r:
                raw = read_bounded(r.iter_bytes(), deadline)
                status = r.status_code
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

    def close(self) -> None:
        self._client.close()


class EtcdMetastore:
    """The Metastore port over etcd; several shard managers may share one prefix."""

    def __init__(
        self,
        endpoints: list[str],
        prefix: str = "/loom/",
        timeout_s: float = REQUEST_TIMEOUT_S_DEFAULT,
    ) -> None:
        validate_prefix(prefix)
        if not prefix or len(prefix.encode("utf-8")) > PREFIX_BYTES_MAX:
            raise InvalidArgument("etcd metastore prefix must be 1..256 UTF-8 bytes")
        self._prefix = prefix.encode("utf-8")
        self._gateway = SyncGateway(endpoints, timeout_s)

    def __enter__(self) -> EtcdMetastore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._gateway.close()

    def get(self, key: str) -> tuple[bytes, int] | None:
        validate_key(key)
        body = {"key": self._etcd_key(key)}
        answer = self._gateway.call("/v3/kv/range", body, RangeAnswer, mutation=False)
        return self._current(answer)

    def compare_and_swap(self, key: str, expected_revision: int | None, value: bytes) -> CasResult:
        validate_key(key)
        validate_revision(expected_revision, may_be_none=True)
        validate_value(value)
        etcd_key = self._etcd_key(key)
        if expected_revision is None:
            compare = compare_absent(etcd_key)
        else:
            compare = compare_mod_revision(etcd_key, expected_revision)
        read_back = {"request_range": {"key": etcd_key}}
        body = {
            "compare": [compare],
            "success": [{"request_put": {"key": etcd_key, "value": value}}, read_back],
            "failure": [read_back],
        }
        answer = self._gateway.call("/v3/kv/txn", body, TxnAnswer, mutation=True)
        last = answer.responses[-1].response_range if answer.responses else None
        if last is None:
            raise EtcdOutcomeUnknown("etcd answered a txn without the range we asked for")
        current = self._current(last)
        if answer.succeeded and current != (value, answer.header.revision):
            # The put happened, but the answer does not show it: we cannot say what is stored.
            raise EtcdOutcomeUnknown(f"etcd answered a successful put with {current!r}")
        return CasResult(ok=answer.succeeded, current=current)

    def delete(self, key: str, expected_revision: int) -> bool:
        validate_key(key)
        validate_revision(expected_revision, may_be_none=False)
        etcd_key = self._etcd_key(key)
        body = {
            "compare": [compare_mod_revision(etcd_key, expected_revision)],
            "success": [{"request_delete_range": {"key": etcd_key}}],
            "failure": [],
        }
        return self._gateway.call("/v3/kv/txn", body, TxnAnswer, mutation=True).succeeded

    def list(self, prefix: str) -> builtins.list[tuple[str, bytes, int]]:
        validate_prefix(prefix)
        start = self._etcd_key(prefix)
        for _ in range(LIST_RESTARTS_MAX):
            try:
                return self._list_snapshot(start, prefix_range_end(start))
            except EtcdCompacted:
                continue  # the snapshot's revision was compacted away; take a new one
        raise Unavailable(f"etcd compacted every list snapshot of {prefix!r}; try again")

    # ------------------------------------------------------------------ steps

    def _list_snapshot(self, start: bytes, end: bytes) -> builtins.list[tuple[str, bytes, int]]:
        listed: builtins.list[tuple[str, bytes, int]] = []
        page: dict[str, Any] = {"key": start, "range_end": end, "limit": str(LIST_PAGE_ENTRIES)}
        for _ in range(LIST_ENTRIES_MAX // LIST_PAGE_ENTRIES + 1):
            answer = self._gateway.call("/v3/kv/range", page, RangeAnswer, mutation=False)
            listed.extend(self._record(kv) for kv in answer.kvs)
            if len(listed) > LIST_ENTRIES_MAX:
                break
            if not answer.more or not answer.kvs:
                return sorted(listed)
            # Later pages read at the first page's revision: one consistent snapshot.
            page["revision"] = page.get("revision", str(answer.header.revision))
            page["key"] = answer.kvs[-1].key + b"\x00"
        raise InvalidArgument(f"more than {LIST_ENTRIES_MAX} metastore keys under the prefix")

    def _etcd_key(self, key: str) -> bytes:
        return self._prefix + key.encode("utf-8")

    def _current(self, answer: RangeAnswer) -> tuple[bytes, int] | None:
        if not answer.kvs:
            return None
        _, value, revision = self._record(answer.kvs[0])
        return value, revision

    def _record(self, kv: KeyValue) -> tuple[str, bytes, int]:
        """Decode one record under our prefix; one the port could not hold is corrupt."""
        if not kv.key.startswith(self._prefix):
            raise Unavailable(f"etcd answered a key outside our prefix: {kv.key[:80]!r}")
        try:
            key = kv.key[len(self._prefix) :].decode("utf-8")
            validate_key(key)
            validate_value(kv.value)
            validate_revision(kv.mod_revision, may_be_none=False)
        except (UnicodeDecodeError, InvalidArgument) as exc:
            raise MetastoreCorrupt(f"etcd record {kv.key[:80]!r} breaks the port: {exc}") from exc
        return key, kv.value, kv.mod_revision
