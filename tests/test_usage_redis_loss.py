"""Usage survives Redis losing its data before the worker's flush: each http process's journal is written to MariaDB
once the process sees the loss, and nothing is doubled (records already flushed, the worker's later flushes)."""

import logging
import re
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select

from appliance import devstack
from scaigrid.accounting import flush, service, usage
from scaigrid.accounting.records import UsageRecord
from scaigrid.accounting.service import Accounting
from scaigrid.cache import InvalidationBus
from scaigrid.db.tables import usage_records, webhook_deliveries, webhook_events
from scaigrid.resources import database_ctx, redis_ctx
from scaigrid.settings import load_settings
from tests.accounting_fixtures import Ledger, ledger_for, start_worker
from tests.accounting_fixtures import usage as usage_of
from tests.backends import GATEWAY_SETTINGS, FakeBackend, backend, chat_model, http_call, serving
from tests.identity import call
from tests.support.env import create_key
from tests.support.processes import ModeProcess
from tests.support.waiting import eventually_async
from tests.webhook_receiver import Receiver

OWNER = {"partner_id": "prt_x", "tenant_id": "ten_x", "user_id": "usr_x"}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


async def flush_now(ledger: Ledger) -> int:
    """One flush run, as the worker's tick does it; how many entries it moved."""
    lock = ledger.redis.lock(flush.FLUSH_LOCK_KEY, timeout=30)
    assert await lock.acquire()
    try:
        return await flush.flush_buffer(ledger.engine, ledger.redis, lock)
    finally:
        await lock.release()


async def stored_ids(ledger: Ledger) -> list[str]:
    async with ledger.engine.connect() as conn:
        return list((await conn.scalars(select(usage_records.c.request_id))).all())


def replayed(url: str) -> float:
    """scaigrid_usage_replayed_total of an http process."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        found = re.search(r"^scaigrid_usage_replayed_total (\S+)$", response.read().decode(), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def test_a_process_writes_what_redis_lost_to_mariadb_once(
        migrated_env: dict[str, str], start_mode: Callable[..., ModeProcess], tmp_path: Path, receiver: Receiver):
    env = {**migrated_env, "WEBHOOK_ALLOW_PRIVATE_TARGETS": "true", **GATEWAY_SETTINGS}
    fake = FakeBackend().start()
    try:
        with serving(env, tmp_path, [backend("b-ok", fake, "ok")], [chat_model("acme/chat", [("b-ok", 1, 1)])]
                     ) as gateway:
            reply = call(gateway.url, "POST", "/v1/webhooks", create_key(env, "tenant_admin"),
                         {"url": receiver.url("usage"), "events": ["request.completed"]})
            assert reply.status == 201, reply.body
            receiver.secrets["usage"] = reply.data["secret"]

            def chat() -> str:
                status, headers, body = http_call("POST", gateway.url + "/v1/inference/chat", gateway.key, {
                    "model": "acme/chat", "messages": [{"role": "user", "content": "hi"}]})
                assert status == 200, body
                return headers["X-Request-ID"]

            async with ledger_for(env) as ledger:
                async def buffered(count: int) -> bool:
                    return await ledger.redis.llen(usage.BUFFER_KEY) == count

                # Pushed to Redis, never flushed: Redis restarts empty.
                lost = [chat() for _ in range(3)]
                await eventually_async(lambda: buffered(3), "the usage pushed")
                await ledger.redis.flushall()
                # The next request's batch tells the process; it writes its journal to MariaDB at once.
                after_loss = chat()
                await eventually_async(lambda: replayed(gateway.url) == 3, "the journal replayed")
                assert sorted(await stored_ids(ledger)) == sorted(lost)
                await eventually_async(lambda: buffered(1), "the new request's usage pushed")

                # Flushed before the loss, but the process has not heard it was (no batch since): it writes them
                # again, and they stay one row each.
                flushed = [chat() for _ in range(2)]
                await eventually_async(lambda: buffered(3), "the usage pushed")
                assert await flush_now(ledger) == 3
                await ledger.redis.flushall()
                last = chat()
                await eventually_async(lambda: replayed(gateway.url) == 6, "the journal replayed")
                assert sorted(await stored_ids(ledger)) == sorted([*lost, after_loss, *flushed])

                # The worker's flush of what came after doubles nothing either; each event is stored and sent once.
                start_worker(start_mode, env)
                everything = sorted([*lost, after_loss, *flushed, last])
                await eventually_async(lambda: buffered(0), "the buffer flushed")
                assert sorted(await stored_ids(ledger)) == everything
                async with ledger.engine.connect() as conn:
                    events = (await conn.execute(select(webhook_events.c.event_type, webhook_events.c.payload))).all()
                    assert await conn.scalar(select(func.count()).select_from(webhook_deliveries)) == len(everything)
                assert sorted(payload["request_id"] for _, payload in events) == everything
                assert {event_type for event_type, _ in events} == {"request.completed"}
                receiver.wait_for(lambda: len(receiver.arrived("usage")) == len(everything), "the events delivered")
    finally:
        fake.stop()
    arrivals = receiver.arrived("usage")
    assert sorted(a.event["payload"]["request_id"] for a in arrivals) == everything
    assert all(a.signature_valid for a in arrivals)


async def test_redis_back_from_an_older_snapshot_costs_only_the_processes_that_lost_something(
        migrated_env: dict[str, str], caplog: pytest.LogCaptureFixture):
    """Redis restarted from a snapshot (or failed over to a lagging replica) keeps the older part of what it had:
    the process whose newer records are gone replays its journal; the other, which lost nothing, does not."""
    caplog.set_level(logging.INFO, logger=service.__name__)
    async with ledger_for(migrated_env) as ledger:
        first = ledger.accounting
        second = Accounting(load_settings(migrated_env, env_file=None), ledger.engine, ledger.redis, ledger.bus)
        a1, a2, a3, b1, b2 = (usage_of(OWNER) for _ in range(5))
        await first.record(a1)
        await second.record(b1)
        snapshot = await dump(ledger.redis)
        await first.record(a2)  # after the snapshot: gone with the restart
        await restore(ledger.redis, snapshot)

        await first.record(a3)
        await second.record(b2)
        await first.drain()
        assert replays(caplog) == [2]  # a1 and a2: which of them Redis kept, the process cannot tell
        assert sorted(await stored_ids(ledger)) == sorted(r.request_id for r in (a1, a2))
        assert await flush_now(ledger) == 4  # a1 (restored), b1, a3, b2
        assert await ledger.redis.get(usage.TRIMMED_KEY) == b"4"  # what the journals learn the flush has stored
        assert sorted(await stored_ids(ledger)) == sorted(r.request_id for r in (a1, a2, a3, b1, b2))

        # Their journals now hold nothing the flush has drained: a loss now replays only what came since.
        caplog.clear()
        b3 = usage_of(OWNER)
        await first.record(usage_of(OWNER))
        await second.record(b3)
        await ledger.redis.flushall()
        await second.record(usage_of(OWNER))
        await second.drain()
        assert replays(caplog) == [1]
        assert b3.request_id in await stored_ids(ledger)


async def test_redis_restarted_empty_under_a_running_process(migrated_env: dict[str, str], tmp_path: Path):
    """A real restart: the process's connection breaks and the script is gone from Redis, not only the data."""
    private = devstack.start_redis(tmp_path / "redis")
    env = {**migrated_env, "REDIS_URL": private.url}
    settings = load_settings(env, env_file=None)
    try:
        async with database_ctx(settings) as engine, redis_ctx(settings) as redis:
            accounting = Accounting(settings, engine, redis, InvalidationBus())
            before = [usage_of(OWNER) for _ in range(3)]
            for record in before:
                await accounting.record(record)
            private.stop()
            private = devstack.start_redis(tmp_path / "redis", private.port)
            after = usage_of(OWNER)
            await accounting.record(after)  # in Redis, or in MariaDB if the broken connection failed the call
            await accounting.drain()
            ledger = Ledger(accounting, engine, redis, InvalidationBus())
            assert {r.request_id for r in before} <= set(await stored_ids(ledger))
            await flush_now(ledger)
            assert sorted(await stored_ids(ledger)) == sorted(r.request_id for r in (*before, after))
    finally:
        private.stop()


