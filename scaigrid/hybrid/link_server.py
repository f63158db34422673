"""The managed end of the hybrid link: HybridLink.Connect (one stream per node) and TunnelRelay.Open (tunnels on it).

A grpc replica holds the links nodes dialled to it (`HeldLinks`) and names itself their holder in the registry
(scaigrid/hybrid/registry.py), so that any http process can find the replica to relay a tunnelled request
through. Each link has one queue of messages to the node, written by whatever has something to say (heartbeat
acks, config snapshots, usage acks, tunnel requests, credit, cancels) and drained by the Connect stream, and one
reader that dispatches what the node sends. Frames of a tunnel go into that tunnel's own queue, never waited on
by the reader: a tunnel whose caller reads slowly only stops getting credit, so the node stops sending it, and
every other tunnel and the heartbeats go on. docs/hybrid.md, "The link protocol (managed side)".
"""

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from sqlalchemy import select, update
from sqlalchemy.dialects.mysql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

import scaigrid
from scaigrid import errors
from scaigrid.auth.service_tokens import HYBRID_RELAY
from scaigrid.clock import utc_now
from scaigrid.db.tables import hybrid_nodes, hybrid_relayed_requests
from scaigrid.errors import FieldError, ScaigridError
from scaigrid.hybrid import assertion, enrollment, outbox, protocol, registry, snapshot
from scaigrid.rpc.generated.scaigrid.hybrid.v1 import link_pb2, link_pb2_grpc
from scaigrid.rpc.interceptors import accepts, node_credential
from scaigrid.settings import Settings

logger = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0
MAX_MODELS = 256
MAX_VERSION_CHARS = 64  # hybrid_nodes.software_version
MAX_ID_CHARS = 40  # hybrid_relayed_requests.request_id and node_id
FORWARDED_HEADERS = ("content-type", "accept")
USAGE_RETRY_S = 5.0  # a batch that could not be stored is tried again while the link lasts, then acked
LINK_LOST = "LINK_LOST"

LINKS = Gauge("scaigrid_hybrid_links", "hybrid node links held by this grpc replica")
TUNNEL_STREAMS = Gauge("scaigrid_hybrid_tunnel_streams", "tunnelled requests open through this grpc replica")
USAGE_INGESTED = Counter("scaigrid_hybrid_usage_ingested", "usage records from nodes newly stored")


@dataclass
class Tunnel:
    window: int  # frames the node may have sent ahead of the credit this relay gave
    frames: "asyncio.Queue[link_pb2.TunnelFrame]" = field(default_factory=asyncio.Queue)


class Link:
    """One node's Connect stream on this replica."""

    def __init__(self, holder: registry.LinkHolder, pushed_sha256: str, assertion_key: bytes) -> None:
        self.holder = holder  # what the registry says of this link; rewritten on every heartbeat
        self.node_id = holder.node_id
        # Signs the caller assertions of this link's tunnels: derived from the credential the node linked with.
        self.assertion_key = assertion_key
        # Messages to the node, then None (the stream ends OK) or the error the stream ends with.
        self.outgoing: asyncio.Queue[link_pb2.ManagedMessage | ScaigridError | None] = asyncio.Queue()
        self.tunnels: dict[str, Tunnel] = {}
        self.last_heard_s = time.monotonic()
        self.pushed_sha256 = pushed_sha256  # of the last snapshot the node has or was sent
        self.closed = False
        self.end_reason = "the connection was lost or cancelled"
        self.tunnels_cut = 0

    def send(self, message: link_pb2.ManagedMessage) -> None:
        if not self.closed:
            self.outgoing.put_nowait(message)

    def close(self, reason: ScaigridError | None, why: str) -> None:
        """Ends the stream once what is queued is sent: with `reason`'s status, or OK when None. Its tunnels end at
        once: the stream may not end soon (sending to a node that stopped reading waits on flow control), and no
        frame of theirs can come any more from a link replaced, silent, revoked or stopping."""
        if not self.closed:
            self.closed, self.end_reason = True, why
            self.outgoing.put_nowait(reason)
            self.tunnels_cut += self.end_tunnels(f"the link to node {self.node_id} dropped ({why})")

    def end_tunnels(self, message: str) -> int:
        """Ends every open tunnel with LINK_LOST (after the frames already queued for it); how many there were."""
        ended = len(self.tunnels)
        for tunnel_id, tunnel in self.tunnels.items():
            tunnel.frames.put_nowait(_end_frame(tunnel_id, LINK_LOST, message))
        self.tunnels.clear()
        return ended


