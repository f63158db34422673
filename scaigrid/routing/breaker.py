"""Per-backend circuit breakers shared by every http process: state in Redis, mirrored in process via the bus.

A breaker is closed (serving), open (refused until `opened_until`) or half-open (one trial request in flight;
its outcome closes or re-opens the breaker). BREAKER_FAILURE_THRESHOLD consecutive failures open it for
BREAKER_OPEN_S. A 429 with Retry-After does not count as a failure: it puts the backend on a cooldown instead.

Each change is one Lua script on the backend's Redis hash, which also publishes the new state on the invalidation
bus (topic "breaker"), so every process mirrors every breaker and choosing a backend costs no Redis round trip.
A healthy backend's success touches Redis not at all; Redis is only asked when something goes wrong or recovers.
Every change bumps a version, so a process never lets an older message overwrite a newer state.
"""

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Gauge
from redis.exceptions import RedisError

from scaigrid.cache import CHANNEL, InvalidationBus
from scaigrid.clock import iso, utc_from_unix
from scaigrid.settings import Settings

logger = logging.getLogger(__name__)

TOPIC_BREAKER = "breaker"
KEY_PREFIX = "scaigrid:breaker:"
CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
# What scaigrid_circuit_breaker_state reports for each state.
STATE_GAUGE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
REDIS_WARNING_INTERVAL_S = 60.0
LAST_ERROR_MAX_CHARS = 300

BREAKER_STATE = Gauge("scaigrid_circuit_breaker_state", "Circuit breaker per backend: 0 closed, 1 half-open, 2 open",
                      ["backend_id"])
BACKEND_HEALTH = Gauge("scaigrid_backend_health", "1 while a backend takes requests (breaker closed, no cooldown)",
                       ["backend_id"])

# Shared by every script: the time is Redis's own, so all processes agree on it; the state is published as
# "version|state|failures|opened_until|trial_until|cooldown_until|backend_id" (backend ids contain no "|").
_LUA_COMMON = """
local key, channel, backend_id = KEYS[1], ARGV[1], ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function stamp(seconds) return string.format('%.6f', seconds) end
local function field(name, default) return redis.call('HGET', key, name) or default end
local function publish()
  redis.call('HINCRBY', key, 'version', 1)
  local v = redis.call('HMGET', key, 'version', 'state', 'failures', 'opened_until', 'trial_until', 'cooldown_until')
  local message = table.concat({v[1], v[2] or 'closed', v[3] or '0', v[4] or '0', v[5] or '0', v[6] or '0',
                                backend_id}, '|')
  redis.call('PUBLISH', channel, 'breaker:' .. message)
  return message
end
local function current()
  local v = redis.call('HMGET', key, 'version', 'state', 'failures', 'opened_until', 'trial_until', 'cooldown_until')
  return table.concat({v[1] or '0', v[2] or 'closed', v[3] or '0', v[4] or '0', v[5] or '0', v[6] or '0',
                       backend_id}, '|')
end
"""

# ARGV[3] threshold, ARGV[4] open seconds, ARGV[5] error text, ARGV[6] its public form.
_FAILURE = _LUA_COMMON + """
local failures = redis.call('HINCRBY', key, 'failures', 1)
local state = field('state', 'closed')
redis.call('HSET', key, 'last_error', ARGV[5], 'last_error_public', ARGV[6], 'last_error_at', stamp(now))
if state == 'half_open' or (state == 'closed' and failures >= tonumber(ARGV[3])) then
  redis.call('HSET', key, 'state', 'open', 'opened_until', stamp(now + tonumber(ARGV[4])))
end
return publish()
"""

_SUCCESS = _LUA_COMMON + """
redis.call('HSET', key, 'state', 'closed', 'failures', 0, 'opened_until', 0, 'trial_until', 0)
return publish()
"""

# ARGV[3] lease seconds: if the trial never reports (its client went away), another may start after it.
_TRIAL = _LUA_COMMON + """
local state = field('state', 'closed')
if (state == 'open' and now >= tonumber(field('opened_until', '0')))
    or (state == 'half_open' and now >= tonumber(field('trial_until', '0'))) then
  redis.call('HSET', key, 'state', 'half_open', 'trial_until', stamp(now + tonumber(ARGV[3])))
  return {1, publish()}
end
return {0, current()}
"""

