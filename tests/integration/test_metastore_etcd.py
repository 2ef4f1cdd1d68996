"""EtcdMetastore and EtcdLeadership against real etcd processes on 127.0.0.1.

The whole backend contract suite of `test_metastore_contract` runs here on etcd (each
test on a fresh key prefix of one shared etcd), then what only a networked backend has:
failover between endpoints, typed errors when etcd is gone or silent, and leader
election by lease. Waits are deadlines on a condition, never bare sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import json
import signal
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import test_metastore_contract as contract

from loom.core.errors import OutcomeUnknown, Unavailable
from loom.runtime.leadership import EtcdLeadership, LeadershipParams
from loom.runtime.metastore_etcd import (
    EtcdMetastore,
    EtcdOutcomeUnknown,
    Verdict,
    judge_error_answer,
    prefix_range_end,
)

from .etcd_cluster import EtcdCluster, free_ports

KEY = "shards/7/epoch"
# TTL 1 s: the test clusters' short election timeout lets etcd grant it as asked.
FAST = LeadershipParams(
    ttl_s=1,
    renew_interval_s=0.25,
    retry_interval_s=0.1,
    poll_interval_s=0.05,
    request_timeout_s=0.3,
)
SLACK_S = 2.0  # etcd's lessor looks for expired leases every 0.5 s; CI machines are slow


def unique(request: pytest.FixtureRequest) -> str:
    """A short name no other test in this session uses."""
    return hashlib.blake2b(request.node.nodeid.encode(), digest_size=8).hexdigest()


@pytest.fixture
def store(shared_etcd: EtcdCluster, request: pytest.FixtureRequest) -> Iterator[EtcdMetastore]:
    """An empty store: a fresh prefix on the session's etcd."""
    with EtcdMetastore(shared_etcd.endpoints, prefix=f"/loom-test/{unique(request)}/") as s:
        yield s


# --- the contract suite, unchanged, on etcd ------------------------------------


def contract_tests() -> dict[str, object]:
    """Every contract test that takes `store`; our `store` fixture puts it on etcd."""
    return {
        f"{name}_on_etcd": test
        for name, test in vars(contract).items()
        if name.startswith("test_")
        and callable(test)
        and "store" in inspect.signature(test).parameters
    }


CONTRACT_TESTS = contract_tests()
assert len(CONTRACT_TESTS) >= 15, sorted(CONTRACT_TESTS)  # a rename must not hide them
globals().update(CONTRACT_TESTS)


# --- endpoints and errors --------------------------------------------------------


def dead_endpoint() -> str:
    """A URL on which nothing listens (the port was free a moment ago)."""
    return f"http://127.0.0.1:{free_ports(1)[0]}"


def test_a_dead_first_endpoint_fails_over_to_a_live_one(shared_etcd: EtcdCluster) -> None:
    endpoints = [dead_endpoint(), *shared_etcd.endpoints]
    with EtcdMetastore(endpoints, prefix="/loom-test/failover/", timeout_s=1.0) as store:
        created = store.compare_and_swap(KEY, None, b"1")
        assert created.ok and created.current is not None
        assert store.get(KEY) == created.current
        assert store.list("") == [(KEY, b"1", created.current[1])]
        assert store.delete(KEY, created.current[1])