def _end_frame(tunnel_id: str, error_code: str, message: str) -> link_pb2.TunnelFrame:
    return link_pb2.TunnelFrame(tunnel_id=tunnel_id, end=link_pb2.TunnelEnd(error_code=error_code, message=message))


def _authorization(context: Any) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


def _protocol_error(message: str) -> ScaigridError:
    return errors.validation_error([FieldError("link", message)], "the node broke the link protocol")


class HeldLinks:
    """The links this replica holds, by node id, shared by the two servicers."""

    def __init__(self, engine: AsyncEngine, redis: "aioredis.Redis", settings: Settings) -> None:
        self.engine = engine
        self.redis = redis
        self.interval_s = settings.hybrid.heartbeat_interval_s
        self.ttl_s = registry.SILENT_INTERVALS * self.interval_s
        self.config_refresh_s = settings.hybrid.config_refresh_s
        server = settings.server
        self.replica = settings.hybrid.relay_address or f"{server.bind_host}:{server.grpc_port}"
        self.links: dict[str, Link] = {}
        self.stopping = False

    async def hold(self, node_id: str, hello: link_pb2.Hello, credential_hash: str) -> Link:
        """Claims the node's link for this replica; a link of the node held before (here or elsewhere) ends."""
        now_s = time.time()
        link = Link(registry.LinkHolder(
            node_id=node_id, replica=self.replica, session=secrets.token_hex(12), connected_since_unix=now_s,
            last_heartbeat_unix=now_s, software_version=hello.software_version, config_version=hello.config_version,
            outbox_depth=0, tunnels_in_flight=0, models=tuple(hello.models)), hello.config_hash,
            assertion.signing_key(credential_hash))
        await registry.claim(self.redis, link.holder, self.ttl_s)
        older = self.links.get(node_id)
        if older is not None:
            older.close(errors.link_lost("a newer link of this node replaced this one"), "replaced by a newer link")
        self.links[node_id] = link
        LINKS.inc()
        return link

    async def let_go(self, link: Link) -> int:
        """Forgets an ended link: its tunnels end with LINK_LOST, its registry entry goes; how many tunnels it cut."""
        cut = link.tunnels_cut + link.end_tunnels(f"the link to node {link.node_id} dropped ({link.end_reason})")
        if self.links.get(link.node_id) is link:
            del self.links[link.node_id]
        LINKS.dec()
        try:
            await registry.release(self.redis, link.node_id, link.holder.session)
        except Exception:  # the entry then expires on its own within its TTL
            logger.warning("could not release node %s's registry entry", link.node_id, exc_info=True,
                           extra={"event": "hybrid_registry_failed", "node_id": link.node_id})
        return cut

    def close_all(self) -> tuple[int, int]:
        """Ends every link (the replica is stopping) and refuses new ones: (links, tunnels cut)."""
        self.stopping = True
        tunnels = sum(len(link.tunnels) for link in self.links.values())
        for link in self.links.values():
            link.close(errors.link_lost("this managed grpc replica is stopping; link again (another replica will "
                                        "take the link)"), "the replica is stopping")
        return len(self.links), tunnels


