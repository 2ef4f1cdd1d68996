"""Tenants and tokens: hashing and verifying tokens, the manager's catalog of them and
its rules for operator calls, and the node's check of a client request."""

from __future__ import annotations

import msgspec
import pytest

from loom.core.errors import InvalidArgument, NotFound, PermissionDenied
from loom.core.ids import NodeId, ShardId, UShard
from loom.host.requests import ErrorCode, ReadRequest
from loom.runtime.auth_gate import AuthGate
from loom.runtime.tenancy import SECRET_PREFIX, Tenancy
from loom.shardmgr.metastore import MemoryMetastore
from loom.shardmgr.routing import (
    Keyspace,
    KeyspaceSpec,
    RoutingTable,
    ShardPlacement,
    compact_ranges,
)
from loom.shardmgr.tenancy import (
    TENANT_WEIGHT_MAX,
    TOKEN_CHARS_MAX,
    VERIFIED_CACHE_MAX,
    Tenant,
    TokenGrant,
    Verifier,
    digest,
    may_reach,
    tenant_problem,
)

# ------------------------------------------------------------------ tokens


def test_verifier_finds_a_grant_by_the_secret_it_never_stores() -> None:
    grant = TokenGrant(digest=digest("s3cret"), tenant="acme")
    verifier = Verifier([grant])
    assert verifier.grant("s3cret") == grant
    assert verifier.grant("s3cret") == grant  # cached
    assert verifier.grant("other") is None
    assert verifier.grant("") is None
    assert verifier.grant("x" * (TOKEN_CHARS_MAX + 1)) is None
    assert "s3cret" not in repr(grant)


def test_verifier_cache_stays_bounded_against_many_bad_secrets() -> None:
    verifier = Verifier([TokenGrant(digest=digest("good"), tenant="acme")])
    for i in range(VERIFIED_CACHE_MAX * 2 + 5):
        assert verifier.grant(f"bad{i}") is None
    assert len(verifier._verified) <= VERIFIED_CACHE_MAX
    assert verifier.grant("good") is not None


def test_a_tenant_token_reaches_its_own_keyspaces_an_admin_token_every_one() -> None:
    tenant = TokenGrant(digest="d1", tenant="acme")
    admin = TokenGrant(digest="d2", tenant="ops", admin=True)
    assert may_reach(tenant, "acme") and not may_reach(tenant, "globex")
    assert not may_reach(tenant, "")  # a keyspace made before auth belongs to nobody
    assert may_reach(admin, "globex") and may_reach(admin, "")


@pytest.mark.parametrize(
    ("name", "weight"),
    [
        ("", 1),
        ("Acme", 1),
        ("-a", 1),
        ("a" * 65, 1),
        ("a b", 1),
        ("a", 0),
        ("a", TENANT_WEIGHT_MAX + 1),
        ("a", True),
    ],
)
def test_bad_tenant_names_and_weights_are_refused(name: str, weight: int) -> None:
    assert tenant_problem(name, weight) is not None


def test_good_tenant_names_pass() -> None:
    assert tenant_problem("acme", 1) is None
    assert tenant_problem("a.b-c_9", TENANT_WEIGHT_MAX) is None


# ------------------------------------------------------------------ the manager's catalog


def test_bootstrap_makes_one_admin_token_once_and_stores_only_its_hash() -> None:
    store = MemoryMetastore()
    tenancy = Tenancy(store, auth=True)
    tenancy.load()
    secret = tenancy.bootstrap()
    assert secret is not None and secret.startswith(SECRET_PREFIX)
    stored = b"".join(value for _, value, _ in store.list(""))
    assert secret.encode() not in stored
    assert digest(secret).encode() in stored
    again = Tenancy(store, auth=True)
    again.load()
    assert again.bootstrap() is None  # a restart shows nothing new
    grant = again.authorize(secret, admin=True)
    assert grant is not None and grant.admin


def test_without_auth_nothing_is_bootstrapped_and_everything_is_allowed() -> None:
    tenancy = Tenancy(MemoryMetastore(), auth=False)
    tenancy.load()
    assert tenancy.bootstrap() is None
    assert tenancy.authorize("", admin=True) is None
    assert tenancy.owner_for(None, "") == ""


def test_operator_calls_need_a_valid_token_and_admin_ones_an_admin_token() -> None:
    tenancy = Tenancy(MemoryMetastore(), auth=True)
    tenancy.load()
    admin_secret = tenancy.bootstrap()
    assert admin_secret is not None
    tenancy.create_tenant(Tenant(name="acme"))
    secret, grant = tenancy.create_token("acme", admin=False)
    with pytest.raises(PermissionDenied):
        tenancy.authorize("")
    with pytest.raises(PermissionDenied):
        tenancy.authorize(secret + "x")
    assert tenancy.authorize(secret) == grant
    with pytest.raises(PermissionDenied):
        tenancy.authorize(secret, admin=True)
    assert tenancy.owner_for(grant, "") == "acme"
    with pytest.raises(PermissionDenied):
        tenancy.owner_for(grant, "globex")
    admin = tenancy.authorize(admin_secret, admin=True)
    assert tenancy.owner_for(admin, "acme") == "acme"
    with pytest.raises(NotFound):
        tenancy.owner_for(admin, "nobody")
    with pytest.raises(PermissionDenied):
        tenancy.check_reach(grant, "theirs", "globex")
    tenancy.check_reach(grant, "ours", "acme")
    tenancy.check_reach(admin, "theirs", "globex")