def test_every_call_raises_unavailable_naming_the_endpoint_when_etcd_is_down(
    etcd: EtcdCluster,
) -> None:
    with EtcdMetastore(etcd.endpoints, timeout_s=0.5) as store:
        revision = contract.create(store, KEY, b"1")
        etcd.stop(0)
        calls: list[Callable[[], object]] = [
            lambda: store.get(KEY),
            lambda: store.list(""),
            lambda: store.compare_and_swap(KEY, revision, b"2"),
            lambda: store.delete(KEY, revision),
        ]
        for call in calls:
            with pytest.raises(Unavailable, match=etcd.endpoints[0]) as raised:
                call()
            assert not isinstance(raised.value, OutcomeUnknown)  # connection refused: not sent


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A port that accepts connections (kernel backlog) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_silent_endpoint_fails_reads_over_but_reports_a_mutation_as_outcome_unknown(
    shared_etcd: EtcdCluster, silent_endpoint: str
) -> None:
    endpoints = [silent_endpoint, *shared_etcd.endpoints]
    with EtcdMetastore(endpoints, prefix="/loom-test/silent/", timeout_s=0.3) as store:
        assert store.get(KEY) is None  # the read moved on to the live member
    with (
        EtcdMetastore(endpoints, prefix="/loom-test/silent/", timeout_s=0.3) as store,
        pytest.raises(EtcdOutcomeUnknown),
    ):
        store.compare_and_swap(KEY, None, b"1")  # not replayed on the live member
    with EtcdMetastore(shared_etcd.endpoints, prefix="/loom-test/silent/") as store:
        assert store.get(KEY) is None


@pytest.mark.timeout(30)
def test_a_store_keeps_allocating_when_one_of_three_members_stops(
    etcd_cluster_factory: Callable[[int], EtcdCluster],
) -> None:
    cluster = etcd_cluster_factory(3)
    with EtcdMetastore(cluster.endpoints, timeout_s=1.0) as store:
        revision = contract.create(store, KEY, b"1")
        cluster.stop(0)
        cluster.wait_healthy([1, 2])  # a quorum with a leader, whoever led before
        result = store.compare_and_swap(KEY, revision, b"2")
        assert result.ok and result.current is not None
        assert store.get(KEY) == result.current


@pytest.mark.parametrize(
    ("code", "message", "mutation", "verdict"),
    [
        (14, "etcdserver: no leader", True, Verdict.TRY_NEXT),  # refused before proposing
        (14, "etcdserver: request timed out", True, Verdict.UNKNOWN),  # may have applied
        (14, "etcdserver: request timed out", False, Verdict.TRY_NEXT),  # a read: ask another
        (3, "etcdserver: request is too large", True, Verdict.REFUSED),
        (11, "etcdserver: mvcc: required revision has been compacted", False, Verdict.COMPACTED),
    ],
)
def test_an_error_answer_allows_failover_only_when_nothing_can_have_been_applied(
    code: int, message: str, mutation: bool, verdict: Verdict
) -> None:
    raw = json.dumps({"error": message, "message": message, "code": code}).encode()
    assert judge_error_answer(503, raw, mutation=mutation).verdict is verdict


@pytest.mark.parametrize(
    ("prefix", "end"),
    [(b"/loom/", b"/loom0"), (b"a\xff", b"b"), (b"\xff\xff", b"\x00")],
)
def test_a_prefix_range_ends_just_past_the_last_key_with_the_prefix(
    prefix: bytes, end: bytes
) -> None:
    assert prefix_range_end(prefix) == end


# --- leadership ----------------------------------------------------------------


async def first_to_lead(
    contenders: dict[str, EtcdLeadership],
) -> tuple[str, asyncio.Task[None]]:
    """Campaign with all; return the winner's name and the still-waiting loser's task."""
    tasks = {asyncio.create_task(c.campaign(name)): name for name, c in contenders.items()}
    async with asyncio.timeout(5):
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1 and len(pending) == 1, "exactly one contender wins at first"
    (winner,) = done
    winner.result()
    (loser,) = pending
    return tasks[winner], loser


