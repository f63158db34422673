"""The node's end of the hybrid link: one outbound TLS gRPC stream to the managed side, kept up whatever happens.

One session = one Connect call: Hello, Welcome, then heartbeats, config snapshots, usage batches and tunnels until
something fails; any failure ends the session, is logged once with its reason, and the next session starts after a
capped exponential backoff with full jitter. docs/hybrid.md, "The link protocol (node side)", tells the story.
"""

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import grpc
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from scaigrid import __version__
from scaigrid.db.tables import backends, model_routes, models
from scaigrid.health import check_database, check_redis
from scaigrid.hybrid import mirror, outbox, protocol, snapshot_schema
from scaigrid.hybrid.tunnel import FairSender, NodeTunnels
from scaigrid.routing.catalogue import MANAGED
from scaigrid.rpc.generated.scaigrid.hybrid.v1 import link_pb2, link_pb2_grpc
from scaigrid.rpc.interceptors import ERROR_CODE_KEY
from scaigrid.settings import Settings

logger = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.5
SILENT_INTERVALS = 3  # a link with no message from the managed side for this many heartbeat intervals is dead
WELCOME_TIMEOUT_S = 30.0
DEFAULT_HEARTBEAT_S = 15.0  # for a Welcome that names no interval
CLOSE_TIMEOUT_S = 2.0  # on SIGTERM, how long the managed side gets to end the call once the node closed its side
USAGE_POLL_S = 1.0  # how often an empty outbox is looked at again
DATABASE_RETRY_S = 5.0  # after a database error of the outbox or a snapshot apply
STATE_INTERVAL_S = 2.0
STATE_TTL_S = 10
# A snapshot carries every API key of the node's tenants: far more than gRPC's default 4 MiB may arrive.
MAX_RECEIVE_BYTES = 256 * 1024 * 1024
# Refusals that an operator must act on (upgrade a side, re-enrol): logged as errors, retried all the same.
OPERATOR_CODES = ("HYBRID_VERSION_SKEW", "NODE_CREDENTIAL_INVALID", "HYBRID_NOT_MANAGED")

CONNECTED = Gauge("scaigrid_link_connected", "1 while the link to the managed side is up")
HEARTBEAT_AGE = Gauge("scaigrid_link_last_heartbeat_age_seconds",
                      "seconds since the managed side last acknowledged a heartbeat (+Inf: never)")
CONFIG_VERSION = Gauge("scaigrid_link_config_version", "version of the applied config snapshot (0: none)")
OUTBOX_DEPTH = Gauge("scaigrid_link_outbox_depth", "usage records waiting for the managed side's ack")
TUNNEL_STREAMS = Gauge("scaigrid_link_tunnel_streams", "tunnelled requests in flight")
RECONNECTS = Counter("scaigrid_link_reconnects", "failed links and connection attempts, each followed by a retry")