def test_tenants_are_created_once_and_tokens_need_an_existing_tenant() -> None:
    tenancy = Tenancy(MemoryMetastore(), auth=True)
    tenancy.load()
    assert tenancy.create_tenant(Tenant(name="acme", weight=2)).weight == 2
    assert tenancy.create_tenant(Tenant(name="acme", weight=2)).weight == 2
    with pytest.raises(InvalidArgument):
        tenancy.create_tenant(Tenant(name="acme", weight=3))
    with pytest.raises(InvalidArgument):
        tenancy.create_tenant(Tenant(name="Bad Name"))
    with pytest.raises(NotFound):
        tenancy.create_token("globex", admin=False)


def test_a_revoked_token_is_refused_and_the_last_admin_token_cannot_be_revoked() -> None:
    store = MemoryMetastore()
    tenancy = Tenancy(store, auth=True)
    tenancy.load()
    admin_secret = tenancy.bootstrap()
    assert admin_secret is not None
    tenancy.create_tenant(Tenant(name="acme"))
    secret, grant = tenancy.create_token("acme", admin=False)
    admin_grant = tenancy.authorize(admin_secret)
    assert admin_grant is not None
    with pytest.raises(InvalidArgument):
        tenancy.revoke_token(admin_grant.token_id)  # the last admin token
    with pytest.raises(NotFound):
        tenancy.revoke_token("0" * 12)
    with pytest.raises(InvalidArgument):
        tenancy.revoke_token("abc")
    tenancy.revoke_token(grant.token_id)
    with pytest.raises(PermissionDenied):
        tenancy.authorize(secret)
    reloaded = Tenancy(store, auth=True)
    reloaded.load()
    with pytest.raises(PermissionDenied):
        reloaded.authorize(secret)


# ------------------------------------------------------------------ the node's check

ACME_SECRET, GLOBEX_SECRET, ADMIN_SECRET = "loom_acme", "loom_globex", "loom_admin"


def table(*, auth: bool) -> RoutingTable:
    ids = [ShardId(1)]
    keyspace = Keyspace(
        spec=KeyspaceSpec(name="acme-ks"),
        placements=(ShardPlacement(ShardId(1), (NodeId("a"),)),),
        ranges=compact_ranges(4096, ids),
        tenant="acme",
    )
    grants = (
        TokenGrant(digest=digest(ACME_SECRET), tenant="acme"),
        TokenGrant(digest=digest(GLOBEX_SECRET), tenant="globex"),
        TokenGrant(digest=digest(ADMIN_SECRET), tenant="admin", admin=True),
    )
    return RoutingTable(
        version=(1, 1), keyspaces=(keyspace,), shards=(), nodes=(), auth=auth, tokens=grants
    )


READ = ReadRequest(token=7, ushard=UShard(0), key=b"k")


def code(gate: AuthGate, secret: str, shard: int = 1) -> ErrorCode | None:
    refusal = gate.check(ShardId(shard), READ, secret)
    return None if refusal is None else refusal.code


def test_node_refuses_missing_bad_and_cross_tenant_tokens() -> None:
    gate = AuthGate(required=False)
    gate.on_routing(table(auth=True))
    assert code(gate, "") is ErrorCode.PERMISSION_DENIED
    assert code(gate, "loom_forged") is ErrorCode.PERMISSION_DENIED
    assert code(gate, GLOBEX_SECRET) is ErrorCode.PERMISSION_DENIED
    assert code(gate, ACME_SECRET) is None
    assert code(gate, ADMIN_SECRET) is None
    assert code(gate, ACME_SECRET, shard=99) is ErrorCode.NOT_READY  # owner unknown yet
    assert gate.denied == 3
    assert gate.may_read_routing(GLOBEX_SECRET) and not gate.may_read_routing("nope")


def test_node_without_auth_lets_everything_through() -> None:
    gate = AuthGate(required=False)
    assert code(gate, "") is None
    gate.on_routing(table(auth=False))
    assert code(gate, "") is None and gate.may_read_routing("")


def test_node_started_with_auth_is_closed_until_a_table_with_auth_arrives() -> None:
    gate = AuthGate(required=True)
    assert code(gate, ACME_SECRET) is ErrorCode.NOT_READY
    assert not gate.may_read_routing(ACME_SECRET)
    assert not gate.accepts(table(auth=False))  # a table saying "auth off" is ignored
    assert gate.accepts(table(auth=True))
    gate.on_routing(table(auth=True))
    assert code(gate, ACME_SECRET) is None
    assert code(gate, "") is ErrorCode.PERMISSION_DENIED


def test_a_token_revoked_from_the_table_stops_working() -> None:
    gate = AuthGate(required=False)
    gate.on_routing(table(auth=True))
    assert code(gate, ACME_SECRET) is None
    revoked = table(auth=True)
    gate.on_routing(msgspec.structs.replace(revoked, version=(1, 2), tokens=revoked.tokens[1:]))
    assert code(gate, ACME_SECRET) is ErrorCode.PERMISSION_DENIED


def test_tables_served_to_clients_carry_no_token_hashes() -> None:
    served = table(auth=True).for_clients()
    assert served.tokens == () and served.auth
