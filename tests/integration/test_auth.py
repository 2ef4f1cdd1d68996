"""Tenants and tokens with real processes (`loom sm --auth`, three `loom node --auth` on
127.0.0.1): the admin token is printed once; a request without a token, with a made-up
one, or with another tenant's token is refused with `PermissionDenied` — by the nodes
themselves, not only by the client or the manager; admin tokens reach everything; the
catalog holds token hashes, never the secrets; `loom tenant`/`loom token` work."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from loom import kv
from loom.core.errors import PermissionDenied
from loom.core.hashing import ushard_of
from loom.host.requests import ErrorCode, ErrorReply, ReadRequest
from loom.runtime.codec import ClientAnswer, ClientCall, Failure, RoutingRequest, decode, encode
from loom.runtime.localcluster import LocalCluster
from loom.runtime.rpc import RpcClient
from loom.shardmgr.tenancy import digest


def loom(*args: str, token: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LOOM_TOKEN"}
    if token is not None:
        env["LOOM_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "loom.cli.main", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
    )


async def raw_call(port: int, call: ClientCall | RoutingRequest) -> object:
    """One message straight to one process, bypassing the client library."""
    async with await RpcClient.connect("127.0.0.1", port) as rpc:
        return decode(await rpc.call(encode(call), timeout_s=5))


async def refused_within(attempt: Callable[[], Awaitable[object]], *, timeout_s: float) -> None:
    """Tries `attempt` again until it is refused with PermissionDenied."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await attempt()
        except PermissionDenied:
            return
        assert time.monotonic() < deadline, "a revoked token still works"
        await asyncio.sleep(0.05)


async def scenario(cluster: LocalCluster, admin_token: str) -> dict[str, str]:
    address = cluster.manager_address
    with pytest.raises(PermissionDenied):
        await kv.connect(address)  # no token: not even the routing table
    with pytest.raises(PermissionDenied):
        await kv.connect(address, token="loom_made-up")
    async with kv.connect(address, token=admin_token) as admin:
        await admin.create_tenant("acme")
        await admin.create_tenant("globex", weight=2)
        acme_token = (await admin.create_token("acme")).secret
        globex_token = (await admin.create_token("globex")).secret
        await admin.create_keyspace("theirs", replication=3, tenant="globex")
        async with (
            kv.connect(address, token=acme_token) as acme,
            kv.connect(address, token=globex_token) as globex,
        ):
            info = await acme.create_keyspace("ours", replication=3)
            assert info.tenant == "acme"
            ours = acme.keyspace("ours")
            await ours.put(b"k", b"acme's")
            item = await ours.get(b"k")
            assert item is not None and item.value == b"acme's"
            await globex.keyspace("theirs").put(b"k", b"globex's")

            # Cross-tenant data requests: refused by the nodes.
            with pytest.raises(PermissionDenied):
                await globex.keyspace("ours").get(b"k")
            with pytest.raises(PermissionDenied):
                await globex.keyspace("ours").put(b"k", b"stolen")
            with pytest.raises(PermissionDenied):
                await acme.keyspace("theirs").increment(b"n")
            # Cluster operations and other tenants' keyspaces: refused by the manager.
            for refused in (
                acme.set_quota("ours", writes_per_s=1e6),
                acme.create_tenant("mine"),
                acme.create_token("acme", admin=True),
                acme.tenants(),
                acme.status(),
                acme.drop_keyspace("theirs"),
                acme.create_keyspace("sneaky", replication=3, tenant="globex"),
                globex.create_keyspace("ours", replication=3),  # exists, acme's
            ):
                with pytest.raises(PermissionDenied):
                    await refused

            # Admin reaches every keyspace and the cluster operations.
            item = await admin.keyspace("ours").get(b"k")
            assert item is not None and item.value == b"acme's"
            await admin.set_quota("ours", writes_per_s=1000)
            assert (await admin.status()).nodes

            # A revoked token stops working once the push reaches the nodes.
            spare = await admin.create_token("acme")
            async with kv.connect(address, token=spare.secret) as spare_client:
                await spare_client.keyspace("ours").get(b"k")
                await admin.revoke_token(spare.token_id)
                assert spare.token_id not in {t.token_id for t in await admin.tokens()}
                spare_ks = spare_client.keyspace("ours")
                await refused_within(lambda: spare_ks.get(b"k"), timeout_s=5)

            # The nodes check by themselves: a request straight to the primary's node.
            table = await admin.routing()
            assert table.auth and table.tokens == ()  # clients never see token hashes
            keyspace = next(k for k in table.keyspaces if k.name == "ours")
            ushard = ushard_of(b"k", keyspace.spec.ushards)
            shard = keyspace.shard_of(ushard)
            route = next(s for s in table.shards if s.shard == shard)
            node = next(n for n in table.nodes if n.info.node == route.primary)
            read = ReadRequest(token=1, ushard=ushard, key=b"k")
            port = node.info.port
            for secret in ("", "loom_made-up", globex_token):
                answer = await raw_call(port, ClientCall(shard=shard, request=read, auth=secret))
                assert isinstance(answer, ClientAnswer), answer
                assert isinstance(answer.reply, ErrorReply)
                assert answer.reply.code is ErrorCode.PERMISSION_DENIED
            answer = await raw_call(port, ClientCall(shard=shard, request=read, auth=acme_token))
            assert isinstance(answer, ClientAnswer) and not isinstance(answer.reply, ErrorReply)
            no_token = await raw_call(port, RoutingRequest())
            assert isinstance(no_token, Failure) and no_token.kind == "permission"
    return {"acme": acme_token, "globex": globex_token}