async def test_a_full_journal_keeps_the_newest_records(migrated_env: dict[str, str], caplog: pytest.LogCaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch):
    """The bound: with the worker away, the oldest records leave the journal (logged) and are in Redis only."""
    monkeypatch.setattr(service, "JOURNAL_MAX_RECORDS", 2)
    caplog.set_level(logging.INFO, logger=service.__name__)
    async with ledger_for(migrated_env) as ledger:
        records = [usage_of(OWNER) for _ in range(3)]
        for record in records:
            await ledger.accounting.record(record)
        assert [getattr(r, "event", None) for r in caplog.records].count("usage_journal_full") == 1
        await ledger.redis.flushall()
        await ledger.accounting.record(usage_of(OWNER))
        await ledger.accounting.drain()
        assert replays(caplog) == [2]
        assert sorted(await stored_ids(ledger)) == sorted(r.request_id for r in records[1:])


async def test_a_process_no_request_reaches_finds_out_all_the_same(migrated_env: dict[str, str]):
    """Idle for two flush intervals with records in its journal, a process asks Redis (a batch of no calls); a process
    stopping asks before its journal goes with it."""
    async with ledger_for({**migrated_env, "USAGE_FLUSH_INTERVAL_S": "1"}) as ledger:
        idle = usage_of(OWNER)
        await ledger.accounting.record(idle)
        await ledger.redis.flushall()
        await eventually_async(lambda: has_row(ledger, idle), "the journal replayed without a request", timeout_s=10)

    async with ledger_for(migrated_env) as ledger:  # a probe only after a minute: the one of the stop
        stopping = usage_of(OWNER)
        await ledger.accounting.record(stopping)
        await ledger.redis.flushall()
        await ledger.accounting.drain()
        assert await has_row(ledger, stopping)


async def has_row(ledger: Ledger, record: UsageRecord) -> bool:
    return record.request_id in await stored_ids(ledger)


def replays(caplog: pytest.LogCaptureFixture) -> list[int]:
    """The counts of the journal replays logged."""
    return [r.count for r in caplog.records if getattr(r, "event", None) == "usage_replayed"]


async def dump(redis: Redis) -> dict[bytes, tuple[bytes, int]]:
    """Every key's value and TTL (ms), as a snapshot keeps them."""
    snapshot = {}
    for key in await redis.keys("*"):
        value = await redis.dump(key)
        if value is not None:
            snapshot[key] = (value, max(0, await redis.pttl(key)))
    return snapshot


async def restore(redis: Redis, snapshot: dict[bytes, tuple[bytes, int]]) -> None:
    """Redis restarted from the snapshot: what it had then, nothing since."""
    await redis.flushall()
    for key, (value, ttl_ms) in snapshot.items():
        await redis.restore(key, ttl_ms, value)
