"""migrate: core then modules, idempotent, reversible, isolated failures, safe when run twice at once."""

import asyncio
import os
import secrets
import subprocess
import sys

from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from appliance import devstack
from scaigrid.db import migrations
from scaigrid.modules import load_modules
from tests.support.database import Template
from tests.support.processes import REPO, command_env, scaigrid
from tests.support.waiting import eventually

CORE_HEAD = migrations.CORE.heads()[0]


async def _tables(url: str) -> set[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def _scalar(url: str, sql: str) -> object:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.scalar(text(sql))
    finally:
        await engine.dispose()


async def _contents(url: str) -> dict[str, object]:
    """Each table's (and view's) SHOW CREATE TABLE and rows, without the ids and times a migrate run picks itself."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            tables = sorted((await conn.execute(text("SHOW FULL TABLES"))).tuples())
            contents: dict[str, object] = {"tables": tables}
            for table, _ in tables:
                ddl = (await conn.execute(text(f"SHOW CREATE TABLE `{table}`"))).one()[1]
                # The order of secondary indexes is the order migrate happened to create them in (SQLAlchemy keeps a
                # table's indexes in a set), so it differs from one run to the next: compare the set.
                lines = ddl.splitlines()
                contents[f"ddl {table}"] = [line for line in lines if not line.lstrip().startswith("KEY ")]
                contents[f"indexes {table}"] = sorted(line.strip().rstrip(",") for line in lines
                                                      if line.lstrip().startswith("KEY "))
                rows = (await conn.execute(text(f"SELECT * FROM `{table}`"))).mappings()
                contents[f"rows {table}"] = sorted(repr(sorted(
                    (column, value) for column, value in row.items()
                    if column != "id" and not column.endswith(("_id", "_at")))) for row in rows)
            contents["triggers"] = (await conn.execute(text(
                "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE()"))).all()
            contents["routines"] = (await conn.execute(text(
                "SELECT ROUTINE_NAME FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = DATABASE()"))).all()
            return contents
    finally:
        await engine.dispose()


CORE_TABLES = {"partners", "tenants", "users", "api_keys", "alembic_version"}
BUNKER_TABLES = {"mod_scaibunker_storage_audit", "mod_scaibunker_capabilities", "alembic_version_mod_scaibunker"}


def test_migrate_on_empty_database_creates_core_module_and_default_tenant(env):
    result = scaigrid("migrate", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert asyncio.run(_tables(env["DATABASE_URL"])) >= CORE_TABLES | BUNKER_TABLES
    assert asyncio.run(_scalar(env["DATABASE_URL"], "SELECT version_num FROM alembic_version")) == CORE_HEAD
    assert asyncio.run(_scalar(env["DATABASE_URL"],
                               "SELECT version_num FROM alembic_version_mod_scaibunker")) == "scaibunker_0002"
    assert asyncio.run(_scalar(env["DATABASE_URL"],
                               "SELECT COUNT(*) FROM tenants t JOIN partners p ON p.id = t.partner_id "
                               "WHERE t.slug = 'default' AND p.slug = 'default'")) == 1


def test_a_copy_of_the_session_template_is_what_migrate_makes(env, mariadb: devstack.MariaDB,
                                                              database_template: Template):
    """migrated_env copies the template instead of migrating: the copy must hold exactly what migrate makes."""
    assert scaigrid("migrate", env=env).returncode == 0
    name = "c_" + secrets.token_hex(6)
    copy_url = mariadb.create_database(name, name, secrets.token_hex(12))
    try:
        database_template.copy_into(copy_url)
        copied, migrated = asyncio.run(_contents(copy_url)), asyncio.run(_contents(env["DATABASE_URL"]))
    finally:
        mariadb.drop_database(name)
    assert copied == migrated
    assert len(copied["tables"]) > 10 and "FOREIGN KEY" in str(copied["ddl tenants"])
    assert copied["rows tenants"] and copied["rows alembic_version"]


def test_rerun_is_a_no_op(env):
    assert scaigrid("migrate", env=env).returncode == 0
    again = scaigrid("migrate", env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{CORE_HEAD} -> {CORE_HEAD}" in again.stdout
    assert asyncio.run(_scalar(env["DATABASE_URL"], "SELECT COUNT(*) FROM partners")) == 1
    assert asyncio.run(_scalar(env["DATABASE_URL"], "SELECT COUNT(*) FROM tenants")) == 1


async def test_downgrade_to_base_and_up_again(settings):
    modules = load_modules(settings.modules)
    engine = create_async_engine(settings.database.url.reveal())
    try:
        up = await migrations.upgrade(engine, modules, lock_timeout_s=10)
        assert [r.error for r in up] == [None, None]
        down = await migrations.downgrade(engine, modules, lock_timeout_s=10)
        assert [(r.stream, r.after, r.error) for r in down] == [("scaibunker", None, None), ("core", None, None)]
        async with engine.connect() as conn:
            left = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        # Only the (empty) version tables and migrate's lock table remain.
        assert left <= {"alembic_version", "alembic_version_mod_scaibunker", "scaigrid_migrate_lock"}
        again = await migrations.upgrade(engine, modules, lock_timeout_s=10)
        assert [(r.stream, r.after, r.error) for r in again] == [
            ("core", CORE_HEAD, None), ("scaibunker", "scaibunker_0002", None)]
    finally:
        await engine.dispose()


def test_a_failing_module_is_named_and_does_not_block_the_others(env):
    env = {**env, "SCAIGRID_MODULES": "tests.modules.broken:MODULE,scaibunker"}
    result = scaigrid("migrate", env=env)
    assert result.returncode == 1
    assert "broken" in result.stdout and "migrate failed" in result.stdout
    tables = asyncio.run(_tables(env["DATABASE_URL"]))
    assert tables >= CORE_TABLES | BUNKER_TABLES  # the module after the broken one was migrated


class LockHolder:
    """A mariadb client session holding the migrate lock of one database, as another migrate run would."""

    def __init__(self, mariadb, database_url: str) -> None:
        self.lock = "scaigrid_migrate." + database_url.rsplit("/", 1)[1]
        self.client = subprocess.Popen(
            ["mariadb", "--protocol=TCP", "-h127.0.0.1", f"-P{mariadb.port}", "-uroot", "--batch",
             "--skip-column-names", "--unbuffered"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "MYSQL_PWD": mariadb.root_password})

    def __enter__(self) -> "LockHolder":
        self.client.stdin.write(f"SELECT GET_LOCK('{self.lock}', 10);\n")
        self.client.stdin.flush()
        assert self.client.stdout.readline().strip() == "1"
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.stdin.close()  # ends the session, which releases the lock
        self.client.wait(10)
        self.client.stdout.close()


# The sessions (of this test's user: the migrate runs) waiting in migrate's GET_LOCK; not this query's own.
LOCK_WAITERS = ("SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                "WHERE ID <> CONNECTION_ID() AND INFO LIKE 'SELECT GET\\_LOCK(%'")


def test_two_concurrent_migrate_runs_are_serialised(env, mariadb):
    with LockHolder(mariadb, env["DATABASE_URL"]):
        runs = [subprocess.Popen([sys.executable, "-m", "scaigrid", "migrate"], env=command_env(env), cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        eventually(lambda: asyncio.run(_scalar(env["DATABASE_URL"], LOCK_WAITERS)) == 2,
                   "both runs waiting for the migrate lock", interval_s=0.1)
        assert [run.poll() for run in runs] == [None, None]
        assert "partners" not in asyncio.run(_tables(env["DATABASE_URL"]))  # nobody got past the lock
    outputs = [run.communicate(timeout=60)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    # Exactly one run applied the revisions; the other found them applied.
    assert sum(f"base -> {CORE_HEAD}" in out for out in outputs) == 1, outputs
    assert asyncio.run(_scalar(env["DATABASE_URL"], "SELECT COUNT(*) FROM tenants")) == 1


def test_lock_wait_is_bounded(env, mariadb):
    with LockHolder(mariadb, env["DATABASE_URL"]):
        result = scaigrid("migrate", env={**env, "MIGRATE_LOCK_TIMEOUT_S": "1"})
    assert result.returncode == 1
    assert "another migrate run held the lock for more than 1 s" in result.stdout


async def test_core_tables_in_code_match_the_migrated_schema(settings):
    """scaigrid/db/tables.py (what queries use) and the revisions (what exists) must not drift apart."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from scaigrid.db.tables import metadata

    engine = create_async_engine(settings.database.url.reveal())
    try:
        await migrations.upgrade(engine, (), lock_timeout_s=10)
        async with engine.connect() as conn:
            diff = await conn.run_sync(lambda c: compare_metadata(MigrationContext.configure(c), metadata))
    finally:
        await engine.dispose()
    # Only the version table is in the database and not in the metadata.
    assert [d for d in diff if not (d[0] == "remove_table" and d[1].name == "alembic_version")] == []


async def test_names_per_owner_rekey_tenant_backends_and_go_back_unless_names_clash(settings):
    """core_0008 qualifies a tenant backend's key by its tenant everywhere it is referenced, and its downgrade undoes
    that, refusing (and changing nothing) while one name exists for two owners."""
    engine = create_async_engine(settings.database.url.reveal())

    async def rows(sql: str) -> list[tuple[object, ...]]:
        async with engine.connect() as conn:
            return [tuple(row) for row in await conn.execute(text(sql))]

    async def run(*statements: str) -> None:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))

    try:
        await migrations.upgrade(engine, (), lock_timeout_s=10)
        assert [r.error for r in await migrations.downgrade(engine, (), target="core_0006", lock_timeout_s=10)] == [
            None]
        tenant_id = (await rows("SELECT id FROM tenants WHERE slug = 'default'"))[0][0]
        await run(
            "INSERT INTO backends (id, tenant_id, provider, base_url, model) VALUES "
            "('shared', NULL, 'custom', 'http://127.0.0.1:9/v1', 'm'), "
            f"('own-gpu', '{tenant_id}', 'custom', 'http://127.0.0.1:9/v1', 'm')",
            f"INSERT INTO models (id, slug, tenant_id, modality) VALUES ('mdl_1', 'a/chat', '{tenant_id}', 'chat')",
            "INSERT INTO model_routes (model_id, backend_id) VALUES ('mdl_1', 'own-gpu'), ('mdl_1', 'shared')",
            "INSERT INTO hybrid_mirrored (kind, row_id) VALUES ('backend', 'own-gpu')")
        assert [r.error for r in await migrations.upgrade(engine, (), lock_timeout_s=10)] == [None]
        own_key = f"own-gpu@{tenant_id}"
        assert await rows("SELECT id FROM backends ORDER BY id") == [(own_key,), ("shared",)]
        assert await rows("SELECT backend_id FROM model_routes ORDER BY backend_id") == [(own_key,), ("shared",)]
        assert await rows("SELECT row_id FROM hybrid_mirrored") == [(own_key,)]

        # The platform may now have a model of a tenant's slug: until it is gone, there is no way back.
        await run("INSERT INTO models (id, slug, modality) VALUES ('mdl_2', 'a/chat', 'chat')")
        down = await migrations.downgrade(engine, (), target="core_0006", lock_timeout_s=10)
        assert "model slug 'a/chat' exists for more than one owner" in str(down[0].error)
        assert await rows("SELECT id FROM backends ORDER BY id") == [(own_key,), ("shared",)]
        await run("DELETE FROM models WHERE id = 'mdl_2'")
        assert [r.error for r in await migrations.downgrade(engine, (), target="core_0006", lock_timeout_s=10)] == [
            None]
        assert await rows("SELECT id FROM backends ORDER BY id") == [("own-gpu",), ("shared",)]
        assert await rows("SELECT backend_id FROM model_routes ORDER BY backend_id") == [("own-gpu",), ("shared",)]
        assert await rows("SELECT row_id FROM hybrid_mirrored") == [("own-gpu",)]
        assert [r.error for r in await migrations.upgrade(engine, (), lock_timeout_s=10)] == [None]
    finally:
        await engine.dispose()
