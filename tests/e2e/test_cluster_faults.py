"""Real processes on 127.0.0.1 under real faults: SIGKILL of the primary and of a
follower, SIGSTOP of the primary (gray failure), restarts that catch up from the log
and from a snapshot, and the shard manager's death — with nothing acknowledged lost."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from pathlib import Path

import pytest

from e2e.harness import (
    KEYSPACE,
    ask_node,
    route,
    running_cluster,
    wait_until_caught_up,
    wait_until_healthy,
)
from loom import kv
from loom.core.errors import LoomError
from loom.core.hashing import ushard_of
from loom.core.ids import ClientId, NodeId, RequestId, RequestSeq
from loom.host.requests import WriteReply, WriteRequest
from loom.kvstate.commands import Put, encode_command

# The bar with default settings (lease 1 s, failure detection 0.6 s).
FAILOVER_S_MAX = 3.0


def _log(tmp: Path, name: str) -> str:
    return (tmp / "logs" / f"{name}.log").read_text()


async def put_many(ks: kv.Keyspace, prefix: bytes, count: int) -> list[bytes]:
    keys = [b"%s:%d" % (prefix, i) for i in range(count)]
    for key in keys:
        await ks.put(key, b"v-" + key)
    return keys


async def assert_all_there(ks: kv.Keyspace, keys: list[bytes]) -> None:
    items = await asyncio.gather(*(ks.get(k) for k in keys))
    missing = [k for k, item in zip(keys, items, strict=True) if item is None]
    assert not missing, f"acknowledged writes lost: {missing[:5]}"
    assert all(
        item is not None and item.value == b"v-" + k for k, item in zip(keys, items, strict=True)
    )


async def time_until_a_write_succeeds(ks: kv.Keyspace, key: bytes) -> float:
    started = time.monotonic()
    await ks.put(key, b"v-" + key)  # the client retries inside its deadline
    return time.monotonic() - started


@pytest.mark.timeout(120)
def test_quorum_writes_survive_the_kill_of_the_primary_and_of_a_follower(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_cluster(tmp_path) as (cluster, client):
            ks = client.keyspace(KEYSPACE)
            keys = await put_many(ks, b"before", 30)
            primary = (await route(client)).primary
            cluster.kill(primary)
            recovery_s = await time_until_a_write_succeeds(ks, b"after:0")
            keys.append(b"after:0")
            assert recovery_s < FAILOVER_S_MAX, f"writes came back after {recovery_s:.2f} s"
            new = await route(client)
            assert new.primary != primary
            await assert_all_there(ks, keys)

            cluster.restart(primary)
            healthy = await wait_until_healthy(client)
            follower = next(n for n in healthy.acceptors if n != healthy.primary)
            cluster.kill(follower)  # a minority: writes go on without a failover
            keys += await put_many(ks, b"minority", 20)
            assert (await route(client)).primary == healthy.primary
            await assert_all_there(ks, keys)

    asyncio.run(scenario())


@pytest.mark.timeout(120)
def test_a_paused_primary_is_replaced_and_cannot_commit_when_resumed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_cluster(tmp_path) as (cluster, client):
            ks = client.keyspace(KEYSPACE)
            keys = await put_many(ks, b"before", 10)
            old = await route(client)
            old_port = cluster.ports[old.primary]
            cluster.pause(old.primary)  # SIGSTOP: sockets open, nothing answers
            recovery_s = await time_until_a_write_succeeds(ks, b"during:0")
            keys.append(b"during:0")
            assert recovery_s < FAILOVER_S_MAX + 2.0, recovery_s
            assert (await route(client)).primary != old.primary

            cluster.resume(old.primary)
            # Straight to the resumed node, which may still believe it leads: it must
            # not acknowledge, because the others promised a higher ballot.
            key = b"stale-primary"
            put = Put(
                request=RequestId(ClientId("e2e-stale"), RequestSeq(1)),
                ushard=ushard_of(key, 4096),
                key=key,
                value=b"must-not-commit",
            )
            request = WriteRequest(token=1, command=encode_command(put))
            try:
                reply = await ask_node(old_port, old.shard, request)
            except LoomError:
                reply = None  # no answer at all is also "not committed"
            assert not isinstance(reply, WriteReply), reply
            assert await ks.get(key) is None
            keys += await put_many(ks, b"after", 10)
            await assert_all_there(ks, keys)

    asyncio.run(scenario())


@pytest.mark.timeout(180)
def test_a_restarted_node_catches_up_from_the_log_and_from_a_snapshot(tmp_path: Path) -> None:
    async def scenario() -> None:
        # A short log: a node that misses more than 64 entries needs a snapshot.
        node_args = ("--log-entries-max", "64")
        async with running_cluster(tmp_path, node_args=node_args) as (cluster, client):
            ks = client.keyspace(KEYSPACE)
            keys = await put_many(ks, b"first", 5)
            shard = await route(client)
            follower = NodeId(next(n for n in shard.acceptors if n != shard.primary))

            cluster.kill(follower)
            keys += await put_many(ks, b"log", 10)  # well within the retained log
            cluster.restart(follower)
            await wait_until_caught_up(client, follower, shard.shard)
            log = (tmp_path / "logs" / f"{follower}.log").read_text()
            assert "installed a snapshot" not in log

            cluster.kill(follower)
            keys += await put_many(ks, b"snap", 200)  # more than the log keeps
            cluster.restart(follower)
            await wait_until_caught_up(client, follower, shard.shard)
            log = (tmp_path / "logs" / f"{follower}.log").read_text()
            assert "installed a snapshot" in log

            # The caught-up follower and one other make a majority without the old primary.
            cluster.kill(shard.primary)
            keys += await put_many(ks, b"after", 5)
            await assert_all_there(ks, keys)

    asyncio.run(scenario())


@pytest.mark.timeout(120)
def test_the_data_path_goes_on_without_the_shard_manager(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_cluster(tmp_path) as (cluster, client):
            ks = client.keyspace(KEYSPACE)
            keys = await put_many(ks, b"before", 5)
            node_addresses = ",".join(f"127.0.0.1:{cluster.ports[n]}" for n in ("n1", "n2", "n3"))
            cluster.kill("sm")
            keys += await put_many(ks, b"without-sm", 20)
            await assert_all_there(ks, keys)
            # A new client finds its way through the nodes' copy of the routing table.
            async with kv.connect(node_addresses, timeout_s=10) as newcomer:
                fresh = newcomer.keyspace(KEYSPACE)
                await fresh.put(b"newcomer", b"v-newcomer")
                await assert_all_there(fresh, [*keys, b"newcomer"])

    asyncio.run(scenario())


@pytest.mark.timeout(180)
def test_a_node_restarted_on_a_wiped_disk_rejoins_as_a_new_member(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_cluster(tmp_path) as (cluster, client):
            ks = client.keyspace(KEYSPACE)
            keys = await put_many(ks, b"before", 30)
            shard = await route(client)
            victim = NodeId(next(n for n in shard.acceptors if n != shard.primary))
            old_incarnation = next(
                n.incarnation for n in (await client.status()).nodes if n.node == victim
            )
            cluster.kill(victim)
            shutil.rmtree(tmp_path / victim)  # the disk is replaced
            cluster.restart(victim)
            keys += await put_many(ks, b"while-rejoining", 10)
            # The manager removes the old member, adds the new one as a follower and,
            # once it has caught up, makes it an acceptor again.
            deadline = time.monotonic() + 60
            while True:
                status = await client.status()
                node = next(n for n in status.nodes if n.node == victim)
                (state,) = [s for s in status.shards if s.shard == shard.shard]
                if state.activated and victim in state.acceptors and state.epoch > shard.epoch + 2:
                    break
                assert time.monotonic() < deadline, f"{victim} did not rejoin: {state}"
                await asyncio.sleep(0.2)
            assert node.incarnation != old_incarnation
            await wait_until_caught_up(client, victim, shard.shard)
            # It came back through a config without it (never as the member it was).
            configs = re.findall(r"epoch (\d+) primary \S+ acceptors (\S+)", _log(tmp_path, victim))
            without = [int(e) for e, acceptors in configs if victim not in acceptors.split(",")]
            assert without, configs
            # Without the old primary, the new member and one other are the majority:
            # everything acknowledged must still be there.
            cluster.kill(shard.primary)
            keys += await put_many(ks, b"after", 10)
            await assert_all_there(ks, keys)

    asyncio.run(scenario())
