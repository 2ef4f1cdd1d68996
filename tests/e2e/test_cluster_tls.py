"""A cluster with TLS on every connection (ADR 0015): real `loom sm`/`loom node`
processes started by `LocalCluster(tls=True)` with certificates it made, driven by the
client over TLS; clients with the wrong settings get a typed error at once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.harness import KEYSPACE, NODES, route
from loom import kv
from loom.core.ids import ShardId
from loom.runtime.codec import DropShard, encode
from loom.runtime.localcluster import LocalCluster
from loom.runtime.rpc import RemoteError, RpcClient, run
from loom.runtime.tls_certs import init_certificates

# A refused client must fail fast, well inside its own timeout (no hang, no retries).
REFUSAL_S_MAX = 5.0
CLIENT_TIMEOUT_S = 30.0


def _start(tmp: Path) -> LocalCluster:
    cluster = LocalCluster(data_dir=tmp, tls=True)
    cluster.start_manager()
    for name in NODES:
        cluster.start_node(name)
    return cluster


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = _start(tmp_path_factory.mktemp("tls-cluster"))
    try:

        async def create() -> None:
            async with kv.connect(
                cluster.manager_address, timeout_s=CLIENT_TIMEOUT_S, tls=cluster.client_tls()
            ) as client:
                await client.create_keyspace(KEYSPACE, shards=1, replication=3)

        run(create())
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.timeout(60)
def test_a_tls_cluster_serves_puts_and_gets_to_a_tls_client(tls_cluster: LocalCluster) -> None:
    async def scenario() -> None:
        for tls in (tls_cluster.client_tls(), tls_cluster.certificates.client()):
            async with kv.connect(tls_cluster.manager_address, tls=tls) as client:
                ks = client.keyspace(KEYSPACE)
                for i in range(20):
                    await ks.put(b"k%d" % i, b"v%d" % i)
                items = [await ks.get(b"k%d" % i) for i in range(20)]
                assert [item.value if item else None for item in items] == [
                    b"v%d" % i for i in range(20)
                ]
                eventual = await ks.get(b"k0", consistency=kv.EVENTUAL)
                assert eventual is not None and eventual.value == b"v0"

    run(scenario())


@pytest.mark.timeout(60)
def test_a_plaintext_client_of_a_tls_cluster_gets_tls_required_at_once(
    tls_cluster: LocalCluster,
) -> None:
    async def scenario() -> None:
        started = time.monotonic()
        with pytest.raises(kv.TlsRequired, match="expects TLS"):
            await kv.connect(tls_cluster.manager_address, timeout_s=CLIENT_TIMEOUT_S)
        assert time.monotonic() - started < REFUSAL_S_MAX
        node = f"127.0.0.1:{tls_cluster.ports['n1']}"
        with pytest.raises(kv.TlsRequired):
            await kv.connect(node, timeout_s=CLIENT_TIMEOUT_S)

    run(scenario())


@pytest.mark.timeout(60)
def test_certificates_from_another_ca_are_refused_with_a_typed_error(
    tls_cluster: LocalCluster, tmp_path: Path
) -> None:
    other = init_certificates(tmp_path / "other-ca")
    mine = tls_cluster.certificates

    async def scenario() -> None:
        # This client's certificate is signed by another CA: the cluster refuses it.
        foreign_cert = kv.TlsConfig(ca=mine.ca, cert=other.cert("client"), key=other.key("client"))
        started = time.monotonic()
        with pytest.raises(kv.CertificateRefused, match="refused this client's certificate"):
            await kv.connect(
                tls_cluster.manager_address, timeout_s=CLIENT_TIMEOUT_S, tls=foreign_cert
            )
        assert time.monotonic() - started < REFUSAL_S_MAX
        # This client trusts another CA: the cluster's certificate fails verification.
        with pytest.raises(kv.CertificateRefused, match="server's certificate failed"):
            await kv.connect(
                tls_cluster.manager_address, timeout_s=CLIENT_TIMEOUT_S, tls=other.client()
            )

    run(scenario())


@pytest.mark.timeout(60)
def test_cluster_messages_need_the_cluster_certificate(tls_cluster: LocalCluster) -> None:
    """Node↔node and ↔sm traffic is mutual TLS: a client (with the client certificate
    or none) cannot inject replication or control messages."""
    port = tls_cluster.ports["n1"]
    shard = run_route(tls_cluster)
    drop = encode(DropShard(shard=shard))

    async def scenario() -> None:
        for tls in (tls_cluster.client_tls(), tls_cluster.certificates.client()):
            async with await RpcClient.connect("127.0.0.1", port, tls=tls) as rpc:
                with pytest.raises(RemoteError, match="cluster-internal"):
                    await rpc.call(drop, timeout_s=5)

    run(scenario())

    async def still_served() -> None:
        async with kv.connect(tls_cluster.manager_address, tls=tls_cluster.client_tls()) as c:
            await c.keyspace(KEYSPACE).put(b"after-drop", b"v")
            assert await c.keyspace(KEYSPACE).get(b"after-drop") is not None

    run(still_served())  # the drop was refused: n1 still holds its replica


@pytest.mark.timeout(90)
def test_a_keyspace_reshards_over_tls(tls_cluster: LocalCluster) -> None:
    """The manager moves μshards with `MoverCall`s to the primaries: cluster messages,
    sent over mutual TLS with the cluster certificate."""

    async def scenario() -> None:
        async with kv.connect(
            tls_cluster.manager_address, timeout_s=CLIENT_TIMEOUT_S, tls=tls_cluster.client_tls()
        ) as client:
            await client.create_keyspace("moved", shards=1, replication=3, ushards=64)
            ks = client.keyspace("moved")
            keys = [b"m%d" % i for i in range(40)]
            for key in keys:
                await ks.put(key, b"v-" + key)
            resharded = await client.reshard_keyspace("moved", shards=2)
            assert len({shard for _, shard in resharded.ranges}) == 2
            for key in keys:
                item = await ks.get(key)
                assert item is not None and item.value == b"v-" + key, key

    run(scenario())


def run_route(cluster: LocalCluster) -> ShardId:
    async def shard() -> ShardId:
        async with kv.connect(cluster.manager_address, tls=cluster.client_tls()) as client:
            return (await route(client)).shard

    return run(shard())


@pytest.mark.timeout(90)
def test_replication_over_tls_survives_the_kill_of_the_primary(tmp_path: Path) -> None:
    """Writes are acknowledged by a quorum over node↔node TLS; after SIGKILL of the
    primary, a new primary (activated over TLS) serves every one of them."""
    cluster = _start(tmp_path)

    async def scenario() -> None:
        async with kv.connect(
            cluster.manager_address, timeout_s=CLIENT_TIMEOUT_S, tls=cluster.client_tls()
        ) as client:
            await client.create_keyspace(KEYSPACE, shards=1, replication=3)
            ks = client.keyspace(KEYSPACE)
            keys = [b"before:%d" % i for i in range(30)]
            for key in keys:
                await ks.put(key, b"v-" + key)
            primary = (await route(client)).primary
            cluster.kill(primary)
            await ks.put(b"after", b"v-after")  # the client retries through the failover
            keys.append(b"after")
            assert (await route(client)).primary != primary
            for key in keys:
                item = await ks.get(key)
                assert item is not None and item.value == b"v-" + key, key

    try:
        run(scenario())
    finally:
        cluster.stop()