class LinkFailure(Exception):
    """Why a session ended; `code` is the managed side's error code when it refused the link, and `needs_operator`
    says that retrying alone will not fix it."""

    def __init__(self, reason: str, code: str = "", needs_operator: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.code, self.needs_operator = reason, code, needs_operator


@dataclass
class NodeState:
    """What the link process publishes (Redis NODE_STATE_KEY, read by /health/detailed and the appliance)."""

    connected: bool
    node_id: str
    target: str
    last_heartbeat_unix: float | None
    config_version: int
    outbox_depth: int
    tunnels_in_flight: int
    last_error: str | None
    updated_unix: float


def backoff_cap_s(attempt: int, max_s: float) -> float:
    """The longest wait before retry number `attempt` (0-based); the wait itself is uniform below it."""
    return min(max_s, BACKOFF_BASE_S * 2.0 ** min(attempt, 32))


def _ended(status: grpc.StatusCode | None, details: str | None, trailing: Any) -> LinkFailure:
    """The failure of a call the managed side ended: a refusal names its error code in the trailing metadata."""
    code = next((str(value) for key, value in trailing or () if key == ERROR_CODE_KEY), "")
    # UNIMPLEMENTED: the target is a ScaiGrid that is not HYBRID_ROLE=managed, or no ScaiGrid at all.
    return LinkFailure(f"{code or (status.name if status else 'UNKNOWN')}: {details or 'no details'}", code,
                       code in OPERATOR_CODES or status == grpc.StatusCode.UNIMPLEMENTED)


async def local_models(engine: AsyncEngine) -> list[str]:
    """Slugs of the models the node serves itself: routed to at least one backend that is not the managed side."""
    query = (select(models.c.slug).distinct()
             .join(model_routes, model_routes.c.model_id == models.c.id)
             .join(backends, backends.c.id == model_routes.c.backend_id)
             .where(backends.c.provider != MANAGED).order_by(models.c.slug))
    async with engine.connect() as conn:
        return list((await conn.scalars(query)).all())


async def _close(call: Any) -> None:
    """Closes the node's side of the call, then waits for the managed side to end it."""
    with contextlib.suppress(Exception):
        await call.done_writing()
        await call.code()


class LinkClient:
    """Keeps the node's link up (run), publishes its state (publish_state), and drains it on SIGTERM (drain)."""

    def __init__(self, settings: Settings, engine: AsyncEngine, redis: "aioredis.Redis",
                 http: aiohttp.ClientSession) -> None:
        hybrid = settings.hybrid
        assert hybrid.link_target and hybrid.node_id and hybrid.node_credential  # the link mode requires them
        self._settings, self._engine, self._redis, self._http = settings, engine, redis, http
        self._target, self._node_id = hybrid.link_target, hybrid.node_id
        self._metadata = (("authorization", f"Bearer {hybrid.node_credential.reveal()}"),)
        self._stopping = asyncio.Event()
        self._changed = asyncio.Event()  # connected or disconnected: published at once, not at the next tick
        self._attempt = 0
        self._tunnels: NodeTunnels | None = None
        self.connected = False
        self.last_heartbeat_unix: float | None = None
        self.config: tuple[int, str] = (0, "")  # (version, sha256) of the applied snapshot
        self.outbox_depth = 0
        self.last_error: str | None = None

    # --- the reconnect loop ---

    async def run(self) -> None:
        """Holds a link until drain(): each failure is logged once, then retried after the backoff."""
        while not self._stopping.is_set():
            try:
                await self._session()
            except LinkFailure as exc:
                failure = exc
            except grpc.aio.AioRpcError as exc:
                failure = _ended(exc.code(), exc.details(), exc.trailing_metadata())
            except Exception as exc:  # whatever broke, the link is retried: it is this process's one purpose
                logger.exception("link session failed unexpectedly", extra={"event": "link_error"})
                failure = LinkFailure(f"{type(exc).__name__}: {exc}")
            if self._stopping.is_set():
                return
            self.last_error = failure.reason
            self._set_connected(False)
            RECONNECTS.inc()
            cap_s = backoff_cap_s(self._attempt, self._settings.hybrid.backoff_max_s)
            delay_s = random.uniform(0, cap_s)  # noqa: S311  # jitter spreads reconnects; it guards no secret
            self._attempt += 1
            level = logging.ERROR if failure.needs_operator else logging.WARNING
            logger.log(level, "link to %s failed: %s; retry %d in %.1f s", self._target, failure.reason,
                       self._attempt, delay_s, extra={
                           "event": "link_failed", "reason": failure.reason, "error_code": failure.code,
                           "attempt": self._attempt, "backoff_cap_s": cap_s, "retry_in_s": round(delay_s, 3)})
            # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation that arrives as the event is
            # set, and the loop then never ends (a link stop was seen cut at "stopping the state publisher").
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await self._stopping.wait()

    async def drain(self, grace_s: float) -> tuple[int, int]:
        """Stops reconnecting and taking tunnels; gives open tunnels grace_s to end. Returns (finished, cut)."""
        self._stopping.set()
        if self._tunnels is None:
            return 0, 0
        return await self._tunnels.finish(grace_s)

    # --- one session ---

    def _credentials(self) -> grpc.ChannelCredentials:
        ca_file = self._settings.hybrid.ca_file
        # Read at each attempt: a CA bundle replaced on disk is used without a restart.
        return grpc.ssl_channel_credentials(Path(ca_file).read_bytes() if ca_file else None)

    async def _hello(self) -> link_pb2.Hello:
        database, redis = await asyncio.gather(check_database(self._engine), check_redis(self._redis))
        slugs: list[str] = []
        if database == "ok":
            try:
                applied = await mirror.applied(self._engine)
                self.config = applied if applied is not None else (0, "")
                slugs = await local_models(self._engine)
            except Exception as exc:  # a hello with what is known beats no link: health says what is wrong
                logger.warning("hello without the database's view: %s", exc, extra={"event": "hello_degraded"})
                database = f"error: {type(exc).__name__}"
        return link_pb2.Hello(protocol_version=protocol.LINK_PROTOCOL_VERSION, software_version=__version__,
                              config_version=self.config[0], config_hash=self.config[1],
                              health={"database": database, "redis": redis}, models=slugs)

    async def _session(self) -> NoReturn:
        try:
            credentials = self._credentials()
        except OSError as exc:
            raise LinkFailure(f"HYBRID_CA_FILE: cannot read {self._settings.hybrid.ca_file} ({exc.strerror})") \
                from None
        hello = await self._hello()
        options = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]
        async with grpc.aio.secure_channel(self._target, credentials, options=options) as channel:
            call = link_pb2_grpc.HybridLinkStub(channel).Connect(metadata=self._metadata)
            try:
                await call.write(link_pb2.NodeMessage(hello=hello))
                welcome = await self._read(call, WELCOME_TIMEOUT_S, "Welcome")
                if welcome.WhichOneof("kind") != "welcome":
                    raise LinkFailure(f"protocol: the managed side answered Hello with {welcome.WhichOneof('kind')}")
                await self._linked(call, welcome.welcome)
            finally:
                if self._stopping.is_set():
                    # Closing our side lets the managed side end the call with OK ("the node closed its side")
                    # rather than see it cancelled. asyncio.wait, not wait_for: on its timeout wait_for would wait,
                    # unbounded, for a gRPC operation to take its cancellation; the cancel below ends the call anyway.
                    closing = asyncio.ensure_future(_close(call))
                    await asyncio.wait({closing}, timeout=CLOSE_TIMEOUT_S)
                    closing.cancel()
                call.cancel()

    async def _read(self, call: Any, timeout_s: float, expecting: str) -> link_pb2.ManagedMessage:
        try:
            message = await asyncio.wait_for(call.read(), timeout_s)
        except TimeoutError:
            raise LinkFailure(f"no {expecting} from the managed side in {timeout_s:g} s") from None
        if message is grpc.aio.EOF:
            # The status tells why the managed side ended the call (a refusal carries its error code).
            status = await call.code()
            if status != grpc.StatusCode.OK:
                raise _ended(status, await call.details(), await call.trailing_metadata())
            raise LinkFailure("the managed side ended the link")
        assert isinstance(message, link_pb2.ManagedMessage)
        return message

    async def _linked(self, call: Any, welcome: link_pb2.Welcome) -> NoReturn:
        """Runs the session's parts until one of them fails; tunnels are cut when it ends."""
        interval_s = float(welcome.heartbeat_interval_s or DEFAULT_HEARTBEAT_S)

        async def write(message: link_pb2.NodeMessage) -> None:
            try:
                await call.write(message)
            except asyncio.InvalidStateError:  # grpc's word for a call that ended without an error status
                raise LinkFailure("the managed side ended the link") from None

        sender = FairSender(write)
        tunnels = self._tunnels = NodeTunnels(self._settings, sender, self._http)
        tunnels.accepting = not self._stopping.is_set()
        snapshots: asyncio.Queue[link_pb2.ConfigSnapshot] = asyncio.Queue()
        usage_acks: asyncio.Queue[link_pb2.UsageAck] = asyncio.Queue()
        self._set_connected(True)
        logger.info("linked to %s as %s (managed side %s, heartbeat every %g s)", self._target, welcome.node_id,
                    welcome.software_version, interval_s, extra={
                        "event": "linked", "managed_version": welcome.software_version, "heartbeat_s": interval_s})
        parts: list[Coroutine[Any, Any, None]] = [
            sender.run(), self._heartbeats(sender, interval_s),
            self._receive(call, interval_s, tunnels, snapshots, usage_acks),
            self._apply_snapshots(sender, snapshots), self._send_usage(sender, usage_acks)]
        tasks = [asyncio.create_task(part) for part in parts]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # the failure that ended the session
            raise LinkFailure("a part of the link stopped")  # none of them ends without failing
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            cut = await tunnels.cancel_all()
            if cut:
                logger.warning("link lost: %d tunnel(s) cut", cut, extra={"event": "tunnels_cut", "cut": cut})

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        CONNECTED.set(connected)
        self._changed.set()
        if connected:
            self.last_error = None

    async def _receive(self, call: Any, interval_s: float, tunnels: NodeTunnels,
                       snapshots: "asyncio.Queue[link_pb2.ConfigSnapshot]",
                       usage_acks: "asyncio.Queue[link_pb2.UsageAck]") -> None:
        silence_s = SILENT_INTERVALS * interval_s
        linked_s = time.monotonic()
        while True:
            message = await self._read(call, silence_s, "message")
            kind = message.WhichOneof("kind")
            if kind == "heartbeat_ack":
                self.last_heartbeat_unix = time.time()
                # Backoff starts over once the link held a heartbeat interval: not at the first ack, which comes at
                # once, or a link the managed side ends right after Welcome (another node with this credential
                # replacing it, say) would be retried within 0.5 s for ever.
                if time.monotonic() - linked_s >= interval_s:
                    self._attempt = 0
            elif kind == "tunnel_request":
                tunnels.open(message.tunnel_request)
            elif kind == "tunnel_credit":
                tunnels.credit(message.tunnel_credit.tunnel_id, message.tunnel_credit.frames)
            elif kind == "tunnel_cancel":
                tunnels.cancel(message.tunnel_cancel.tunnel_id)
            elif kind == "config":
                snapshots.put_nowait(message.config)
            elif kind == "usage_ack":
                usage_acks.put_nowait(message.usage_ack)
            else:
                logger.warning("unexpected %s from the managed side ignored", kind, extra={"event": "link_unexpected"})

    async def _heartbeats(self, sender: FairSender, interval_s: float) -> None:
        """Beats from values kept in memory, so neither the database nor anything slow can delay a beat."""
        seq = 0
        while True:
            seq += 1
            tunnels = self._tunnels.in_flight if self._tunnels is not None else 0
            sender.send(link_pb2.NodeMessage(heartbeat=link_pb2.Heartbeat(
                seq=seq, outbox_depth=self.outbox_depth, tunnels_in_flight=tunnels, config_version=self.config[0])))
            await asyncio.sleep(interval_s)

    async def _apply_snapshots(self, sender: FairSender,
                               snapshots: "asyncio.Queue[link_pb2.ConfigSnapshot]") -> None:
        while True:
            pushed = await snapshots.get()
            while not snapshots.empty():  # only the newest matters
                pushed = snapshots.get_nowait()
            try:
                await mirror.apply(self._engine, self._node_id, pushed.version, pushed.body_json, pushed.sha256,
                                   redis=self._redis)
            except snapshot_schema.SnapshotRejected as exc:
                logger.error("config snapshot %d rejected, keeping version %d: %s", pushed.version, self.config[0],
                             exc, extra={"event": "config_rejected", "version": pushed.version})
                sender.send(link_pb2.NodeMessage(config_applied=link_pb2.ConfigApplied(
                    version=pushed.version, ok=False, error=str(exc))))
                continue
            except Exception as exc:  # the database, most likely: try again, unless a newer snapshot comes first
                logger.warning("config snapshot %d not applied yet: %s", pushed.version, exc,
                               extra={"event": "config_apply_failed", "version": pushed.version})
                await asyncio.sleep(DATABASE_RETRY_S)
                if snapshots.empty():
                    snapshots.put_nowait(pushed)
                continue
            self.config = (pushed.version, pushed.sha256)
            CONFIG_VERSION.set(pushed.version)
            logger.info("config snapshot %d applied", pushed.version,
                        extra={"event": "config_applied", "version": pushed.version})
            sender.send(link_pb2.NodeMessage(config_applied=link_pb2.ConfigApplied(version=pushed.version, ok=True)))

    async def _send_usage(self, sender: FairSender, usage_acks: "asyncio.Queue[link_pb2.UsageAck]") -> None:
        """One batch at a time, deleted from the outbox only once acked; after a reconnect, the same batch again.

        The ack is waited for as long as the link is up, however long: a stream loses no message, and the managed
        side keeps trying to store a batch while the link lasts (its database may be slow or away). Dropping the
        link instead would cut every tunnel on it; a dead link is noticed by its silence.
        """
        while True:
            try:
                batch = await outbox.next_batch(self._engine)
            except Exception as exc:  # the database: usage waits in the outbox, the link stays up
                logger.warning("usage outbox unreadable: %s", exc, extra={"event": "outbox_failed"})
                await asyncio.sleep(DATABASE_RETRY_S)
                continue
            if batch is None:
                await asyncio.sleep(USAGE_POLL_S)
                continue
            sender.send(link_pb2.NodeMessage(usage=link_pb2.UsageBatch(
                batch_id=batch.batch_id, records_json=batch.records_json)))
            while True:
                ack = await usage_acks.get()
                if ack.batch_id == batch.batch_id:
                    break
                logger.warning("UsageAck for batch %s, not the one sent (%s), ignored", ack.batch_id,
                               batch.batch_id, extra={"event": "usage_ack_unexpected"})
            while True:
                try:
                    await outbox.acknowledge(self._engine, batch)
                    break
                except Exception as exc:  # the rows stay until deleted; sending them again would double nothing
                    logger.warning("acked usage batch %s not deleted yet: %s", batch.batch_id, exc,
                                   extra={"event": "outbox_failed"})
                    await asyncio.sleep(DATABASE_RETRY_S)
            logger.info("usage batch %s acked: %d record(s), %d new", batch.batch_id, len(batch.records_json),
                        ack.stored, extra={"event": "usage_acked", "batch_id": batch.batch_id,
                                           "records": len(batch.records_json), "stored": ack.stored})

    # --- visible state ---

    def state(self) -> NodeState:
        return NodeState(
            connected=self.connected, node_id=self._node_id, target=self._target,
            last_heartbeat_unix=self.last_heartbeat_unix, config_version=self.config[0],
            outbox_depth=self.outbox_depth, tunnels_in_flight=self._tunnels.in_flight if self._tunnels else 0,
            last_error=self.last_error, updated_unix=time.time())

    async def publish_state(self) -> None:
        """Every STATE_INTERVAL_S and when the link goes up or down: reads the outbox depth, sets the metrics, writes
        the state to Redis (with a TTL, so a link process that died shows as not running)."""
        redis_failing = False
        while True:
            self._changed.clear()
            try:
                self.outbox_depth = await outbox.depth(self._engine)
                self.config = await mirror.applied(self._engine) or (0, "")
            except Exception as exc:  # the last known values stay; the database's health is reported elsewhere
                logger.debug("outbox and config unknown: %s", exc, extra={"event": "state_unknown"})
            state = self.state()
            CONNECTED.set(state.connected)
            HEARTBEAT_AGE.set(time.time() - state.last_heartbeat_unix if state.last_heartbeat_unix else float("inf"))
            CONFIG_VERSION.set(state.config_version)
            OUTBOX_DEPTH.set(state.outbox_depth)
            TUNNEL_STREAMS.set(state.tunnels_in_flight)
            try:
                await self._redis.set(protocol.NODE_STATE_KEY, json.dumps(asdict(state)), ex=STATE_TTL_S)
            except Exception as exc:  # logged when it starts failing, not every 2 s
                if not redis_failing:
                    logger.warning("link state not published: %s", exc, extra={"event": "state_unpublished"})
                redis_failing = True
            else:
                redis_failing = False
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: see run()
                async with asyncio.timeout(STATE_INTERVAL_S):
                    await self._changed.wait()

    async def forget_state(self) -> None:
        """A link process that stopped cleanly says so at once: no state is "link program not running"."""
        try:
            await self._redis.delete(protocol.NODE_STATE_KEY)
        except Exception as exc:  # the key expires anyway
            logger.warning("link state not removed: %s", exc, extra={"event": "state_unpublished"})
