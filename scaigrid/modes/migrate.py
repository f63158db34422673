"""migrate mode: core, then each enabled module, each its own Alembic stream; exits non-zero naming failures."""

import asyncio
import logging

from scaigrid.db import migrations
from scaigrid.modules import load_modules
from scaigrid.resources import database_ctx
from scaigrid.settings import Requirement, Settings

logger = logging.getLogger(__name__)

REQUIRES: tuple[Requirement, ...] = ("database",)


async def migrate(settings: Settings) -> int:
    modules = load_modules(settings.modules)
    async with database_ctx(settings) as engine:
        try:
            results = await migrations.upgrade(
                engine, modules, lock_timeout_s=settings.database.migrate_lock_timeout_s)
        except migrations.MigrateLockTimeout as exc:
            logger.error("%s", exc, extra={"event": "migrate_lock_timeout"})
            return 1
    failed = [r for r in results if r.error]
    skipped = [s.name for s in migrations.streams(modules)[len(results):]]
    if failed or skipped:
        logger.error("migrate failed: %s%s", ", ".join(f"{r.stream} ({r.error})" for r in failed),
                     f"; not attempted: {', '.join(skipped)}" if skipped else "",
                     extra={"event": "migrate_done", "failed": [r.stream for r in failed], "skipped": skipped})
        return 1
    logger.info("migrate done: %s", ", ".join(f"{r.stream} at {r.after}" for r in results),
                extra={"event": "migrate_done", "failed": []})
    return 0


def run(settings: Settings) -> int:
    return asyncio.run(migrate(settings))