class HybridLinkServicer(link_pb2_grpc.HybridLinkServicer):
    """HybridLink.Connect: the node's credential and Hello checked, then the link served until either side ends it."""

    def __init__(self, held: HeldLinks) -> None:
        self._held = held

    @node_credential
    async def Connect(self, requests: AsyncIterator[link_pb2.NodeMessage],
                      context: Any) -> AsyncIterator[link_pb2.ManagedMessage]:
        held = self._held
        node_id = None
        try:
            first = await _first_message(requests)
            node_id, credential_hash = await self._authenticate(context)
            hello = _hello(first)
            problem = protocol.skew_problem(hello.protocol_version, hello.software_version, scaigrid.__version__)
            if problem is not None:
                raise errors.hybrid_version_skew(problem)
            if held.stopping:
                raise errors.link_lost("this managed grpc replica is stopping; link again")
            async with held.engine.begin() as conn:
                await conn.execute(update(hybrid_nodes).where(hybrid_nodes.c.id == node_id).values(
                    software_version=hello.software_version))
            link = await held.hold(node_id, hello, credential_hash)
        except ScaigridError as exc:
            logger.warning("hybrid link refused (%s): %s", exc.code, exc.message,
                           extra={"event": "hybrid_link_refused", "node_id": node_id, "code": exc.code,
                                  "peer": context.peer()})
            raise
        logger.info("hybrid node %s linked (software %s, protocol %d, config version %d)", node_id,
                    hello.software_version, hello.protocol_version, hello.config_version,
                    extra={"event": "hybrid_link_connected", "node_id": node_id,
                           "software_version": hello.software_version, "peer": context.peer()})
        tasks: list[asyncio.Task[None]] = []
        try:
            yield link_pb2.ManagedMessage(welcome=link_pb2.Welcome(
                node_id=node_id, software_version=scaigrid.__version__,
                protocol_version=protocol.LINK_PROTOCOL_VERSION, heartbeat_interval_s=held.interval_s))
            tasks = [asyncio.create_task(self._guarded(link, work)) for work in (
                self._read(link, requests), self._push_config(link), self._watch(link))]
            while (message := await link.outgoing.get()) is not None:
                if isinstance(message, ScaigridError):
                    raise message
                yield message
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            cut = await held.let_go(link)
            logger.info("hybrid node %s unlinked: %s (%d tunnel(s) cut)", node_id, link.end_reason, cut,
                        extra={"event": "hybrid_link_disconnected", "node_id": node_id, "tunnels_cut": cut})

    async def _authenticate(self, context: Any) -> tuple[str, str]:
        """The node's id and the hash of the credential it linked with (after the switch, if it was pending)."""
        async with self._held.engine.begin() as conn:  # promotes a rotated-in credential on its first use
            row = await enrollment.authenticate(conn, _authorization(context))
        return str(row["id"]), str(row["credential_hash"])

    async def _guarded(self, link: Link, work: Coroutine[Any, Any, None]) -> None:
        """Runs one of the link's tasks; if it fails, the link ends with its error."""
        try:
            await work
        except ScaigridError as exc:
            link.close(exc, exc.message)
        except Exception as exc:
            logger.error("hybrid link of node %s failed", link.node_id, exc_info=exc,
                         extra={"event": "hybrid_link_failed", "node_id": link.node_id})
            link.close(ScaigridError("internal error; the grpc mode's log has the details"), "internal error")

    async def _read(self, link: Link, requests: AsyncIterator[link_pb2.NodeMessage]) -> None:
        usage_tasks: set[asyncio.Task[None]] = set()
        try:
            async for message in requests:
                link.last_heard_s = time.monotonic()
                kind = message.WhichOneof("kind")
                if kind == "heartbeat":
                    await self._heartbeat(link, message.heartbeat)
                elif kind == "tunnel":
                    self._frame(link, message.tunnel)
                elif kind == "usage":
                    # A task: storing a batch must not hold up the frames and heartbeats behind it.
                    task = asyncio.create_task(self._ingest(link, message.usage))
                    usage_tasks.add(task)
                    task.add_done_callback(usage_tasks.discard)
                elif kind == "config_applied":
                    await self._config_applied(link, message.config_applied)
                else:
                    raise _protocol_error(f"unexpected {kind or 'empty'} message after Hello")
            link.close(None, "the node closed the link")
        finally:
            for task in usage_tasks:
                task.cancel()

    async def _heartbeat(self, link: Link, beat: link_pb2.Heartbeat) -> None:
        link.send(link_pb2.ManagedMessage(heartbeat_ack=link_pb2.HeartbeatAck(seq=beat.seq)))
        link.holder = replace(link.holder, last_heartbeat_unix=time.time(), outbox_depth=beat.outbox_depth,
                              tunnels_in_flight=beat.tunnels_in_flight, config_version=beat.config_version)
        await self._refresh(link)

    async def _refresh(self, link: Link) -> None:
        try:
            still_ours = await registry.refresh(self._held.redis, link.holder, self._held.ttl_s)
        except Exception:  # Redis away: the link goes on; tunnels find it again once the entry is rewritten
            logger.warning("could not refresh node %s's registry entry", link.node_id, exc_info=True,
                           extra={"event": "hybrid_registry_failed", "node_id": link.node_id})
            return
        if not still_ours:
            link.close(errors.link_lost("a newer link of this node (on another replica) replaced this one"),
                       "replaced by a newer link on another replica")

    def _frame(self, link: Link, frame: link_pb2.TunnelFrame) -> None:
        tunnel = link.tunnels.get(frame.tunnel_id)
        if tunnel is None:
            return  # a frame already on its way when the tunnel was cancelled
        # The end frame needs no credit. Past the credit, the node broke the protocol: the tunnel ends, and the
        # queue stays bounded whatever the node sends.
        if frame.WhichOneof("kind") != "end" and tunnel.frames.qsize() >= tunnel.window:
            del link.tunnels[frame.tunnel_id]
            link.send(link_pb2.ManagedMessage(tunnel_cancel=link_pb2.TunnelCancel(tunnel_id=frame.tunnel_id)))
            logger.warning("node %s sent more than its credit on tunnel %s", link.node_id, frame.tunnel_id,
                           extra={"event": "hybrid_tunnel_overrun", "node_id": link.node_id})
            frame = _end_frame(frame.tunnel_id, "BACKEND_ERROR", "the node sent more frames than its credit")
        tunnel.frames.put_nowait(frame)

    async def _ingest(self, link: Link, batch: link_pb2.UsageBatch) -> None:
        while True:
            try:
                stored = await outbox.ingest(self._held.engine, link.node_id, list(batch.records_json))
                break
            except Exception:
                logger.error("could not store usage batch %s of node %s; trying again in %g s", batch.batch_id,
                             link.node_id, USAGE_RETRY_S, exc_info=True,
                             extra={"event": "hybrid_usage_failed", "node_id": link.node_id})
                await asyncio.sleep(USAGE_RETRY_S)
        USAGE_INGESTED.inc(stored)
        link.send(link_pb2.ManagedMessage(usage_ack=link_pb2.UsageAck(batch_id=batch.batch_id, stored=stored)))
        logger.debug("usage batch %s of node %s: %d record(s) new of %d", batch.batch_id, link.node_id, stored,
                     len(batch.records_json), extra={"event": "hybrid_usage_ingested", "node_id": link.node_id})

    async def _config_applied(self, link: Link, applied: link_pb2.ConfigApplied) -> None:
        if not applied.ok:
            logger.warning("node %s rejected config snapshot %d: %s", link.node_id, applied.version, applied.error,
                           extra={"event": "hybrid_config_rejected", "node_id": link.node_id,
                                  "config_version": applied.version})
            return
        logger.info("node %s applied config snapshot %d", link.node_id, applied.version,
                    extra={"event": "hybrid_config_applied", "node_id": link.node_id,
                           "config_version": applied.version})
        link.holder = replace(link.holder, config_version=applied.version)
        await self._refresh(link)

    async def _push_config(self, link: Link) -> None:
        """Sends the node's snapshot whenever it changes, and drops the link once the node is revoked."""
        engine = self._held.engine
        while True:
            try:
                async with engine.connect() as conn:
                    live = await conn.scalar(select(hybrid_nodes.c.id).where(
                        hybrid_nodes.c.id == link.node_id, hybrid_nodes.c.revoked_at.is_(None)))
                if live is None:
                    link.close(errors.node_credential_invalid(), "the node was revoked")
                    return
                current = await snapshot.current(engine, link.node_id)
            except Exception:  # the database away: the node keeps what it has; try again next round
                logger.warning("could not compute node %s's config snapshot", link.node_id, exc_info=True,
                               extra={"event": "hybrid_snapshot_failed", "node_id": link.node_id})
            else:
                if current.sha256 != link.pushed_sha256:
                    link.send(link_pb2.ManagedMessage(config=link_pb2.ConfigSnapshot(
                        version=current.version, body_json=current.body_json, sha256=current.sha256)))
                    link.pushed_sha256 = current.sha256
                    logger.info("config snapshot %d sent to node %s", current.version, link.node_id,
                                extra={"event": "hybrid_config_sent", "node_id": link.node_id,
                                       "config_version": current.version})
            await asyncio.sleep(self._held.config_refresh_s)

    async def _watch(self, link: Link) -> None:
        silent_limit_s = registry.SILENT_INTERVALS * self._held.interval_s
        while True:
            await asyncio.sleep(self._held.interval_s)
            if time.monotonic() - link.last_heard_s > silent_limit_s:
                link.close(errors.link_lost(f"no message from the node for {silent_limit_s:g} s"),
                           f"silent for {silent_limit_s:g} s")
                return


