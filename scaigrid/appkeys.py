"""Every aiohttp key in one leaf module: what an app holds (settings, resources, services), what a request carries.

The HTTP layer (scaigrid.api) fills them; domain code reads them without importing it. The value types are imported
for the type checker only, so this module imports nothing of scaigrid at run time and anything may import it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from minio import Minio
    from sqlalchemy.ext.asyncio import AsyncEngine

    from scaigrid.accounting.records import RateState
    from scaigrid.accounting.service import Accounting
    from scaigrid.api.base import Drain
    from scaigrid.auth.authenticator import Authenticator
    from scaigrid.auth.principal import Principal
    from scaigrid.cache import InvalidationBus
    from scaigrid.dispatch.pipeline import Dispatcher
    from scaigrid.modules import Module
    from scaigrid.modules.gate import ModuleGate
    from scaigrid.modules.scaibunker.transfers import Transfers
    from scaigrid.settings import Settings

ReadyCheck = Callable[[web.Application], Awaitable[str]]

# --- what an app holds ---
SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
# Shared resources, opened by api.base.resource_ctx in whichever app needs them.
DB: web.AppKey[AsyncEngine] = web.AppKey("db")
REDIS: web.AppKey[aioredis.Redis] = web.AppKey("redis")
S3: web.AppKey[Minio] = web.AppKey("s3")
READY_CHECKS: web.AppKey[dict[str, ReadyCheck]] = web.AppKey("ready_checks")  # filled by the app composing checks
DRAIN: web.AppKey[Drain] = web.AppKey("drain")
BUS: web.AppKey[InvalidationBus] = web.AppKey("invalidation_bus")
MODULES: web.AppKey[tuple[Module, ...]] = web.AppKey("modules")
# Stream name -> head revisions, read once at start.
SCHEMA_HEADS: web.AppKey[dict[str, tuple[str, ...]]] = web.AppKey("schema_heads")
AUTHENTICATOR: web.AppKey[Authenticator] = web.AppKey("authenticator")
ACCOUNTING: web.AppKey[Accounting] = web.AppKey("accounting")
DISPATCHER: web.AppKey[Dispatcher] = web.AppKey("dispatcher")
TRANSFERS: web.AppKey[Transfers] = web.AppKey("storage_transfers")
MODULE_GATE: web.AppKey[ModuleGate] = web.AppKey("module_gate")  # which tenants switched which module off
# The route objects of each mounted module's routes -> the module's id: the gateway's MODULE_NOT_ENABLED check.
MODULE_ROUTES: web.AppKey[dict[web.AbstractRoute, str]] = web.AppKey("module_routes")

# --- what a request carries ---
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id")
TUNNELLED: web.RequestKey[bool] = web.RequestKey("tunnelled")  # the managed side sent it down the hybrid link
STARTED: web.RequestKey[float] = web.RequestKey("started")  # perf_counter() when the request reached the app
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal")
RATE_STATE: web.RequestKey[RateState] = web.RequestKey("rate_state")
# The changed object as it was, for the audit log, set by a route that has it at hand (the after is its answer).
AUDIT_BEFORE: web.RequestKey[dict[str, object]] = web.RequestKey("audit_before")
