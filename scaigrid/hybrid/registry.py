"""Which managed grpc replica holds each node's link: Redis keys with a TTL, written by the holder, read by all.

`scaigrid:hybrid:link:<node_id>` holds the link's state as JSON with a TTL of 3 heartbeat intervals, refreshed on
each heartbeat, so a replica that dies without releasing its links stops being named within that time. A node's
newer link claims the key unconditionally; the replica that held the older one finds its session gone at its
next refresh and closes that stream. The sorted set `scaigrid:hybrid:links` (node id scored by the key's expiry)
lists the links without a SCAN of the whole keyspace, which also holds every rate-limit counter.
"""

import json
import time
from dataclasses import asdict, dataclass
from typing import Any, cast

import redis.asyncio as aioredis

KEY_PREFIX = "scaigrid:hybrid:link:"
INDEX_KEY = "scaigrid:hybrid:links"
SILENT_INTERVALS = 3  # a link silent this many heartbeat intervals is dropped, and its key expires

# Compare-and-set on the session, atomically: a refresh must never bring back a key a newer link took over.
# ARGV: session, value, ttl_ms, expiry score. Returns 0 when another session holds the key.
_REFRESH = """
local held = redis.call('GET', KEYS[1])
if held and cjson.decode(held).session ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
return 1
"""
# ARGV: session, node id. Deletes the key only while this session holds it.
_RELEASE = """
local held = redis.call('GET', KEYS[1])
if held and cjson.decode(held).session == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
end
return 0
"""


@dataclass(frozen=True)
class LinkHolder:
    """One node's link as its holding replica last wrote it."""

    node_id: str
    replica: str  # host:port of the grpc replica holding the link (its TunnelRelay)
    session: str  # random per link: tells a newer link of the node from an older one
    connected_since_unix: float
    last_heartbeat_unix: float
    software_version: str
    config_version: int  # of the snapshot the node last reported applied
    outbox_depth: int
    tunnels_in_flight: int
    models: tuple[str, ...]


def _key(node_id: str) -> str:
    return KEY_PREFIX + node_id


def _encode(entry: LinkHolder) -> str:
    return json.dumps({**asdict(entry), "models": list(entry.models)}, separators=(",", ":"))


def _decode(raw: bytes | str) -> LinkHolder:
    fields: dict[str, Any] = json.loads(raw)
    return LinkHolder(**{**fields, "models": tuple(fields["models"])})


async def claim(redis: "aioredis.Redis", entry: LinkHolder, ttl_s: float) -> None:
    """Makes `entry` the node's link, replacing whatever link held it (the newer link always wins)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(_key(entry.node_id), _encode(entry), px=int(ttl_s * 1000))
        pipe.zadd(INDEX_KEY, {entry.node_id: time.time() + ttl_s})
        await pipe.execute()


async def refresh(redis: "aioredis.Redis", entry: LinkHolder, ttl_s: float) -> bool:
    """Rewrites the entry and its TTL; False, changing nothing, when a newer link of the node holds the key."""
    written = await redis.eval(
        _REFRESH, 2, _key(entry.node_id), INDEX_KEY, entry.session, _encode(entry), int(ttl_s * 1000),
        time.time() + ttl_s, entry.node_id)
    return bool(written)


async def release(redis: "aioredis.Redis", node_id: str, session: str) -> None:
    """Forgets the link, unless a newer link of the node holds the key by now."""
    await redis.eval(_RELEASE, 2, _key(node_id), INDEX_KEY, session, node_id)


async def holder(redis: "aioredis.Redis", node_id: str) -> LinkHolder | None:
    raw = await redis.get(_key(node_id))
    return None if raw is None else _decode(raw)


async def holders(redis: "aioredis.Redis") -> dict[str, LinkHolder]:
    """Every live link, by node id."""
    await redis.zremrangebyscore(INDEX_KEY, "-inf", time.time())  # links that expired without a release
    members = cast(list[bytes], await redis.zrange(INDEX_KEY, 0, -1))  # clients here never decode responses
    node_ids = [member.decode() for member in members]
    if not node_ids:
        return {}
    values = await redis.mget([_key(node_id) for node_id in node_ids])
    return {node_id: _decode(raw) for node_id, raw in zip(node_ids, values, strict=True) if raw is not None}
