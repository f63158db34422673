"""The hybrid link's two backend providers: `hybrid` (a node's model, reached through the tunnel) and `managed`.

`hybrid`, on the managed side: a backend names a node and the node's model ("<hn_id>/<model>"). It is available
while some grpc replica holds the node's link (scaigrid.hybrid.registry, reread every second), and a request is one
TunnelRelay.Open call to that replica, which carries it down the link; the node runs it through its own pipeline
(its auth, limits, routing and accounting) and its OpenAI answer comes back as frames: a head (status and
headers), the answer's bytes, and an end. The answer is then relayed, counted and failed over exactly like an HTTP
backend's: the head's status maps as an HTTP status does (transport.status_failure).

`managed`, on a node: the managed gateway's /oai/v1/ API over HTTPS (HYBRID_MANAGED_URL, trusting HYBRID_CA_FILE),
that is an HttpTransport with its own session, with the client's own Authorization header (a managed API key is
valid on both sides: the node mirrors the keys of its tenants from the config snapshots). `hybrid` never sends the
client's credential down the link, which ends on a customer-operated node: it names the caller (tenant, user, key,
role), and the relay signs that into an assertion for this request and node (scaigrid/hybrid/assertion.py). Either
way the side that serves a request authenticates, limits and accounts for it as its own. A 401 or 403 from the
other side therefore means "this client may not use it there", not "the backend is broken": it is passed back as a
refusal, and one client the node does not know cannot trip the breaker for everyone.
"""

import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import grpc
import redis.asyncio as aioredis
from aiohttp import web

from scaigrid.appkeys import PRINCIPAL, REQUEST_ID
from scaigrid.auth import service_tokens
from scaigrid.dispatch.failures import Failure, FailureKind
from scaigrid.dispatch.transport import (
    ERROR_BODY_MAX_BYTES,
    MEDIA,
    REFUSED_STATUSES,
    HttpTransport,
    check_event_stream,
    status_failure,
    upstream_body,
)
from scaigrid.hybrid import protocol, registry
from scaigrid.nodes.directory import ChannelDirectory
from scaigrid.routing.catalogue import Backend
from scaigrid.rpc.generated.scaigrid.hybrid.v1 import link_pb2, link_pb2_grpc
from scaigrid.settings import ConfigError, Settings

logger = logging.getLogger(__name__)

RELAY_TOKEN_TTL_S = 3600  # minted again when half of it is left, so no call carries a token about to expire
DIRECTORY_REFRESH_S = 1.0  # a link that moves to another replica is followed within a second
CHAT_PATH, EMBEDDINGS_PATH = "/oai/v1/chat/completions", "/oai/v1/embeddings"
# The other side answers with the client's credential: a refusal of it is about the client (see the docstring).
FORWARDED_REFUSED_STATUSES = REFUSED_STATUSES | {401, 403}
# The relay's own status codes: UNAVAILABLE (the replica is gone) and NOT_FOUND (it no longer holds the link) fail
# over like a refused connection; anything else is a failing backend.
RELAY_FAILURE_KINDS: dict[grpc.StatusCode, FailureKind] = {
    grpc.StatusCode.UNAVAILABLE: "connect", grpc.StatusCode.NOT_FOUND: "connect",
    grpc.StatusCode.DEADLINE_EXCEEDED: "timeout"}


def relay_failure(exc: grpc.aio.AioRpcError) -> Failure:
    code = exc.code()
    name = code.name if code is not None else "UNKNOWN"
    kind = RELAY_FAILURE_KINDS.get(code, "status")
    return Failure(kind, f"tunnel relay: gRPC {name}: {(exc.details() or '')[:300]}", public=f"tunnel relay {name}")