class NotManagedLinkServicer(link_pb2_grpc.HybridLinkServicer):
    """HybridLink.Connect where HYBRID_ROLE is not `managed`: a node pointed here is told so by name
    (HYBRID_NOT_MANAGED, as the /v1/hybrid/ routes answer), not with gRPC's bare "Method not found"."""

    @node_credential
    async def Connect(self, requests: AsyncIterator[link_pb2.NodeMessage],
                      context: Any) -> AsyncIterator[link_pb2.ManagedMessage]:
        await _first_message(requests)
        raise errors.hybrid_not_managed()
        yield  # an async generator, as the streaming method must be


async def _first_message(requests: AsyncIterator[link_pb2.NodeMessage]) -> link_pb2.NodeMessage | None:
    """The node's first message, read before the call is answered or refused: a refusal sent while the node is still
    writing its Hello reaches the node as INTERNAL instead of the refusal's code (grpc/grpc#36066)."""
    try:
        return await asyncio.wait_for(anext(requests), HELLO_TIMEOUT_S)
    except (TimeoutError, StopAsyncIteration):
        return None


def _hello(first: link_pb2.NodeMessage | None) -> link_pb2.Hello:
    if first is None or first.WhichOneof("kind") != "hello":
        raise _protocol_error(f"the node's first message must be Hello, within {HELLO_TIMEOUT_S:g} s")
    hello: link_pb2.Hello = first.hello
    if len(hello.software_version) > MAX_VERSION_CHARS:
        raise _protocol_error(f"software_version: at most {MAX_VERSION_CHARS} characters")
    if len(hello.models) > MAX_MODELS:
        raise _protocol_error(f"models: at most {MAX_MODELS}")
    return hello


