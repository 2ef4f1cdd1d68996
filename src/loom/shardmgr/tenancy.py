"""Tenants, tokens and who may reach what (DESIGN §7, ADR 0008). Pure: no IO; the
secrets themselves are drawn by the runtime.

Rules of this module:
- a token is a random secret shown once, when it is made; only its SHA-256 is stored
  (in the shard manager's catalog) and sent to nodes (in the routing table). The
  secret cannot be recovered from either;
- a token belongs to a tenant; a tenant's token reaches that tenant's keyspaces only;
  an admin token reaches every keyspace and the cluster operations (quotas, tenants,
  tokens, status, other tenants' keyspaces);
- verifying a token costs one SHA-256 the first time a node sees it, then a dict
  lookup: `Verifier` caches by the secret, bounded, and is rebuilt when the set of
  grants changes (a revoked token stops working with the next routing push).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from msgspec import Struct

TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
TENANTS_MAX = 10_000
TOKENS_MAX = 100_000
TOKEN_CHARS_MAX = 256
# A token's public id is this many hex characters of its digest.
TOKEN_ID_CHARS = 12
TENANT_WEIGHT_MAX = 1000
# The tenant of the token a cluster started with `--auth` prints once.
ADMIN_TENANT = "admin"
# Secrets verified per node before the cache starts over (a client sends one secret on
# every request; this bounds memory against a client sending many bad ones).
VERIFIED_CACHE_MAX = 4096


class Tenant(Struct, frozen=True, kw_only=True):
    name: str
    # Share of a node's service under contention, relative to other tenants' weights.
    weight: int = 1


class TokenGrant(Struct, frozen=True, kw_only=True):
    """What the catalog keeps about a token: never the secret, its SHA-256."""

    digest: str  # hex SHA-256 of the secret
    tenant: str
    admin: bool = False

    @property
    def token_id(self) -> str:
        """A short public name for the token (listing, logs)."""
        return self.digest[:TOKEN_ID_CHARS]


def tenant_problem(name: str, weight: int) -> str | None:
    if not isinstance(name, str) or not TENANT_NAME.fullmatch(name):
        return (
            f"tenant name {name!r} must be 1-64 characters of lowercase letters, digits, "
            "'_', '.', '-', starting with a letter or digit"
        )
    if isinstance(weight, bool) or not isinstance(weight, int):
        return "weight must be an int"
    if not 1 <= weight <= TENANT_WEIGHT_MAX:
        return f"weight must be 1..{TENANT_WEIGHT_MAX}, not {weight}"
    return None


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", errors="surrogatepass")).hexdigest()


def may_reach(grant: TokenGrant, keyspace_tenant: str) -> bool:
    """May `grant` read and write a keyspace owned by `keyspace_tenant`?"""
    return grant.admin or grant.tenant == keyspace_tenant


class Verifier:
    """Token secret → its grant, or None. Cached by secret."""

    def __init__(self, grants: Iterable[TokenGrant] = ()) -> None:
        self._by_digest = {g.digest: g for g in grants}
        self._verified: dict[str, TokenGrant | None] = {}

    def grant(self, secret: str) -> TokenGrant | None:
        if secret in self._verified:
            return self._verified[secret]
        if not secret or len(secret) > TOKEN_CHARS_MAX:
            return None
        found = self._by_digest.get(digest(secret))
        if len(self._verified) >= VERIFIED_CACHE_MAX:
            self._verified.clear()
        self._verified[secret] = found
        return found