class LinkDirectory(ChannelDirectory):
    """The http process's view of which grpc replica holds each node's link (scaigrid/nodes/directory.py), and a
    channel to each replica that holds one the catalogue routes to."""

    def __init__(self, redis: "aioredis.Redis", settings: Settings) -> None:
        super().__init__("link", DIRECTORY_REFRESH_S, settings.dispatch.stream_timeout_s)
        self._redis = redis
        # A link whose holder has not refreshed it for this long is gone (its key's TTL, were Redis unreachable).
        self._silent_after_s = registry.SILENT_INTERVALS * settings.hybrid.heartbeat_interval_s
        self._links: dict[str, registry.LinkHolder] = {}

    def holder(self, node_id: str, now_s: float) -> registry.LinkHolder | None:
        """The node's link, unless no replica holds it."""
        link = self._links.get(node_id)
        if link is None or now_s - link.last_heartbeat_unix > self._silent_after_s:
            return None
        return link

    async def refresh(self) -> None:
        self._links = await registry.holders(self._redis)
        self.keep_channels(link.replica for link in self._links.values())


class TunnelStream:
    """One TunnelRelay.Open call: the node's head, then its answer's bytes; errors raise Failure."""

    __slots__ = ("_call", "_ended")

    def __init__(self, call: Any) -> None:
        self._call = call
        self._ended = False

    async def _frame(self) -> link_pb2.TunnelFrame:
        try:
            frame = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            self._ended = True
            raise relay_failure(exc) from None
        if frame is grpc.aio.EOF:
            self._ended = True
            raise Failure("cut", "the relay ended the tunnel without its end frame", public="stream cut")
        assert isinstance(frame, link_pb2.TunnelFrame)
        if frame.WhichOneof("kind") == "end":
            self._ended = True
            if frame.end.error_code:
                raise Failure("cut", f"the tunnel ended with {frame.end.error_code}: {frame.end.message[:300]}",
                              public="stream cut")
        return frame

    async def head(self, streamed: bool) -> None:
        """Reads the head; raises the Failure an HTTP answer with that status and content type would."""
        frame = await self._frame()
        if frame.WhichOneof("kind") != "head":
            raise Failure("shape", "the tunnel's first frame is not its head")
        headers = {name.lower(): value for name, value in frame.head.headers.items()}
        if frame.head.status != 200:
            body = b""
            while len(body) < ERROR_BODY_MAX_BYTES and (data := await self.read()):
                body += data
            raise status_failure(frame.head.status, headers.get("retry-after"), body[:ERROR_BODY_MAX_BYTES],
                                 FORWARDED_REFUSED_STATUSES, for_client=True)
        if streamed:
            check_event_stream(headers.get("content-type", ""))

    async def read(self) -> bytes:
        """The answer's next bytes; b"" once the node has sent all of it."""
        while not self._ended:
            frame = await self._frame()
            kind = frame.WhichOneof("kind")
            if kind == "data":
                if frame.data:
                    return frame.data
            elif kind != "end":
                raise Failure("shape", f"a {kind} frame in the middle of the tunnel's answer")
        return b""

    def close(self) -> None:
        """Cancels the call unless it ended: the relay cancels the tunnel, and the node's backend sees us go."""
        if not self._ended:
            self._call.cancel()