class TunnelRelayServicer(link_pb2_grpc.TunnelRelayServicer):
    """TunnelRelay.Open: one request down the link of a node this replica holds, its frames streamed back."""

    def __init__(self, held: HeldLinks) -> None:
        self._held = held

    # Only the managed http processes: a ScaiInfer node's token must not reach hybrid nodes through it.
    @accepts(HYBRID_RELAY)
    async def Open(self, request: link_pb2.TunnelRequest, context: Any) -> AsyncIterator[link_pb2.TunnelFrame]:
        for name in ("tunnel_id", "node_id"):
            if not 0 < len(getattr(request, name)) <= MAX_ID_CHARS:
                raise errors.validation_error([FieldError(name, f"required: at most {MAX_ID_CHARS} characters")])
        caller = request.caller
        if not (caller.tenant_id and caller.partner_id and caller.user_id and caller.role):
            raise errors.validation_error([FieldError("caller", "required: the tenant, partner, user and role of "
                                                                "the request")])
        # Remembered before the node can learn the id: a usage record a node reports under it is refused. Failing
        # over between two backends of one node relays the same id again.
        async with self._held.engine.begin() as conn:
            statement = insert(hybrid_relayed_requests).values(
                request_id=request.tunnel_id, node_id=request.node_id, created_at=utc_now())
            await conn.execute(statement.on_duplicate_key_update(request_id=statement.inserted.request_id))
        link = self._held.links.get(request.node_id)
        if link is None or link.closed:
            raise errors.link_lost(f"node {request.node_id!r} has no link to this grpc replica "
                                   f"({self._held.replica}); look up the replica holding it again")
        if request.tunnel_id in link.tunnels:
            raise errors.validation_error([FieldError("tunnel_id", "a tunnel with this id is open already")])
        window = request.credit or protocol.TUNNEL_WINDOW
        tunnel = link.tunnels[request.tunnel_id] = Tunnel(window)
        signed = assertion.sign(link.assertion_key, assertion.Caller(
            node_id=link.node_id, request_id=request.tunnel_id, tenant_id=caller.tenant_id,
            partner_id=caller.partner_id, user_id=caller.user_id, api_key_id=caller.api_key_id or None,
            role=caller.role))
        # Only what the node needs goes down the link: never a header the caller could carry a credential in.
        forwarded = link_pb2.TunnelRequest(
            tunnel_id=request.tunnel_id, node_id=link.node_id, method=request.method, path=request.path,
            headers={name: value for name, value in request.headers.items() if name.lower() in FORWARDED_HEADERS},
            body=request.body, credit=window, assertion=signed)
        link.send(link_pb2.ManagedMessage(tunnel_request=forwarded))
        TUNNEL_STREAMS.inc()
        ended, taken = False, 0
        try:
            while not ended:
                frame = await tunnel.frames.get()
                ended = frame.WhichOneof("kind") == "end"
                yield frame  # returns once gRPC took the frame: credit follows what the caller consumes
                taken += 1
                if not ended and taken >= max(1, window // 2):
                    link.send(link_pb2.ManagedMessage(tunnel_credit=link_pb2.TunnelCredit(
                        tunnel_id=request.tunnel_id, frames=taken)))
                    taken = 0
        finally:
            TUNNEL_STREAMS.dec()
            if link.tunnels.get(request.tunnel_id) is tunnel:
                del link.tunnels[request.tunnel_id]
                if not ended:  # the caller went away: the node stops the request
                    link.send(link_pb2.ManagedMessage(tunnel_cancel=link_pb2.TunnelCancel(
                        tunnel_id=request.tunnel_id)))

