"""A process's Redis client on a Sentinel set follows a switchover at once: its commands, connections that were in use
at the switch included, and its invalidation subscription move to the new master while the old one is still up and
still a master (the sentinels demote it only some 10 s later, throwing away what was written there meanwhile).
tests/scale/test_sentinel_failover.py runs the same under load, and a master's crash."""

import asyncio
from pathlib import Path

import pytest
from redis.asyncio import Redis

from scaigrid.cache import CHANNEL, InvalidationBus
from scaigrid.resources import redis_ctx
from scaigrid.settings import load_settings
from tests.support.sentinel import MASTER_NAME, SentinelSet, client, role, start_sentinel_set
from tests.support.waiting import eventually_async

# The old master stays a master this long at least after the sentinels agree on the new one (8 s and more, seen).
MOVE_WITHIN_S = 5


@pytest.mark.timeout(90)
async def test_a_switchover_moves_commands_held_connections_and_the_subscription(tmp_path: Path):
    redis_set = start_sentinel_set(tmp_path / "rs")
    settings = load_settings({"REDIS_URL": redis_set.url}, env_file=None)
    try:
        async with redis_ctx(settings) as redis:
            bus = InvalidationBus()
            heard: list[str | None] = []
            bus.on("probe", heard.append)
            listening = asyncio.create_task(bus.listen(redis))
            try:
                await asyncio.wait_for(bus.subscribed.wait(), 10)
                await _switch_over(redis, redis_set, heard)
            finally:
                listening.cancel()
                await asyncio.gather(listening, return_exceptions=True)
    finally:
        redis_set.stop()


async def _switch_over(redis: Redis, redis_set: SentinelSet, heard: list[str | None]) -> None:
    old_port, new_port = redis_set.master.port, redis_set.replica.port

    async def port() -> int:
        return int((await redis.info("server"))["tcp_port"])

    async def on_new_master() -> bool:
        return await port() == new_port

    assert await port() == old_port
    held = await redis.connection_pool.get_connection()  # in use, as a request's, across the switch
    with client(redis_set.sentinels[0].port) as sentinel:
        assert sentinel.sentinel_failover(MASTER_NAME)
    await eventually_async(lambda: redis_set.agreed_master() == new_port, "the sentinels agreeing", 30)

    await eventually_async(on_new_master, "commands on the new master", MOVE_WITHIN_S)
    await redis.connection_pool.release(held)
    ports = await asyncio.gather(*(port() for _ in range(20)))  # the held connection among them, likely
    assert set(ports) == {new_port}

    def published_on_the_new_master() -> bool:
        with client(new_port) as new_master:
            new_master.publish(CHANNEL, "probe:x")
        return "x" in heard

    await eventually_async(published_on_the_new_master, "the subscription on the new master", MOVE_WITHIN_S,
                           interval_s=0.2)
    assert role(old_port)["role"] == "master", "demoted already: the old master's own kill moved everything"
