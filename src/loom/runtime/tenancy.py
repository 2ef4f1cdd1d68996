"""The shard manager's tenants and tokens (ADR 0008): kept in its metastore, handed to
nodes with the routing table, and checked on every operator call.

Keys:
- `tenants/{name}`   → `Tenant` (msgpack)
- `tokens/{digest}`  → `TokenGrant` (msgpack): the SHA-256 of the secret, never the secret

Rules of this module:
- synchronous metastore calls, made off the event loop by the manager; each write is
  one compare-and-swap on absence, so a retried create answers what exists;
- a cluster started with auth makes one admin token the first time it leads, when
  no admin token exists yet, and hands its secret back exactly once (to be printed);
- without auth every call is allowed and `authorize` answers None (the manager logs
  a loud warning at start);
- with auth: a call without a valid token, or a tenant's token asking for another
  tenant's keyspace or for a cluster operation, is `PermissionDenied`.
"""

from __future__ import annotations

import secrets

import msgspec

from loom.core.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable
from loom.shardmgr.metastore import Metastore
from loom.shardmgr.tenancy import (
    ADMIN_TENANT,
    TENANTS_MAX,
    TOKEN_ID_CHARS,
    TOKENS_MAX,
    Tenant,
    TokenGrant,
    Verifier,
    digest,
    may_reach,
    tenant_problem,
)

TENANTS = "tenants/"
TOKENS = "tokens/"
# Secrets are "loom_" + 43 url-safe characters: 256 random bits.
SECRET_PREFIX = "loom_"  # noqa: S105 - a prefix, not a password
SECRET_BYTES = 32

_ENCODER = msgspec.msgpack.Encoder()
_TENANT = msgspec.msgpack.Decoder(Tenant)
_GRANT = msgspec.msgpack.Decoder(TokenGrant)


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


class Tenancy:
    def __init__(self, metastore: Metastore, *, auth: bool) -> None:
        self.metastore = metastore
        self.auth = auth
        self.tenants: dict[str, Tenant] = {}
        self.grants: dict[str, TokenGrant] = {}
        self.verifier = Verifier()

    # ---------------------------------------------------------------- storage (sync)

    def load(self) -> None:
        self.tenants = {
            t.name: t for t in (_TENANT.decode(v) for _, v, _ in self.metastore.list(TENANTS))
        }
        self.grants = {
            g.digest: g for g in (_GRANT.decode(v) for _, v, _ in self.metastore.list(TOKENS))
        }
        self.verifier = Verifier(self.grants.values())

    def bootstrap(self) -> str | None:
        """With auth and no admin token yet: makes one; its secret (shown once), else None."""
        if not self.auth or any(g.admin for g in self.grants.values()):
            return None
        self.create_tenant(Tenant(name=ADMIN_TENANT))
        secret, _ = self.create_token(ADMIN_TENANT, admin=True)
        return secret

    def create_tenant(self, tenant: Tenant) -> Tenant:
        problem = tenant_problem(tenant.name, tenant.weight)
        if problem is not None:
            raise InvalidArgument(problem)
        existing = self.tenants.get(tenant.name)
        if existing is not None:
            if existing != tenant:
                raise InvalidArgument(
                    f"tenant {tenant.name!r} exists with weight {existing.weight}"
                )
            return existing
        if len(self.tenants) >= TENANTS_MAX:
            raise InvalidArgument(f"a cluster holds at most {TENANTS_MAX} tenants")
        key = TENANTS + tenant.name
        result = self.metastore.compare_and_swap(key, None, _ENCODER.encode(tenant))
        if not result.ok:  # another manager (or an earlier try) stored it: take that one
            assert result.current is not None
            tenant = _TENANT.decode(result.current[0])
        self.tenants[tenant.name] = tenant
        return tenant

    def create_token(self, tenant: str, *, admin: bool) -> tuple[str, TokenGrant]:
        """A new secret for `tenant` and what is stored of it."""
        if tenant not in self.tenants:
            raise NotFound(f"no tenant {tenant!r}")
        if len(self.grants) >= TOKENS_MAX:
            raise InvalidArgument(f"a cluster holds at most {TOKENS_MAX} tokens")
        secret = new_secret()
        grant = TokenGrant(digest=digest(secret), tenant=tenant, admin=admin)
        key = TOKENS + grant.digest
        result = self.metastore.compare_and_swap(key, None, _ENCODER.encode(grant))
        assert result.ok, "a fresh 256-bit secret collided"
        self.grants[grant.digest] = grant
        self.verifier = Verifier(self.grants.values())
        return secret, grant

    def revoke_token(self, token_id: str) -> TokenGrant:
        """Deletes the token whose id is `token_id`; never the last admin token (the
        cluster would have no way left to manage it)."""
        if len(token_id) != TOKEN_ID_CHARS:
            raise InvalidArgument(f"a token id is {TOKEN_ID_CHARS} hex characters")
        grant = next((g for g in self.grants.values() if g.token_id == token_id), None)
        if grant is None:
            raise NotFound(f"no token {token_id!r}")
        admins = sum(1 for g in self.grants.values() if g.admin)
        if grant.admin and admins == 1:
            raise InvalidArgument("that is the last admin token; make another one first")
        key = TOKENS + grant.digest
        current = self.metastore.get(key)
        if current is not None and not self.metastore.delete(key, current[1]):
            raise Unavailable("the token record changed meanwhile; retry")
        del self.grants[grant.digest]
        self.verifier = Verifier(self.grants.values())
        return grant

    # ---------------------------------------------------------------- checks

    def authorize(self, secret: str, *, admin: bool = False) -> TokenGrant | None:
        """The caller's grant (None when auth is off); `PermissionDenied` if the token is
        missing or unknown, or `admin` is needed and it is a tenant's token."""
        if not self.auth:
            return None
        grant = self.verifier.grant(secret)
        if grant is None:
            raise PermissionDenied("a valid token is needed (kv.connect(..., token=...))")
        if admin and not grant.admin:
            raise PermissionDenied(f"only an admin token may do this (token of {grant.tenant!r})")
        return grant

    def owner_for(self, grant: TokenGrant | None, named: str) -> str:
        """The tenant a new keyspace belongs to: the caller's own, or one an admin (or
        anyone, without auth) names."""
        if grant is not None and not grant.admin:
            if named and named != grant.tenant:
                raise PermissionDenied(
                    f"a token of tenant {grant.tenant!r} cannot create keyspaces for {named!r}"
                )
            return grant.tenant
        owner = named or (grant.tenant if grant is not None else "")
        if owner and owner not in self.tenants:
            raise NotFound(f"no tenant {owner!r}")
        return owner

    def check_reach(self, grant: TokenGrant | None, keyspace: str, owner: str) -> None:
        if grant is not None and not may_reach(grant, owner):
            raise PermissionDenied(
                f"keyspace {keyspace!r} does not belong to tenant {grant.tenant!r}"
            )

    def sorted_tenants(self) -> tuple[Tenant, ...]:
        return tuple(self.tenants[name] for name in sorted(self.tenants))

    def sorted_grants(self) -> tuple[TokenGrant, ...]:
        return tuple(self.grants[d] for d in sorted(self.grants))