class HybridTransport:
    """Backends of provider `hybrid`: the node's own pipeline serves whatever a chat or embeddings request needs."""

    lacks: Mapping[str, str] = {MEDIA: "the hybrid link carries chat and embeddings only, and every backend of this "
                                       "model is a linked node"}

    def __init__(self, settings: Settings, directory: LinkDirectory) -> None:
        self.directory = directory
        self._secret = settings.auth.service_token_secret
        self._token = ""
        self._token_renew_at_s = 0.0

    def available(self, backend: Backend, now_s: float) -> bool:
        assert backend.node_id is not None
        return self.directory.holder(backend.node_id, now_s) is not None

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self._secret is None:
            raise Failure("status", "SERVICE_TOKEN_SECRET is not set: this gateway cannot call the tunnel relay",
                          public="not configured")
        now_s = time.time()
        if now_s >= self._token_renew_at_s:
            self._token = service_tokens.mint(self._secret, protocol.RELAY_SERVICE_NAME, RELAY_TOKEN_TTL_S, now_s,
                                              scope=service_tokens.HYBRID_RELAY)
            self._token_renew_at_s = now_s + RELAY_TOKEN_TTL_S / 2
        return (("authorization", f"Bearer {self._token}"),)

    async def _tunnel(self, backend: Backend, payload: dict[str, Any], request: web.Request, streamed: bool,
                      path: str) -> TunnelStream:
        assert backend.node_id is not None
        link = self.directory.holder(backend.node_id, time.time())
        if link is None:
            raise Failure("connect", f"no replica holds the link of node {backend.node_id}",
                          public=f"the link to node {backend.node_id} is down")
        principal = request[PRINCIPAL]
        # Who the caller is, never their credential: the relay signs it into an assertion only this node verifies.
        caller = link_pb2.Caller(tenant_id=principal.tenant_id, partner_id=principal.partner_id,
                                 user_id=principal.user_id or "", api_key_id=principal.api_key_id or "",
                                 role=principal.role)
        tunnel = link_pb2.TunnelRequest(
            tunnel_id=request[REQUEST_ID], node_id=backend.node_id, method="POST", path=path,
            headers={"content-type": "application/json"}, body=upstream_body(payload, backend.node_model),
            credit=protocol.TUNNEL_WINDOW, caller=caller)
        call = link_pb2_grpc.TunnelRelayStub(self.directory.channel(link.replica)).Open(
            tunnel, metadata=self._metadata())
        stream = TunnelStream(call)
        try:
            await stream.head(streamed)
        except BaseException:
            stream.close()
            raise
        return stream

    async def open(self, backend: Backend, payload: dict[str, Any], request: web.Request) -> TunnelStream:
        return await self._tunnel(backend, payload, request, True, CHAT_PATH)

    async def fetch(self, backend: Backend, payload: dict[str, Any], request: web.Request, embeddings: bool) -> bytes:
        stream = await self._tunnel(backend, payload, request, False, EMBEDDINGS_PATH if embeddings else CHAT_PATH)
        try:
            parts = []
            while data := await stream.read():
                parts.append(data)
            return b"".join(parts)
        finally:
            stream.close()


class ManagedTransport(HttpTransport):
    """Backends of provider `managed` (on a node): the managed gateway's OpenAI API, with the client's own key.

    The catalogue points their URLs at HYBRID_MANAGED_URL + /oai/v1; without that setting none is available.
    """

    refused_statuses = FORWARDED_REFUSED_STATUSES
    answers_client = True
    lacks: Mapping[str, str] = {MEDIA: "this node relays chat and embeddings to the managed gateway, not images or "
                                       "audio, and every backend of this model is the managed gateway"}

    def __init__(self, session: aiohttp.ClientSession, settings: Settings) -> None:
        super().__init__(session)
        self._configured = settings.hybrid.managed_url is not None

    def available(self, backend: Backend, now_s: float) -> bool:
        return self._configured

    def headers(self, backend: Backend, request: web.Request) -> Mapping[str, str]:
        return {**backend.headers, "Authorization": request.headers.get("Authorization", ""),
                protocol.NODE_REQUEST_ID_HEADER: request[REQUEST_ID]}


@contextlib.asynccontextmanager
async def managed_session(settings: Settings, client_timeout: aiohttp.ClientTimeout
                          ) -> AsyncIterator[aiohttp.ClientSession]:
    """The ClientSession of `managed` backends: TLS trusting HYBRID_CA_FILE (or the system's CAs) and nothing else."""
    try:
        context = ssl.create_default_context(cafile=settings.hybrid.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"HYBRID_CA_FILE: cannot load {settings.hybrid.ca_file}: {exc}") from None
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, ssl=context)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        yield session
