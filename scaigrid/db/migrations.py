"""Runs the Alembic streams (core, then one per module) under a MariaDB named lock.

The lock is GET_LOCK, which lives in the server session that took it: two `migrate` runs against the
same server queue up, and a run that dies releases the lock with its connection. On Galera the lock is
local to one node, so every migrate run must target the same node (see docs/operations.md).
"""

import importlib.resources
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

import migrations
from scaigrid.db.defaults import ensure_default_tenant
from scaigrid.modules import Module

logger = logging.getLogger(__name__)


class MigrateLockTimeout(Exception):
    """Another migrate run held the lock for longer than we were willing to wait."""


@dataclass(frozen=True)
class Stream:
    name: str  # "core" or the module id
    versions_package: str  # the package holding its revisions
    version_table: str

    @property
    def versions(self) -> Path:
        """The folder of its revisions, wherever the package is installed."""
        folder = importlib.resources.files(self.versions_package)
        # Alembic reads revisions from a folder: a regular package (with __init__.py), installed unzipped.
        if not isinstance(folder, Path):
            raise TypeError(f"{self.versions_package} is not a package folder on disk ({folder!r})")
        return folder

    def config(self, connection: Connection | None = None) -> Config:
        cfg = Config()
        cfg.set_main_option("script_location", str(migrations.ROOT))
        cfg.set_main_option("version_locations", str(self.versions))
        cfg.set_main_option("path_separator", "os")
        cfg.attributes["connection"] = connection
        cfg.attributes["version_table"] = self.version_table
        return cfg

    def heads(self) -> tuple[str, ...]:
        return tuple(ScriptDirectory.from_config(self.config()).get_heads())


CORE = Stream("core", "migrations.core.versions", "alembic_version")


def streams(modules: Sequence[Module]) -> list[Stream]:
    """Core first, then each module that has migrations, in the order they are enabled."""
    return [CORE] + [Stream(m.id, m.migrations, m.version_table) for m in modules if m.migrations is not None]


@dataclass(frozen=True)
class StreamResult:
    stream: str
    before: str | None
    after: str | None
    error: str | None = None


async def current_revision(conn: AsyncConnection, stream: Stream) -> str | None:
    """The revision the database is at for this stream, or None when it was never migrated."""
    try:
        # The table name comes from the module registry, never from input.
        query = text(f"SELECT version_num FROM `{stream.version_table}` LIMIT 1")  # noqa: S608
        revision: str | None = await conn.scalar(query)
        return revision
    except DBAPIError:
        await conn.rollback()
        return None


async def _locked(conn: AsyncConnection, lock_timeout_s: float) -> None:
    # Lock name carries the schema, so migrate runs of different databases on one server do not wait on each other.
    got = await conn.scalar(
        text("SELECT GET_LOCK(CONCAT('scaigrid_migrate.', DATABASE()), :timeout)"), {"timeout": lock_timeout_s})
    if got != 1:
        raise MigrateLockTimeout(f"another migrate run held the lock for more than {lock_timeout_s:g} s")


async def _unlock(conn: AsyncConnection) -> None:
    await conn.scalar(text("SELECT RELEASE_LOCK(CONCAT('scaigrid_migrate.', DATABASE()))"))


async def _run(conn: AsyncConnection, stream: Stream, direction: str, target: str) -> StreamResult:
    before = await current_revision(conn, stream)
    # Out of any transaction, so that Alembic commits each revision with its version stamp (env.py): MariaDB commits
    # DDL at once, and a stamp rolled back after a later revision failed would leave the schema ahead of its version.
    await conn.commit()
    try:
        step = command.upgrade if direction == "upgrade" else command.downgrade
        await conn.run_sync(lambda sync_conn: step(stream.config(sync_conn), target))
        await conn.commit()
    except Exception as exc:  # one stream's failure is reported and must not stop the others
        await conn.rollback()
        logger.error("stream %s failed: %s", stream.name, exc, extra={"event": "migrate_failed", "stream": stream.name})
        return StreamResult(stream.name, before, await current_revision(conn, stream), f"{type(exc).__name__}: {exc}")
    after = await current_revision(conn, stream)
    logger.info("stream %s: %s -> %s", stream.name, before or "base", after or "base",
                extra={"event": "migrated", "stream": stream.name})
    return StreamResult(stream.name, before, after)


async def upgrade(engine: AsyncEngine, modules: Sequence[Module], *, lock_timeout_s: float) -> list[StreamResult]:
    """Core, then each module to its head; a failed module is reported, the others still run.

    Modules build on the core tables, so a failed core stops the run before any module.
    """
    results = []
    async with engine.connect() as conn:
        await _locked(conn, lock_timeout_s)
        try:
            for stream in streams(modules):
                result = await _run(conn, stream, "upgrade", "head")
                results.append(result)
                if stream is CORE:
                    if result.error:
                        break
                    if await ensure_default_tenant(conn):
                        logger.info("created the default partner and tenant", extra={"event": "default_tenant"})
                    await conn.commit()
        finally:
            await _unlock(conn)
    return results


async def downgrade(engine: AsyncEngine, modules: Sequence[Module], *, target: str = "base",
                    lock_timeout_s: float) -> list[StreamResult]:
    """Modules first (they depend on the core), then the core, each down to `target` (base by default)."""
    results = []
    async with engine.connect() as conn:
        await _locked(conn, lock_timeout_s)
        try:
            for stream in reversed(streams(modules)):
                results.append(await _run(conn, stream, "downgrade", target))
        finally:
            await _unlock(conn)
    return results


async def stream_revisions(engine: AsyncEngine, modules: Sequence[Module]) -> dict[str, str | None]:
    """The revision the database is at for each stream (core first; None = never migrated)."""
    async with engine.connect() as conn:
        return {stream.name: await current_revision(conn, stream) for stream in streams(modules)}


async def schema_status(engine: AsyncEngine, modules: Sequence[Module], heads: dict[str, tuple[str, ...]]) -> str:
    """"ok" when every stream is at its head, else which streams are behind (for readiness)."""
    behind = [f"{name} at {revision or 'base'}, head {','.join(heads[name])}"
              for name, revision in (await stream_revisions(engine, modules)).items() if (revision,) != heads[name]]
    return "ok" if not behind else "error: not migrated: " + "; ".join(behind)