@pytest.mark.timeout(240)
def test_tokens_reach_only_their_tenants_keyspaces_and_admin_reaches_all(tmp_path: Path) -> None:
    cluster = LocalCluster(data_dir=tmp_path, auth=True)
    try:
        cluster.start_manager()
        admin_token = cluster.admin_token
        assert admin_token is not None, "loom sm --auth printed no admin token"
        for name in ("n1", "n2", "n3"):
            cluster.start_node(name)
        tokens = asyncio.run(scenario(cluster, admin_token))

        # Only hashes in the catalog.
        metastore = (tmp_path / "sm" / "metastore.json").read_text()
        for secret in (admin_token, *tokens.values()):
            assert secret not in metastore
            assert digest(secret) in metastore

        # The CLI, with $LOOM_TOKEN.
        at = ("-c", cluster.manager_address)
        made = loom("tenant", "create", "initech", "--weight", "3", *at, token=admin_token)
        assert made.returncode == 0, made.stderr
        new = loom("token", "create", "--tenant", "initech", "-q", *at, token=admin_token)
        assert new.returncode == 0 and new.stdout.startswith("loom_"), new.stderr
        ids = json.loads(loom("token", "list", "--json", *at, token=admin_token).stdout)
        assert {t["tenant"] for t in ids} >= {"admin", "acme", "globex", "initech"}
        assert all(len(t["id"]) == 12 and set(t) == {"id", "tenant", "admin"} for t in ids)
        listed = loom("tenant", "list", "--json", *at, token=admin_token)
        rows = {r["name"]: r for r in json.loads(listed.stdout)}
        assert rows["initech"]["weight"] == 3 and rows["acme"]["keyspaces"] == 1
        denied = loom("tenant", "list", *at, token=tokens["acme"])
        assert denied.returncode != 0 and "PermissionDenied" in denied.stderr
        anonymous = loom("keyspace", "list", *at, token=None)
        assert anonymous.returncode != 0 and "PermissionDenied" in anonymous.stderr

        # A restarted manager does not print the admin token again; the old one works.
        cluster.stop(["sm"])
        cluster.restart("sm")
        assert cluster.admin_token == admin_token
        log = (tmp_path / "logs" / "sm.log").read_text()
        assert "AUTH IS OFF" not in log
        again = loom("tenant", "list", "--json", *at, token=admin_token)
        assert again.returncode == 0, again.stderr
        assert cluster.exited() == []
    finally:
        cluster.stop()