# ARGV[3] seconds the backend asked us to stay away.
_COOLDOWN = _LUA_COMMON + """
local until_s = now + tonumber(ARGV[3])
if until_s > tonumber(field('cooldown_until', '0')) then
  redis.call('HSET', key, 'cooldown_until', stamp(until_s))
end
return publish()
"""


@dataclass(frozen=True, slots=True)
class BreakerView:
    version: int
    state: str
    failures: int
    opened_until: float
    trial_until: float
    cooldown_until: float


def _parse(message: str) -> tuple[str, BreakerView]:
    version, state, failures, opened_until, trial_until, cooldown_until, backend_id = message.split("|", 6)
    return backend_id, BreakerView(int(version), state, int(failures), float(opened_until), float(trial_until),
                                   float(cooldown_until))


# What `Breakers.check` says about a backend right now.
USABLE, TRIAL, COOLING, REFUSED = range(4)


def _iso(unix_s: float) -> str | None:
    """Like every time the API shows: UTC to the second, with a Z."""
    if not unix_s:
        return None
    return iso(utc_from_unix(unix_s))


class Breakers:
    def __init__(self, settings: Settings, redis: aioredis.Redis, bus: InvalidationBus) -> None:
        self._threshold = settings.dispatch.breaker_failures
        self._open_s = settings.dispatch.breaker_open_s
        self._redis = redis
        self._views: dict[str, BreakerView] = {}  # absent = closed, no failures
        self._refresh_task: asyncio.Task[None] | None = None
        self._known: tuple[str, ...] = ()
        self._warned_at = 0.0
        self._failure = redis.register_script(_FAILURE)
        self._success = redis.register_script(_SUCCESS)
        self._trial = redis.register_script(_TRIAL)
        self._cooldown = redis.register_script(_COOLDOWN)
        bus.on(TOPIC_BREAKER, self._on_message)

    # --- the hot path: no I/O ---

    def check(self, backend_id: str, now_s: float) -> int:
        """USABLE, TRIAL (usable if `claim_trial` wins), COOLING (asked us to wait) or REFUSED (open)."""
        view = self._views.get(backend_id)
        if view is None:
            return USABLE
        if view.cooldown_until > now_s:
            return COOLING
        if view.state == CLOSED:
            return USABLE
        until_s = view.opened_until if view.state == OPEN else view.trial_until
        return TRIAL if now_s >= until_s else REFUSED

    def cooling_until(self, backend_id: str) -> float:
        view = self._views.get(backend_id)
        return view.cooldown_until if view is not None else 0.0

    def clean(self, backend_id: str) -> bool:
        """True when a success has nothing to reset (the usual case: no Redis call)."""
        view = self._views.get(backend_id)
        return view is None or (view.state == CLOSED and view.failures == 0)

    # --- changes: one Lua script each ---

    async def claim_trial(self, backend_id: str, lease_s: float) -> bool:
        """Whether this request is the one trial of a breaker whose open time is over."""
        result = await self._run(self._trial, backend_id, lease_s)
        if result is None:
            return True  # Redis unreachable: let the request try rather than refuse a backend we cannot judge
        won, message = result
        self._apply(message)
        return bool(won)

    async def succeeded(self, backend_id: str) -> None:
        self._apply(await self._run(self._success, backend_id))

    async def failed(self, backend_id: str, error: str, public: str) -> None:
        """`error` may quote the backend (shown to the platform only); `public` never does (shown to the rest)."""
        self._apply(await self._run(self._failure, backend_id, self._threshold, self._open_s,
                                    error[:LAST_ERROR_MAX_CHARS], public[:LAST_ERROR_MAX_CHARS]))

    async def cool_down(self, backend_id: str, seconds: float) -> None:
        self._apply(await self._run(self._cooldown, backend_id, seconds))

    async def _run(self, script: Any, backend_id: str, *args: object) -> Any:
        try:
            return await script(keys=[KEY_PREFIX + backend_id], args=[CHANNEL, backend_id, *args])
        except (RedisError, OSError) as exc:
            now = time.monotonic()
            if now - self._warned_at > REDIS_WARNING_INTERVAL_S:
                self._warned_at = now
                logger.warning("circuit breakers cannot reach Redis (%s); breaker states are not updated",
                               type(exc).__name__, extra={"event": "breaker_redis_unreachable"})
            return None

    # --- the mirror ---

    def _apply(self, message: Any) -> None:
        if message is None:
            return
        backend_id, view = _parse(_text(message))
        known = self._views.get(backend_id)
        if known is not None and known.version >= view.version:
            return
        self._views[backend_id] = view
        self._export(backend_id, view, time.time())

    def _export(self, backend_id: str, view: BreakerView | None, now_s: float) -> None:
        state = view.state if view is not None else CLOSED
        BREAKER_STATE.labels(backend_id).set(STATE_GAUGE_VALUES.get(state, 0))
        healthy = state == CLOSED and (view is None or view.cooldown_until <= now_s)
        BACKEND_HEALTH.labels(backend_id).set(1 if healthy else 0)

    def _on_message(self, key: str | None) -> None:
        if key is None:
            # The bus (re)connected: messages may have been missed; read every known breaker again.
            self._schedule_refresh()
            return
        try:
            self._apply(key)
        except ValueError:
            logger.warning("malformed breaker message %r", key, extra={"event": "breaker_message_malformed"})

    def track(self, backend_ids: tuple[str, ...]) -> None:
        """The backends of the current catalogue: their gauges exist, their states are read from Redis."""
        self._known = backend_ids
        now_s = time.time()
        for backend_id in backend_ids:
            self._export(backend_id, self._views.get(backend_id), now_s)
        self._schedule_refresh()

    def _schedule_refresh(self) -> None:
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = asyncio.create_task(self._refresh(), name="breaker-refresh")

    async def _refresh(self) -> None:
        ids = self._known
        if not ids:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for backend_id in ids:
                    pipe.hgetall(KEY_PREFIX + backend_id)
                states = await pipe.execute()
        except (RedisError, OSError) as exc:
            logger.warning("could not read circuit breaker states (%s)", type(exc).__name__,
                           extra={"event": "breaker_refresh_failed"})
            return
        now_s = time.time()
        for backend_id, raw in zip(ids, states, strict=True):
            view = _view_of(raw)
            if view is None:
                self._views.pop(backend_id, None)
            else:
                self._views[backend_id] = view
            self._export(backend_id, view, now_s)

    async def stop(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            await asyncio.gather(self._refresh_task, return_exceptions=True)

    # --- GET /v1/backends/{id}/health ---

    async def health(self, backend_id: str, *, platform: bool) -> dict[str, Any]:
        """The breaker as Redis has it now (the shared truth); this process's mirror when Redis is unreachable.

        `last_error` in full (it may quote the backend's answer) for a platform caller, else only its public form.
        """
        shared = True
        try:
            fields = _decoded(await self._redis.hgetall(KEY_PREFIX + backend_id))
        except (RedisError, OSError):
            shared = False
            view = self._views.get(backend_id)
            fields = {} if view is None else {
                "state": view.state, "failures": str(view.failures), "opened_until": str(view.opened_until),
                "cooldown_until": str(view.cooldown_until)}
        now_s = time.time()
        state = fields.get("state", CLOSED)
        opened_until = float(fields.get("opened_until", 0)) if state != CLOSED else 0.0
        cooldown_until = float(fields.get("cooldown_until", 0))
        return {
            "state": state,
            "healthy": state == CLOSED and cooldown_until <= now_s,
            "consecutive_failures": int(fields.get("failures", 0)),
            "last_error": fields.get("last_error") if platform else _public_error(fields),
            "last_error_at": _iso(float(fields.get("last_error_at", 0))),
            "opened_until": _iso(opened_until),
            "cooldown_until": _iso(cooldown_until) if cooldown_until > now_s else None,
            "shared": shared,
        }


def _public_error(fields: dict[str, str]) -> str | None:
    if "last_error_public" in fields:
        return fields["last_error_public"]
    last_error = fields.get("last_error")  # written before the public form was kept: its kind alone
    return None if last_error is None else last_error.split(":", 1)[0]


def _decoded(raw: dict[Any, Any]) -> dict[str, str]:
    return {_text(key): _text(value) for key, value in raw.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _view_of(raw: dict[Any, Any]) -> BreakerView | None:
    if not raw:
        return None
    fields = _decoded(raw)
    return BreakerView(int(fields.get("version", 0)), fields.get("state", CLOSED), int(fields.get("failures", 0)),
                       float(fields.get("opened_until", 0)), float(fields.get("trial_until", 0)),
                       float(fields.get("cooldown_until", 0)))
