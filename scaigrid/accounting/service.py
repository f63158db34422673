"""Accounting as the request path sees it: admit a request (rate limits, budgets), record its usage.

Neither touches MariaDB once the budget definitions are cached. Both go to Redis in one Lua call per batch
(scripts.BATCH): whatever admissions and records queue while one call is on its way go together in the next (a
group commit), so a busy process pays one round trip for many requests and an idle one sends each at once.
If Redis cannot be reached, RATE_LIMIT_ON_REDIS_FAILURE decides: `serve` admits unlimited (counted in
scaigrid_redis_failures_total, a warning at most once a minute), `refuse` answers 503 LIMITS_UNAVAILABLE.
Usage is never dropped: without Redis it is written to MariaDB directly.

Nor when Redis loses its data before the worker's flush has moved the buffer into MariaDB: each process keeps a
journal, in memory, of the records it pushed, until the worker reports them drained. The answer to each batch of
records says whether Redis still held the process's last push, and how far the flush got (scripts.BATCH); when Redis
had lost it, the process writes its whole journal to MariaDB, as it does without Redis (idempotent on the request id,
so what was flushed already is not doubled).
"""

import asyncio
import functools
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scaigrid import errors
from scaigrid.accounting import scripts, usage
from scaigrid.accounting.budgets import (
    LIMIT_TYPES,
    TOPIC_BUDGETS,
    Budget,
    BudgetCache,
    Period,
    counter_key,
    current_period,
    split_cost,
)
from scaigrid.accounting.records import RateState, UsageRecord
from scaigrid.appkeys import RATE_STATE
from scaigrid.auth.principal import Principal
from scaigrid.cache import InvalidationBus
from scaigrid.clock import utc_now
from scaigrid.db import in_transaction
from scaigrid.hybrid import outbox as hybrid_outbox
from scaigrid.settings import Settings
from scaigrid.webhooks import outbox

logger = logging.getLogger(__name__)

RATE_KEY_PREFIX = "scaigrid:rl:"  # + level:id, a sorted set of the last minute's admitted requests
WINDOW_S = 60
FAILURE_LOG_INTERVAL_S = 60.0
BATCH_MAX = 256  # admissions, and usage records, sent in one call at most (each)
_ADMITTED, _RATE_LIMITED, _OVER_BUDGET = 0, 1, 2
# Records a journal keeps at most (~490 bytes each as JSON: ~50 MB): over a minute of a process at its benchmarked
# peak (1,500 req/s), where a record waits for the next flush (30 s by default). When the worker falls further
# behind, the oldest leave the journal (logged): they are still in Redis, as before journals.
JOURNAL_MAX_RECORDS = 100_000
# A stopped process's key goes after that long. One idle for longer reads its key's expiry as a loss: it writes its
# journal to MariaDB again, which doubles nothing.
WRITER_KEY_TTL_S = 30 * 86_400
REPLAY_CHUNK = 1000  # records per transaction when a journal is written to MariaDB
# A process that pushed no records for this many flush intervals asks Redis about its journal once (a batch of no
# calls): a process no request reaches learns of a loss, and of what the flush drained, all the same.
PROBE_AFTER_INTERVALS = 2

REDIS_FAILURES = Counter("scaigrid_redis_failures_total", "Redis operations of the request path that failed",
                         ["operation"])
USAGE_REPLAYED = Counter("scaigrid_usage_replayed_total",
                         "usage records written to MariaDB from an http process's journal after Redis lost them")
USAGE_UNJOURNALED = Counter("scaigrid_usage_unjournaled_total",
                            "usage records that left a full journal before the worker flushed them")
BUDGET_THRESHOLDS = Counter("scaigrid_budget_thresholds_total",
                            "budgets crossing their soft limit or limit (once per budget and period)",
                            ["threshold", "hard_action"])

_LEVEL_NAMES = {"key": "API key", "user": "user", "tenant": "tenant", "partner": "partner"}
_HARD_CONSEQUENCE = {
    "block": "new metered requests are refused until the period ends",
    "notify": "requests are still served (hard_action notify)",
    "throttle": "rate limits are cut to a tenth until the period ends",
}


@dataclass(frozen=True)
class JournalState:
    """What a batch's answer says of the usage journal (scripts.BATCH)."""

    lost: bool  # Redis no longer holds this process's last confirmed push
    position: int  # that of the batch's last record among all entries ever pushed to the buffer (0: it had none)
    drained: int  # how many of those, from the first, are in MariaDB


