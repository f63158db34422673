"""Tests for appliance.devstack against real MariaDB, Redis, Sentinel and moto processes."""

import asyncio
import io
import os
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis
from minio import Minio
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from appliance import devstack
from appliance.database import ServiceError


def _assert_gone(process: subprocess.Popen[bytes]) -> None:
    assert process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(process.pid, 0)


async def _sql(url: str, *statements: str) -> list[tuple[Any, ...]]:
    """Run statements in one transaction and return the rows of the last one."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            rows: list[tuple[Any, ...]] = []
            for statement in statements:
                result = await conn.execute(text(statement))
                rows = [tuple(row) for row in result] if result.returns_rows else []
            return rows
    finally:
        await engine.dispose()


def test_free_port_can_be_bound() -> None:
    port = devstack.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_mariadb_database_user_connects_over_tcp(tmp_path: Path) -> None:
    mariadb = devstack.start_mariadb(tmp_path)
    try:
        url = mariadb.create_database("app_db", "app", "pa'ss word")
        assert url.startswith("mysql+asyncmy://app:")
        assert url.endswith(f"@127.0.0.1:{mariadb.port}/app_db")
        assert asyncio.run(_sql(url, "SELECT 1")) == [(1,)]
        assert asyncio.run(_sql(mariadb.admin_url(), "SELECT CURRENT_USER()")) == [("root@127.0.0.1",)]

        mariadb.drop_database("app_db")
        assert asyncio.run(_sql(mariadb.admin_url(), "SHOW DATABASES LIKE 'app_db'")) == []
    finally:
        mariadb.stop()
    _assert_gone(mariadb.process)
    mariadb.stop()


def test_mariadb_restart_reuses_datadir_and_root_password(tmp_path: Path) -> None:
    first = devstack.start_mariadb(tmp_path)
    try:
        url = first.create_database("app_db", "app", "secret")
        asyncio.run(_sql(url, "CREATE TABLE t (v INT)", "INSERT INTO t VALUES (42)"))
    finally:
        first.stop()
    password_file = tmp_path / "root-password"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600

    second = devstack.start_mariadb(tmp_path)
    try:
        assert second.root_password == first.root_password
        assert second.datadir == first.datadir
        url = second.create_database("app_db", "app", "secret")
        assert asyncio.run(_sql(url, "SELECT v FROM t")) == [(42,)]
    finally:
        second.stop()
    _assert_gone(second.process)


def test_mariadb_execute_raises_with_client_stderr(tmp_path: Path) -> None:
    mariadb = devstack.start_mariadb(tmp_path)
    try:
        with pytest.raises(ServiceError, match="SQL syntax"):
            mariadb.execute("SELEC 1")
    finally:
        mariadb.stop()


def test_mariadb_refuses_datadir_without_root_password_file(tmp_path: Path) -> None:
    devstack.start_mariadb(tmp_path).stop()
    (tmp_path / "root-password").unlink()
    with pytest.raises(ServiceError, match="root-password"):
        devstack.start_mariadb(tmp_path)


def test_mariadb_refuses_second_start_on_running_base_dir(tmp_path: Path) -> None:
    mariadb = devstack.start_mariadb(tmp_path)
    try:
        with pytest.raises(ServiceError, match="already running"):
            devstack.start_mariadb(tmp_path, timeout_s=10)
        mariadb.execute("SELECT 1")
    finally:
        mariadb.stop()


def test_redis_answers_ping_and_stops(tmp_path: Path) -> None:
    server = devstack.start_redis(tmp_path)
    try:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.close()
    finally:
        server.stop()
    _assert_gone(server.process)
    server.stop()


def test_start_on_busy_port_raises(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with pytest.raises(ServiceError, match="in use"):
            devstack.start_redis(tmp_path, listener.getsockname()[1])


def test_sentinel_discovers_master(tmp_path: Path) -> None:
    master = devstack.start_redis(tmp_path)
    try:
        sentinel = devstack.start_sentinel(tmp_path, master, master_name="grid")
        try:
            assert sentinel.url == f"redis+sentinel://127.0.0.1:{sentinel.port}/grid/0"

            async def roundtrip() -> tuple[tuple[str, int], bytes | None]:
                discovery = AsyncSentinel([("127.0.0.1", sentinel.port)])  # type: ignore[no-untyped-call]
                client = discovery.master_for("grid")
                try:
                    await client.set("key", "value")
                    value = await client.get("key")
                    address = await discovery.discover_master("grid")
                finally:
                    await client.aclose()
                    for sentinel_client in discovery.sentinels:
                        await sentinel_client.aclose()
                return address, value

            address, value = asyncio.run(roundtrip())
            assert address == ("127.0.0.1", master.port)
            assert value == b"value"
        finally:
            sentinel.stop()
        _assert_gone(sentinel.process)
    finally:
        master.stop()


def test_failed_start_raises_with_log_tail(tmp_path: Path) -> None:
    master = devstack.start_redis(tmp_path)
    try:
        # A space in the name breaks the generated sentinel.conf, so redis-sentinel exits at once.
        with pytest.raises(ServiceError, match="FATAL CONFIG FILE ERROR"):
            devstack.start_sentinel(tmp_path, master, master_name="bad name")
    finally:
        master.stop()


def test_s3_bucket_roundtrip(tmp_path: Path) -> None:
    server = devstack.start_s3(tmp_path)
    try:
        client = Minio(
            f"127.0.0.1:{server.port}",
            access_key=server.access_key_id,
            secret_key=server.secret_access_key,
            secure=False,
        )
        client.make_bucket("artifacts")
        client.put_object("artifacts", "hello.txt", io.BytesIO(b"hello"), length=5)
        response = client.get_object("artifacts", "hello.txt")
        try:
            assert response.read() == b"hello"
        finally:
            response.close()
            response.release_conn()
    finally:
        server.stop()
    _assert_gone(server.process)


def test_free_ports_are_distinct_and_outside_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = devstack.free_ports(50)
    assert len(set(ports)) == 50
    assert all(port < low for port in ports)