@pytest.mark.timeout(20)
def test_of_two_contenders_exactly_one_leads_and_the_other_takes_over_on_close(
    shared_etcd: EtcdCluster, request: pytest.FixtureRequest
) -> None:
    key = f"/loom-test/{unique(request)}/leader"

    async def scenario() -> None:
        a = EtcdLeadership(shared_etcd.endpoints, key=key, params=FAST)
        b = EtcdLeadership(shared_etcd.endpoints, key=key, params=FAST)
        contenders = {"a": a, "b": b}
        try:
            name, loser = await first_to_lead(contenders)
            winner, other = contenders[name], contenders["b" if name == "a" else "a"]
            assert winner.is_leader and not other.is_leader
            assert await other.leader() == name
            # The loser keeps waiting through several lease renewals.
            done, _ = await asyncio.wait({loser}, timeout=2 * FAST.renew_interval_s)
            assert not done and not other.is_leader
            await winner.close()  # revokes the lease: no need to wait out the TTL
            assert winner.lost.is_set() and winner.lost_reason == "resigned"
            async with asyncio.timeout(FAST.ttl_s + SLACK_S):
                await loser
            assert other.is_leader and not winner.is_leader
            assert await other.leader() != name
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def grant_abandoned_leadership(endpoint: str, key: str, ttl_s: int) -> None:
    """What a crashed leader leaves behind: the key on a lease nobody renews."""

    def encode(data: bytes) -> str:
        return base64.b64encode(data).decode()

    with httpx.Client(timeout=2.0, trust_env=False) as client:
        grant = client.post(f"{endpoint}/v3/lease/grant", json={"TTL": ttl_s}).json()
        put = {"key": encode(key.encode()), "value": encode(b"crashed"), "lease": grant["ID"]}
        client.post(f"{endpoint}/v3/kv/put", json=put).raise_for_status()


@pytest.mark.timeout(20)
def test_a_contender_takes_over_once_a_crashed_leaders_lease_expires(
    shared_etcd: EtcdCluster, request: pytest.FixtureRequest
) -> None:
    key = f"/loom-test/{unique(request)}/leader"
    grant_abandoned_leadership(shared_etcd.endpoints[0], key, FAST.ttl_s)

    async def scenario() -> None:
        async with EtcdLeadership(shared_etcd.endpoints, key=key, params=FAST) as contender:
            assert await contender.leader() == "crashed"
            async with asyncio.timeout(FAST.ttl_s + SLACK_S):
                await contender.campaign("heir")
            assert contender.is_leader
            assert await contender.leader() == "heir"
            await contender.resign()
            assert not contender.is_leader
            assert await contender.leader() is None

    asyncio.run(scenario())


@pytest.mark.timeout(20)
def test_a_leader_whose_etcd_freezes_steps_down_before_its_lease_could_expire(
    etcd: EtcdCluster,
) -> None:
    process = etcd.members[0].process
    assert process is not None

    async def scenario() -> None:
        async with EtcdLeadership(etcd.endpoints, params=FAST) as leadership:
            await leadership.campaign("sm-1")
            frozen_at = time.monotonic()
            process.send_signal(signal.SIGSTOP)  # requests now hang instead of failing
            try:
                async with asyncio.timeout(FAST.ttl_s + SLACK_S):
                    await leadership.lost.wait()
            finally:
                process.send_signal(signal.SIGCONT)
            assert not leadership.is_leader
            assert leadership.lost_reason is not None and "TTL" in leadership.lost_reason
            # Every renewal counted from a send before the freeze, so the term ended
            # before etcd could have expired the lease.
            deadline = leadership.term_deadline
            assert deadline is not None
            assert deadline <= frozen_at + FAST.ttl_s * (1 - FAST.clock_drift)

    asyncio.run(scenario())


@pytest.mark.timeout(20)
def test_a_leader_whose_etcd_stops_reports_lost_leadership(etcd: EtcdCluster) -> None:
    async def scenario() -> None:
        async with EtcdLeadership(etcd.endpoints, params=FAST) as leadership:
            await leadership.campaign("sm-1")
            etcd.stop(0)
            async with asyncio.timeout(FAST.ttl_s + SLACK_S):
                await leadership.lost.wait()
            assert not leadership.is_leader
            with pytest.raises(Unavailable):
                await leadership.leader()

    asyncio.run(scenario())
