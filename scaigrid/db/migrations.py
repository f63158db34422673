"""Runs the Alembic streams (core, then one per module) under a migrate lock that holds on one server and on Galera.

The lock has two parts, taken in this order and released in reverse:
1. GET_LOCK, a named lock of the server session: two runs against the same server queue up on it, and a run that
   dies releases it with its connection.
2. A row in `scaigrid_migrate_lock` (fixed primary key, committed): GET_LOCK is local to one node under Galera, so
   two runs against two nodes would both get it; the row's INSERT is certified by the whole cluster, and only one
   run's commit wins (the other sees the key, or a certification failure: both mean "held"). The row names the
   server of its holder and expires LOCK_TTL_S after its last renewal (every LOCK_RENEW_S while the run lives).
   A run that died leaves its row behind: a run on the same server takes it over at once (it holds that server's
   GET_LOCK, so the row's holder cannot be alive), a run on another node once it has expired.
The table is created (IF NOT EXISTS) before the lock is taken, outside Alembic, since it must exist before the
first revision runs. See docs/operations.md, "Galera".
"""

import asyncio
import contextlib
import importlib.resources
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, delete, insert, inspect, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.schema import CreateTable

import migrations
from scaigrid.db import conflicted
from scaigrid.db.defaults import ensure_default_tenant
from scaigrid.db.tables import migrate_lock
from scaigrid.modules import Module

logger = logging.getLogger(__name__)

LOCK_NAME = "migrate"
LOCK_TTL_S = 60  # a dead run on another node holds up the next one this long at most
LOCK_RENEW_S = 15  # well within the TTL: a renewal waiting behind a replicated DDL statement still lands in time
LOCK_POLL_S = 0.5


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


async def _get_lock(conn: AsyncConnection, lock_timeout_s: float) -> None:
    # Lock name carries the schema, so migrate runs of different databases on one server do not wait on each other.
    got = await conn.scalar(
        text("SELECT GET_LOCK(CONCAT('scaigrid_migrate.', DATABASE()), :timeout)"), {"timeout": lock_timeout_s})
    if got != 1:
        raise MigrateLockTimeout(f"another migrate run held the lock for more than {lock_timeout_s:g} s")


async def _release_lock(conn: AsyncConnection) -> None:
    await conn.scalar(text("SELECT RELEASE_LOCK(CONCAT('scaigrid_migrate.', DATABASE()))"))


async def _claim_row(conn: AsyncConnection, holder: str, server: str) -> bool:
    """One try at the cluster-wide row; True when this run holds it (committed)."""
    expires = text(f"UTC_TIMESTAMP() + INTERVAL {LOCK_TTL_S} SECOND")
    try:
        # Expired, or left by a dead run on this server (we hold its GET_LOCK): take it over.
        await conn.execute(delete(migrate_lock).where(
            migrate_lock.c.name == LOCK_NAME,
            (migrate_lock.c.expires_at < text("UTC_TIMESTAMP()")) | (migrate_lock.c.server == server)))
        await conn.execute(insert(migrate_lock).values(name=LOCK_NAME, holder=holder, server=server,
                                                       expires_at=expires))
        await conn.commit()
        return True
    except DBAPIError as exc:
        await conn.rollback()
        # The key is there (committed by another run), or our commit lost to another node's in certification.
        if isinstance(exc, IntegrityError) or conflicted(exc):
            return False
        raise


async def _renew(engine: AsyncEngine, holder: str) -> None:
    """Keeps the row from expiring while the run lives; on its own connection (the run's is busy migrating)."""
    while True:
        await asyncio.sleep(LOCK_RENEW_S)
        try:
            async with engine.begin() as conn:
                renewed = (await conn.execute(update(migrate_lock).where(
                    migrate_lock.c.name == LOCK_NAME, migrate_lock.c.holder == holder).values(
                    expires_at=text(f"UTC_TIMESTAMP() + INTERVAL {LOCK_TTL_S} SECOND")))).rowcount
        except DBAPIError as exc:  # the next renewal may get through; the TTL leaves room for three misses
            logger.warning("could not renew the migrate lock: %s", exc, extra={"event": "migrate_lock_renew_failed"})
            continue
        if not renewed:
            logger.error("the migrate lock was taken over by another run while this one still ran",
                         extra={"event": "migrate_lock_lost"})


@contextlib.asynccontextmanager
async def _locked(engine: AsyncEngine, conn: AsyncConnection, lock_timeout_s: float) -> AsyncIterator[None]:
    """Holds the migrate lock (this server's GET_LOCK, then the cluster's row) for the body; lock_timeout_s in all."""
    deadline_s = time.monotonic() + lock_timeout_s
    # IF NOT EXISTS, for two first runs at once; checked before, since the server warns of a table that exists.
    if not await conn.run_sync(lambda sync_conn: inspect(sync_conn).has_table(migrate_lock.name)):
        await conn.execute(CreateTable(migrate_lock, if_not_exists=True))
    await _get_lock(conn, lock_timeout_s)
    try:
        server = await conn.scalar(text("SELECT CONCAT(@@hostname, ':', @@port)"))
        holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        while not await _claim_row(conn, holder, server):
            if time.monotonic() >= deadline_s:
                held_by = (await conn.execute(select(migrate_lock.c.holder, migrate_lock.c.server).where(
                    migrate_lock.c.name == LOCK_NAME))).first()
                await conn.rollback()
                raise MigrateLockTimeout(f"another migrate run held the lock for more than {lock_timeout_s:g} s"
                                         + (f" ({held_by.holder} on {held_by.server})" if held_by else ""))
            await asyncio.sleep(LOCK_POLL_S)
        renewal = asyncio.create_task(_renew(engine, holder))
        try:
            yield
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
            try:
                await conn.rollback()  # whatever a failed stream left open
                await conn.execute(delete(migrate_lock).where(migrate_lock.c.name == LOCK_NAME,
                                                              migrate_lock.c.holder == holder))
                await conn.commit()
            except DBAPIError as exc:  # the server went away: its GET_LOCK went with it, and the row expires
                logger.warning("could not release the migrate lock (it expires within %d s): %s", LOCK_TTL_S, exc,
                               extra={"event": "migrate_lock_release_failed"})
    finally:
        with contextlib.suppress(DBAPIError):  # as above
            await _release_lock(conn)


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
    async with engine.connect() as conn, _locked(engine, conn, lock_timeout_s):
        for stream in streams(modules):
            result = await _run(conn, stream, "upgrade", "head")
            results.append(result)
            if stream is CORE:
                if result.error:
                    break
                if await ensure_default_tenant(conn):
                    logger.info("created the default partner and tenant", extra={"event": "default_tenant"})
                await conn.commit()
    return results


async def downgrade(engine: AsyncEngine, modules: Sequence[Module], *, target: str = "base",
                    lock_timeout_s: float) -> list[StreamResult]:
    """Modules first (they depend on the core), then the core, each down to `target` (base by default)."""
    results = []
    async with engine.connect() as conn, _locked(engine, conn, lock_timeout_s):
        for stream in reversed(streams(modules)):
            results.append(await _run(conn, stream, "downgrade", target))
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
