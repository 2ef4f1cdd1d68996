"""The shard manager's answers to tenant and token management calls (ADR 0008).

Rules of this module:
- admin only (anyone when the cluster runs without auth);
- serialized with the manager's other operator calls by its admin lock; the metastore
  is called off the event loop;
- a secret appears in exactly one answer, the `TokenReply` of the call that made it,
  and in no log line (logs name tokens by their id).
"""

from __future__ import annotations

import asyncio
import functools
import logging

from loom.runtime.codec import (
    CreateTenant,
    CreateToken,
    Done,
    ListTenants,
    ListTokens,
    RevokeToken,
    TenantsReply,
    TokenInfo,
    TokenReply,
    TokensReply,
)
from loom.runtime.tenancy import Tenancy

TenancyCall = CreateTenant | ListTenants | CreateToken | ListTokens | RevokeToken
log = logging.getLogger("loom.sm")


async def answer(
    tenancy: Tenancy, lock: asyncio.Lock, message: TenancyCall
) -> TenantsReply | TokenReply | TokensReply | Done:
    tenancy.authorize(message.auth, admin=True)
    async with lock:
        match message:
            case CreateTenant():
                await asyncio.to_thread(tenancy.create_tenant, message.tenant)
            case CreateToken():
                make = functools.partial(tenancy.create_token, message.tenant, admin=message.admin)
                secret, grant = await asyncio.to_thread(make)
                log.info(
                    "token %s made for tenant %s%s",
                    grant.token_id, grant.tenant, " (admin)" if grant.admin else "",
                )  # fmt: skip
                return TokenReply(
                    secret=secret, token_id=grant.token_id, tenant=grant.tenant, admin=grant.admin
                )
            case RevokeToken():
                revoked = await asyncio.to_thread(tenancy.revoke_token, message.token_id)
                log.info("token %s of tenant %s revoked", revoked.token_id, revoked.tenant)
                return Done()
            case ListTokens():
                return TokensReply(
                    tokens=tuple(
                        TokenInfo(token_id=g.token_id, tenant=g.tenant, admin=g.admin)
                        for g in tenancy.sorted_grants()
                    )
                )
            case ListTenants():
                pass
    return TenantsReply(tenants=tenancy.sorted_tenants())
