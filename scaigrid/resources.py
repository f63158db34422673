"""Shared resources (database engine, Redis, S3): one set of factories that every mode opens and closes."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import hiredis
import redis.asyncio as aioredis
from minio import Minio
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.connection import HiredisRespSerializer
from redis.exceptions import RedisError
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from scaigrid.lifecycle import background
from scaigrid.settings import Settings, parse_redis_url

REDIS_SOCKET_TIMEOUT_S = 5.0
# Connections per process, at most. Every request of the http mode talks to Redis, so a burst of a few hundred
# concurrent requests holds that many connections for a moment; redis-py's default cap (100) would turn such a
# burst into errors that look like a Redis outage. A plain pool, not the blocking one: its cheaper checkout is
# measurable on the hot path (bench/RESULTS.md), and idle connections cost Redis little.
REDIS_MAX_CONNECTIONS = 2048
# How often a process asks the sentinels which server is the master. redis-py asks only when it opens a connection, and
# a busy process reuses the ones it has: after a switchover (SENTINEL FAILOVER; the old master stays up, a master, until
# the sentinels turn it into a replica some 10 s later) every process went on writing to the old master, and the
# demotion then threw those writes away (tests/scale/test_sentinel_failover.py).
SENTINEL_POLL_INTERVAL_S = 1.0


class _HiredisPacking:
    """Commands packed by hiredis, in C, as redis-py's synchronous connections already do when it is installed: the
    asyncio ones pack in Python, copying the buffer once per argument, and the request path's batched Lua call
    (accounting/scripts.py BATCH) carries a few dozen arguments per request."""

    _packer = HiredisRespSerializer()  # also converts memoryviews, and names a bad argument as redis-py does

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " not in args[0]:  # a command name that is one word: every hot one
            try:
                return [hiredis.pack_command(args)]
            except TypeError:
                pass
        packed: list[bytes] = self._packer.pack(*args)
        return packed


class HiredisConnection(_HiredisPacking, aioredis.Connection):
    pass


class HiredisSentinelConnection(_HiredisPacking, SentinelManagedConnection):
    pass


class _FollowingSentinelPool(SentinelConnectionPool):
    """Hands out only connections to the master the sentinels named last: one still connected to an older master is
    connected again (redis-py's own pool moves idle connections when it learns of a new master, but puts those in use
    at that moment back as they are)."""

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        if off_master(self, connection):
            await connection.disconnect()  # connect() asks the sentinels
        await super().ensure_connection(connection)


def off_master(pool: aioredis.ConnectionPool, connection: AbstractConnection | None) -> bool:
    """Whether a connection of the pool talks to a server the sentinels no longer name as the master (never, without
    Sentinel). A subscription holds its connection for good: its owner asks this to know when to subscribe again."""
    if not isinstance(pool, SentinelConnectionPool) or connection is None or pool.master_address is None:
        return False
    return bool(connection.is_connected) and (getattr(connection, "host", None),
                                              getattr(connection, "port", None)) != tuple(pool.master_address)


async def _follow_master(pool: SentinelConnectionPool) -> None:
    """Keeps the pool's idea of the master current, for _FollowingSentinelPool and off_master to act on."""
    while True:
        # No master known right now (a failover under way): commands fail meanwhile; ask again.
        with contextlib.suppress(RedisError, OSError):
            await pool.get_master_address()  # type: ignore[no-untyped-call]
        await asyncio.sleep(SENTINEL_POLL_INTERVAL_S)


def _connect_again_after_a_cut_handshake(dialect: Any, connection_record: Any, cargs: Any, cparams: Any) -> Any:
    try:
        return dialect.connect(*cargs, **cparams)
    except RuntimeError:
        # asyncmy raises this ("Transport does not expose socket instance"), not a DBAPI error, for a connection closed
        # during its handshake: what a proxy does when it fails a dead server over (Galera behind HAProxy,
        # docs/operations.md). One more try reaches the server the proxy chose next; a second failure is reported.
        return dialect.connect(*cargs, **cparams)


@asynccontextmanager
async def database_ctx(settings: Settings) -> AsyncIterator[AsyncEngine]:
    settings.require("database")
    assert settings.database.url is not None  # require() guarantees it; this narrows the type
    engine = create_async_engine(
        settings.database.url.reveal(),
        pool_size=settings.database.pool_size,
        pool_pre_ping=True,
        # MariaDB drops idle connections after wait_timeout (8 h by default); recycle well before.
        pool_recycle=3600,
        # Timestamps are UTC whatever the server's own time zone: NOW() and DEFAULT CURRENT_TIMESTAMP included.
        connect_args={"init_command": "SET time_zone = '+00:00'"},
    )
    event.listen(engine.sync_engine, "do_connect", _connect_again_after_a_cut_handshake)
    try:
        yield engine
    finally:
        await engine.dispose()


@asynccontextmanager
async def redis_ctx(settings: Settings) -> AsyncIterator["aioredis.Redis"]:
    """A client for either form of REDIS_URL; with Sentinel it follows the current master after a failover."""
    settings.require("redis")
    assert settings.redis.url is not None
    target = parse_redis_url(settings.redis.url.reveal())
    if not target.sentinels:
        client = aioredis.Redis.from_url(
            target.url, max_connections=REDIS_MAX_CONNECTIONS, socket_timeout=REDIS_SOCKET_TIMEOUT_S,
            socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S, connection_class=HiredisConnection)
        try:
            yield client
        finally:
            await client.aclose()
        return
    sentinel = Sentinel(list(target.sentinels), socket_timeout=REDIS_SOCKET_TIMEOUT_S)  # type: ignore[no-untyped-call]
    client = sentinel.master_for(target.master, db=target.db, password=target.password,
                                 socket_timeout=REDIS_SOCKET_TIMEOUT_S, max_connections=REDIS_MAX_CONNECTIONS,
                                 connection_class=HiredisSentinelConnection,
                                 connection_pool_class=_FollowingSentinelPool)
    try:
        async with background(_follow_master(client.connection_pool), "redis-master-follower"):
            yield client
    finally:
        await client.aclose()
        for connection in sentinel.sentinels:  # the master client does not own the sentinel connections
            await connection.aclose()


@asynccontextmanager
async def s3_ctx(settings: Settings) -> AsyncIterator[Minio]:
    settings.require("s3")
    s3 = settings.s3
    assert s3.endpoint_url is not None and s3.secret_access_key is not None
    endpoint = urlsplit(s3.endpoint_url)
    yield Minio(
        endpoint.netloc,
        access_key=s3.access_key_id,
        secret_key=s3.secret_access_key.reveal(),
        secure=endpoint.scheme == "https",
    )