@dataclass(frozen=True)
class BudgetEvent:
    """A budget crossed its soft limit or its limit: reported once per budget and period, by one process."""

    budget: Budget
    threshold: str  # soft | hard
    period: Period



def _limit_args(budget: Budget) -> list[str]:
    """The budget's cost, token and request limits as the scripts take them: '' for one not set."""
    limits = budget.limits
    return [str(limits[limit_type]) if limit_type in limits else "" for limit_type in LIMIT_TYPES]


class Accounting:
    def __init__(self, settings: Settings, engine: AsyncEngine, redis: Redis, bus: InvalidationBus) -> None:
        self._settings = settings
        self._engine = engine
        self._budgets = BudgetCache(engine)
        bus.on(TOPIC_BUDGETS, self._budgets.invalidate)
        self._batch = redis.register_script(scripts.BATCH)
        self._admits: list[tuple[list[str], list[str | int], asyncio.Future[list[int]]]] = []
        self._pending: list[tuple[UsageRecord, asyncio.Future[None] | None]] = []
        self._writer: asyncio.Task[None] | None = None
        # The sliding log's member for each admitted request: unique across processes by the token, within by count.
        self._member_prefix = secrets.token_hex(8) + ":"
        self._members = itertools.count()
        self._emitting: set[asyncio.Task[None]] = set()  # budget webhook events on their way to the outbox
        self._next_failure_log = 0.0
        # The journal: (position, the records as pushed) of each batch Redis took and the flush has not stored yet.
        self._journal: deque[tuple[int, Sequence[str]]] = deque()
        self._journaled = 0
        self._writer_key = usage.WRITER_KEY_PREFIX + secrets.token_hex(8)
        self._stamps = itertools.count(1)
        self._confirmed = 0  # the stamp of this process's last push Redis confirmed
        self._replaying: set[asyncio.Task[None]] = set()
        self._next_unjournaled_log = 0.0
        self._probe_after_s = PROBE_AFTER_INTERVALS * settings.limits.usage_flush_interval_s
        self._probe_timer: asyncio.TimerHandle | None = None
        self._probe_due = False
        self._last_records_s = 0.0  # time.monotonic() of the last batch of records

    async def admit(self, request: web.Request, principal: Principal, *, metered: bool) -> None:
        """Counts the request against its rate limits (and, when metered, checks budgets); raises when refused.

        Sets request[RATE_STATE] whether or not the request is admitted, so even a 429 carries the headers.
        """
        if principal.kind == "service":
            if metered:  # no metered route accepts a scope (requires() refuses one); this keeps usage tenant-bound
                raise errors.insufficient_scope("a service token runs no inference: use a tenant's API key")
            return  # administration by the operator scope, which belongs to no tenant: nothing to count it against
        limits = principal.limits
        levels = [(level, object_id, rpm) for level, object_id, rpm in (
            ("key", principal.api_key_id, limits.key), ("user", principal.user_id, limits.user),
            ("tenant", principal.tenant_id, limits.tenant), ("partner", principal.partner_id, limits.partner),
        ) if object_id is not None]
        budgets: list[Budget] = []
        if metered:  # a notify budget never changes whether a request is admitted: not checked
            found = await self._budgets.applying_to(principal.partner_id, principal.tenant_id, principal.user_id)
            budgets = [budget for budget in found if budget.hard_action != "notify"]
        now = datetime.now(UTC)
        keys = [f"{RATE_KEY_PREFIX}{level}:{object_id}" for level, object_id, _ in levels]
        keys += [counter_key(budget.id, current_period(budget.period, now)) for budget in budgets]
        args: list[str | int] = [len(levels), self._member_prefix + str(next(self._members)),
                                 *(rpm for _, _, rpm in levels)]
        for budget in budgets:
            args += [budget.hard_action, *_limit_args(budget)]
        answer = asyncio.get_running_loop().create_future()
        self._admits.append((keys, args, answer))
        self._wake()
        try:
            (verdict, shown, limit, remaining, reset_unix, retry_after_s, blocking, blocking_limit
             ) = await answer
        except RedisError as exc:
            self._redis_failed("admit", exc)
            # Unknown while Redis is away; the headers stay, so clients that read them keep working.
            lowest = min(rpm for _, _, rpm in levels)
            request[RATE_STATE] = RateState(lowest, lowest, int(time.time()) + WINDOW_S)
            if self._settings.limits.on_redis_failure == "refuse":
                raise errors.limits_unavailable() from None
            return
        request[RATE_STATE] = RateState(limit, remaining, reset_unix)
        if verdict == _RATE_LIMITED:
            level = _LEVEL_NAMES[levels[shown - 1][0]]
            raise errors.rate_limited(retry_after_s, f"rate limit of this {level} reached: {limit} requests per minute")
        if verdict == _OVER_BUDGET:
            budget = budgets[blocking - 1]
            raise errors.budget_exceeded(f"the {budget.period} {LIMIT_TYPES[blocking_limit - 1]} limit of the budget "
                                         f"of this {budget.scope} ({budget.id}) is used up")

    def submit(self, record: UsageRecord) -> None:
        """Queues one usage record for the next batch and returns at once (the request path does not wait).

        A write that fails even in MariaDB is logged with its request ids.
        """
        self._enqueue(record, None)

    async def record(self, record: UsageRecord) -> None:
        """Like submit, but returns once the record is stored, and raises if it could not be."""
        stored = asyncio.get_running_loop().create_future()
        self._enqueue(record, stored)
        await asyncio.shield(stored)  # a cancelled caller must not take its record out of the batch

    async def drain(self) -> None:
        """Returns when every queued record (and budget event) is written: the last step of a clean shutdown."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        if self._journal:  # the process's memory of them goes now: Redis must still hold them, or MariaDB must
            await self._probe(stopping=True)
        await asyncio.gather(*self._emitting, *self._replaying)

    def _enqueue(self, record: UsageRecord, stored: "asyncio.Future[None] | None") -> None:
        self._pending.append((record, stored))
        self._wake()

    def _wake(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending())

    async def _write_pending(self) -> None:
        while self._pending or self._admits or self._probe_due:
            if self._probe_due and not self._pending and not self._admits:
                await self._probe()
                continue
            admits, self._admits = self._admits[:BATCH_MAX], self._admits[BATCH_MAX:]
            batch, self._pending = self._pending[:BATCH_MAX], self._pending[BATCH_MAX:]
            try:
                await self._write(admits, [record for record, _ in batch])
            except Exception as exc:
                for _, _, answer in admits:
                    if not answer.done():
                        answer.set_exception(exc)
                if not batch:
                    continue
                logger.exception("usage of %d request(s) not recorded: %s", len(batch),
                                 ", ".join(record.request_id for record, _ in batch), extra={"event": "usage_lost"})
                for _, stored in batch:
                    if stored is not None:
                        stored.set_exception(exc)
            else:
                for _, stored in batch:
                    if stored is not None:
                        stored.set_result(None)

    async def _write(self, admits: list[tuple[list[str], list[str | int], "asyncio.Future[list[int]]"]],
                     records: list[UsageRecord]) -> None:
        """One batch: the records (first, so that admissions see the budgets they use), then the admissions; each
        admission's answer, or the Redis error, goes to its waiter. Records Redis did not take go to MariaDB."""
        writes = []
        encoded = []
        for record in records:
            budgets = await self._budgets.applying_to(record.partner_id, record.tenant_id, record.user_id)
            at = datetime.fromtimestamp(record.created_at_unix, UTC)
            periods = [current_period(budget.period, at) for budget in budgets]
            units, picos = split_cost(record.cost)
            keys = [usage.BUFFER_KEY, *(counter_key(b.id, p) for b, p in zip(budgets, periods, strict=True))]
            encoded.append(usage.encode(record))
            args: list[str | int] = [encoded[-1], record.tokens_in + record.tokens_out, units, picos]
            for budget, period in zip(budgets, periods, strict=True):
                args += [period.ttl_s or 0, str(budget.soft_limit_pct), *_limit_args(budget)]
            writes.append((keys, args, budgets, periods))
        calls = [(scripts.RECORD, keys, args) for keys, args, _, _ in writes]
        admits = [admit for admit in admits if not admit[2].done()]  # a waiter whose client went away is cancelled
        calls += [(scripts.ADMIT, keys, args) for keys, args, _ in admits]
        if not calls:
            return
        stamp = next(self._stamps) if records else 0
        try:
            answers, state = await self._call_batch(calls, stamp)
        except RedisError as exc:
            for _, _, answer in admits:
                if not answer.done():
                    answer.set_exception(exc)
            if not records:
                return
            self._redis_failed("record", exc)
            # Whether Redis took them or not, they are in MariaDB then, so the journal need not keep them; and if it
            # did, the writer key holds this stamp, above the confirmed one: no false alarm at the next batch.
            # The budget counters miss them; the bill does not.
            await in_transaction(self._engine, functools.partial(self._store, records=records))
            return
        self._keep(state, stamp, encoded)
        for (_, _, answer), admitted in zip(admits, answers[len(writes):], strict=True):
            if not answer.done():
                answer.set_result(admitted)
        for (_, _, budgets, periods), crossed in zip(writes, answers[:len(writes)], strict=True):
            for index, threshold in zip(crossed[::2], crossed[1::2], strict=True):
                self._budget_crossed(BudgetEvent(budgets[index - 1], threshold.decode(), periods[index - 1]))

    async def _store(self, conn: AsyncConnection, records: Sequence[UsageRecord]) -> None:
        """Records straight into MariaDB, with what the flush would have done with them."""
        await usage.store(conn, records)
        await outbox.emit_usage(conn, records)  # the flush, which would have emitted them, never sees them
        if self._settings.hybrid.role == "node":  # nor queued them for the link
            await hybrid_outbox.enqueue(conn, records)

    async def _call_batch(self, calls: list[tuple[str, list[str], list[str | int]]], stamp: int
                          ) -> tuple[list[list[Any]], JournalState]:
        """Each call's answer, and the journal's state, from one EVALSHA of scripts.BATCH (which reloads the script
        into a Redis that lost it: NOSCRIPT means nothing ran). stamp: this batch's, if it has records (else 0)."""
        keys: list[str] = [usage.TRIMMED_KEY, self._writer_key]
        head: list[str | int] = [len(calls), self._confirmed, stamp, WRITER_KEY_TTL_S]
        args: list[str | int] = []
        for kind, call_keys, call_args in calls:
            head += [kind, len(call_keys), len(call_args)]
            keys += call_keys
            args += call_args
        answers: list[list[Any]] = await self._batch(keys, head + args)
        lost, position, drained = answers.pop()
        return answers, JournalState(bool(lost), position, drained)

    def _keep(self, state: JournalState, stamp: int, encoded: list[str]) -> None:
        """Brings the journal up to date with a batch's answer: replays it if Redis lost data, forgets what the
        flush drained, and keeps the batch's records (if any)."""
        if state.lost and self._journal:
            # Everything journaled, not only what was lost: which that is cannot be told, and a replay doubles nothing.
            replay = [entry for _, entries in self._journal for entry in entries]
            self._journal.clear()
            self._journaled = 0
            task = asyncio.create_task(self._replay(replay))
            self._replaying.add(task)
            task.add_done_callback(self._replaying.discard)
        while self._journal and self._journal[0][0] <= state.drained:
            self._journaled -= len(self._journal.popleft()[1])
        if not stamp:
            return
        self._confirmed = stamp
        self._last_records_s = time.monotonic()
        if self._probe_timer is None:
            self._probe_timer = asyncio.get_running_loop().call_later(self._probe_after_s, self._probe_if_idle)
        self._journal.append((state.position, encoded))
        self._journaled += len(encoded)
        unjournaled = 0
        while self._journaled > JOURNAL_MAX_RECORDS:
            dropped = len(self._journal.popleft()[1])
            self._journaled -= dropped
            unjournaled += dropped
        if unjournaled:
            USAGE_UNJOURNALED.inc(unjournaled)
            now = time.monotonic()
            if now >= self._next_unjournaled_log:
                self._next_unjournaled_log = now + FAILURE_LOG_INTERVAL_S
                logger.warning("the usage journal is full (%d records): the oldest are in Redis only until the worker "
                               "flushes them (is it running?); logged at most once a minute, see "
                               "scaigrid_usage_unjournaled_total", JOURNAL_MAX_RECORDS,
                               extra={"event": "usage_journal_full", "count": unjournaled})

    def _probe_if_idle(self) -> None:
        """The probe timer: a probe if no records went since it was set and the journal still holds some."""
        self._probe_timer = None
        if not self._journal:
            return
        idle_s = time.monotonic() - self._last_records_s
        if idle_s < self._probe_after_s:  # records went meanwhile: their answers told; wait from the last
            self._probe_timer = asyncio.get_running_loop().call_later(self._probe_after_s - idle_s, self._probe_if_idle)
            return
        self._probe_due = True
        self._wake()

    async def _probe(self, *, stopping: bool = False) -> None:
        """A batch of no calls: whether Redis lost this process's pushes, and what the flush drained.

        stopping: the process goes (no probe after this one); if Redis does not answer, the journal goes to MariaDB.
        """
        self._probe_due = False
        try:
            _, state = await self._call_batch([], 0)
        except Exception as exc:
            if not isinstance(exc, RedisError):
                logger.exception("the usage journal's probe failed", extra={"event": "usage_probe_failed"})
            state = JournalState(lost=stopping, position=0, drained=0)  # else the next batch or probe tells
        self._keep(state, 0, [])
        if self._journal and not stopping and self._probe_timer is None:  # not drained yet: ask again later
            self._last_records_s = time.monotonic()
            self._probe_timer = asyncio.get_running_loop().call_later(self._probe_after_s, self._probe_if_idle)

    async def _replay(self, entries: list[str]) -> None:
        """Writes a journal to MariaDB after Redis lost data, in the background (admissions do not wait for it).

        If MariaDB fails too, what is left goes back to Redis, where the next flush finds it.
        """
        records = [usage.decode(entry) for entry in entries]
        done = 0
        try:
            for start in range(0, len(records), REPLAY_CHUNK):
                await in_transaction(self._engine,
                                     functools.partial(self._store, records=records[start:start + REPLAY_CHUNK]))
                done = min(len(records), start + REPLAY_CHUNK)
                USAGE_REPLAYED.inc(done - start)
        except Exception:
            left = len(records) - done
            logger.exception("Redis lost buffered usage, and MariaDB did not take %d of the %d record(s) of this "
                             "process's journal: those go to Redis again", left, len(records),
                             extra={"event": "usage_replay_failed", "count": left})
            for record in records[done:]:
                self._enqueue(record, None)
        else:
            logger.warning("Redis lost buffered usage: the %d record(s) this process pushed since the flush last "
                           "drained its journal are written to MariaDB", done,
                           extra={"event": "usage_replayed", "count": done})

    def _budget_crossed(self, event: BudgetEvent) -> None:
        budget = event.budget
        BUDGET_THRESHOLDS.labels(event.threshold, budget.hard_action).inc()
        limits = ", ".join(f"{limit_type} {value}" for limit_type, value in budget.limits.items())
        what = (f"{budget.period} budget {budget.id} of {budget.scope} {budget.scope_id} "
                f"(period {event.period.label}, limits {limits})")
        fields = {"event": f"budget_{event.threshold}_limit", "budget_id": budget.id, "period": event.period.label}
        if event.threshold == "soft":
            logger.warning("%s reached its soft limit (%s)", what, budget.soft_limit_pct, extra=fields)
        else:
            logger.warning("%s is used up: %s", what, _HARD_CONSEQUENCE[budget.hard_action], extra=fields)
        # In the background: the request path never waits for MariaDB.
        task = asyncio.create_task(self._emit_budget_event(event))
        self._emitting.add(task)
        task.add_done_callback(self._emitting.discard)

    async def _emit_budget_event(self, event: BudgetEvent) -> None:
        """budget.*_limit_reached into the webhook outbox; a failure is logged, the request never sees it."""
        try:
            await outbox.emit_budget(self._engine, event.budget, event.threshold, event.period, utc_now())
        except Exception:
            logger.exception("the budget webhook event of budget %s could not be stored", event.budget.id,
                             extra={"event": "budget_webhook_event_lost", "budget_id": event.budget.id})

    def _redis_failed(self, operation: str, exc: RedisError) -> None:
        REDIS_FAILURES.labels(operation).inc()
        now = time.monotonic()
        if now >= self._next_failure_log:
            self._next_failure_log = now + FAILURE_LOG_INTERVAL_S
            policy = self._settings.limits.on_redis_failure
            logger.warning("Redis unreachable (%s): RATE_LIMIT_ON_REDIS_FAILURE=%s %s; usage goes to MariaDB directly "
                           "(logged at most once a minute; see scaigrid_redis_failures_total)", type(exc).__name__,
                           policy, "admits unlimited" if policy == "serve" else "refuses requests",
                           extra={"event": "redis_failure", "operation": operation})
