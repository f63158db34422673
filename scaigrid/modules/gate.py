"""Which tenants may use which module: the switches of module_switches, held in process and reloaded when announced.

A module SCAIGRID_MODULES enables is on for every tenant until its tenant's admins or its partner switch it off;
a partner's switch wins over the tenant's. The request path asks `require` on every call of a module's route, so the
switches live in process (a few rows: only what was switched) and are reloaded after an announcement on the
invalidation bus (topic "modules"), which every change makes once committed.
"""

import asyncio
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from scaigrid import errors
from scaigrid.cache import InvalidationBus
from scaigrid.db.tables import module_switches

TOPIC_MODULES = "modules"
SCOPES = ("tenant", "partner")


@dataclass(frozen=True)
class Switches:
    """The (module id, scope id) pairs switched off, per scope."""

    off: dict[str, frozenset[tuple[str, str]]]

    def disabled_by(self, module_id: str, tenant_id: str | None, partner_id: str | None) -> str | None:
        """"partner" or "tenant" when that one switched the module off for this tenant (the partner first), else
        None."""
        if partner_id and (module_id, partner_id) in self.off["partner"]:
            return "partner"
        if tenant_id and (module_id, tenant_id) in self.off["tenant"]:
            return "tenant"
        return None


class ModuleGate:
    def __init__(self, engine: AsyncEngine, bus: InvalidationBus) -> None:
        self._engine = engine
        self._switches: Switches | None = None
        self._loading: asyncio.Future[Switches] | None = None
        self._generation = 0  # bumped by every announcement: a load that began before one is not kept
        bus.on(TOPIC_MODULES, self._forget)

    def _forget(self, _key: str | None) -> None:
        self._generation += 1
        self._switches = None

    async def switches(self) -> Switches:
        if self._switches is not None:
            return self._switches
        if self._loading is None:
            # Single flight: after an announcement, one query answers every request waiting for the switches.
            loading = self._loading = asyncio.ensure_future(self._load())
            loading.add_done_callback(lambda _done: setattr(self, "_loading", None))
        return await asyncio.shield(self._loading)

    async def _load(self) -> Switches:
        generation = self._generation
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(module_switches.c.module_id, module_switches.c.scope,
                                              module_switches.c.scope_id).where(module_switches.c.enabled.is_(False))
                                       )).all()
        switches = Switches({scope: frozenset((r.module_id, r.scope_id) for r in rows if r.scope == scope)
                             for scope in SCOPES})
        if generation == self._generation:  # else a change was announced meanwhile: this read may predate it
            self._switches = switches
        return switches

    async def require(self, module_id: str, tenant_id: str, partner_id: str) -> None:
        """MODULE_NOT_ENABLED (403) when the tenant or its partner switched the module off."""
        by = (await self.switches()).disabled_by(module_id, tenant_id, partner_id)
        if by is not None:
            raise errors.module_not_enabled(module_id, by)
