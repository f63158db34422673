"""The node's end of tunnelled requests: each runs against the node's own http process, its answer goes back up the
link as frames, never beyond the credit the managed side grants, sharing the link fairly with every other tunnel."""

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from scaigrid.auth import service_tokens
from scaigrid.hybrid import protocol
from scaigrid.hybrid.assertion import ASSERTION_HEADER
from scaigrid.lifecycle import finish_within
from scaigrid.rpc.generated.scaigrid.hybrid.v1 import link_pb2
from scaigrid.settings import Settings

logger = logging.getLogger(__name__)

ALLOWED_PATH_PREFIXES = ("/oai/v1/", "/v1/inference/")
FRAME_MAX_BYTES = 64 * 1024
# Frames a tunnel may have waiting for the link: beyond it the tunnel stops reading its local answer, so a tunnel
# without credit holds back its own request (TCP pushes back to the node's http process) and nothing else.
QUEUED_FRAMES_MAX = 8
LOCAL_CONNECT_TIMEOUT_S = 5.0
TUNNEL_TOKEN_TTL_S = 60  # checked once, when the node's http process receives the request
# The only headers of a TunnelRequest the node passes on: the caller is named by the assertion, and an
# `authorization` header (which the managed side never sends) is not taken from the link.
FORWARDED_REQUEST_HEADERS = frozenset({"content-type", "accept"})
RETURNED_HEADERS = ("content-type", "retry-after")
RETURNED_HEADER_PREFIX = "x-scaigrid-ratelimit-"

# TunnelEnd.error_code of a tunnel the node could not complete ("" = complete, whatever the status in its head).
PATH_NOT_ALLOWED = "TUNNEL_PATH_NOT_ALLOWED"  # not an inference path: nothing was run
NODE_HTTP_UNAVAILABLE = "NODE_HTTP_UNAVAILABLE"  # the node's http process did not answer: nothing was run
NODE_HTTP_CUT = "NODE_HTTP_CUT"  # the node's answer broke off after its head
NODE_STOPPING = "NODE_STOPPING"  # the link process is stopping and takes no new tunnel

Write = Callable[[link_pb2.NodeMessage], Awaitable[None]]


@dataclass
class _Outbound:
    """One tunnel's frames waiting for the link, and what it may still send."""

    credit: int
    frames: deque[link_pb2.TunnelFrame] = field(default_factory=deque)
    space: asyncio.Event = field(default_factory=asyncio.Event)
    empty: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.space.set()
        self.empty.set()


class FairSender:
    """The one writer of the link's stream: control messages (heartbeats, acks, usage) first, then one frame of each
    tunnel that has credit, in turn, so a busy or stalled tunnel never holds back the others or a heartbeat."""

    def __init__(self, write: Write) -> None:
        self._write = write
        self._control: deque[link_pb2.NodeMessage] = deque()
        self._tunnels: dict[str, _Outbound] = {}
        self._turns: deque[str] = deque()  # round-robin order of the open tunnels
        self._wake = asyncio.Event()

    def send(self, message: link_pb2.NodeMessage) -> None:
        """Queues a control message; it goes before any tunnel frame still waiting."""
        self._control.append(message)
        self._wake.set()

    def open(self, tunnel_id: str, credit: int) -> None:
        self._tunnels[tunnel_id] = _Outbound(credit)
        self._turns.append(tunnel_id)

    def close(self, tunnel_id: str) -> None:
        """Forgets the tunnel and whatever it had not sent yet."""
        if self._tunnels.pop(tunnel_id, None) is not None:
            self._turns.remove(tunnel_id)

    def credit(self, tunnel_id: str, frames: int) -> None:
        outbound = self._tunnels.get(tunnel_id)
        if outbound is not None:  # credit for a tunnel that has ended meanwhile is nothing to act on
            outbound.credit += frames
            self._wake.set()

    async def put(self, tunnel_id: str, frame: link_pb2.TunnelFrame) -> None:
        """Queues a frame of the tunnel, waiting while too many of its frames wait already."""
        outbound = self._tunnels[tunnel_id]
        await outbound.space.wait()
        outbound.frames.append(frame)
        outbound.empty.clear()
        if len(outbound.frames) >= QUEUED_FRAMES_MAX:
            outbound.space.clear()
        self._wake.set()

    async def flushed(self, tunnel_id: str) -> None:
        """Returns once every frame queued for the tunnel went onto the link."""
        outbound = self._tunnels.get(tunnel_id)
        if outbound is not None:
            await outbound.empty.wait()

    def _next(self) -> link_pb2.NodeMessage | None:
        if self._control:
            return self._control.popleft()
        for _ in range(len(self._turns)):
            tunnel_id = self._turns[0]
            self._turns.rotate(-1)
            outbound = self._tunnels[tunnel_id]
            if not outbound.frames:
                continue
            # The end frame needs no credit (the managed side always has room for it), so a tunnel ends at once.
            is_end = outbound.frames[0].WhichOneof("kind") == "end"
            if not is_end and outbound.credit <= 0:
                continue
            outbound.credit -= 0 if is_end else 1
            frame = outbound.frames.popleft()
            outbound.space.set()
            if not outbound.frames:
                outbound.empty.set()
            return link_pb2.NodeMessage(tunnel=frame)
        return None

    async def run(self) -> None:
        """Writes until cancelled; a failed write (the stream broke) raises."""
        while True:
            message = self._next()
            if message is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._write(message)


def local_base_urls(settings: Settings) -> list[str]:
    """The node's own http processes, as the link process on the same host reaches them."""
    host = settings.server.bind_host
    # A wildcard bind listens on loopback too; a wildcard is no address to connect to.
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
    return [f"http://{host}:{port}" for port in settings.hybrid.tunnel_http_ports or (settings.server.http_port,)]


def _head(tunnel_id: str, response: aiohttp.ClientResponse) -> link_pb2.TunnelFrame:
    headers = {name.lower(): value for name, value in response.headers.items()
               if name.lower() in RETURNED_HEADERS or name.lower().startswith(RETURNED_HEADER_PREFIX)}
    return link_pb2.TunnelFrame(tunnel_id=tunnel_id, head=link_pb2.TunnelHead(status=response.status, headers=headers))


def _end(tunnel_id: str, error_code: str = "", message: str = "") -> link_pb2.TunnelFrame:
    return link_pb2.TunnelFrame(tunnel_id=tunnel_id, end=link_pb2.TunnelEnd(error_code=error_code, message=message))


def allowed_path(path: str) -> bool:
    """An inference path, also once the URL is normalised: yarl resolves "..", also percent-encoded, before sending,
    so "/oai/v1/../../v1/admin/keys" would reach the admin API."""
    return (path.startswith(ALLOWED_PATH_PREFIXES) and not any(char in path for char in "%?#\\")
            and not any(segment in (".", "..") for segment in path.split("/")))


class NodeTunnels:
    """The tunnels of one link session: each TunnelRequest becomes a request to the node's own http process."""

    def __init__(self, settings: Settings, sender: FairSender, http: aiohttp.ClientSession) -> None:
        assert settings.auth.service_token_secret is not None  # the link mode requires it
        self._secret = settings.auth.service_token_secret
        self._base_urls = local_base_urls(settings)
        self._turn = 0
        self._sender = sender
        self._http = http
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.accepting = True

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def open(self, request: link_pb2.TunnelRequest) -> None:
        tunnel_id = request.tunnel_id
        if not tunnel_id or tunnel_id in self._tasks:
            logger.warning("tunnel request with a missing or duplicate id %r ignored", tunnel_id,
                           extra={"event": "tunnel_refused", "tunnel_id": tunnel_id})
            return
        self._sender.open(tunnel_id, request.credit)
        work = self._run(request) if self.accepting else self._refuse(tunnel_id, NODE_STOPPING, "the node's link "
                                                                      "process is stopping; retry")
        task = asyncio.create_task(work, name=f"tunnel {tunnel_id}")
        self._tasks[tunnel_id] = task
        task.add_done_callback(lambda _: self._forget(tunnel_id, task))

    def _forget(self, tunnel_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(tunnel_id) is task:
            del self._tasks[tunnel_id]
            self._sender.close(tunnel_id)

    def credit(self, tunnel_id: str, frames: int) -> None:
        self._sender.credit(tunnel_id, frames)

    def cancel(self, tunnel_id: str) -> None:
        """The managed side's caller went away: close the local request, so the node's backend sees it go too."""
        task = self._tasks.get(tunnel_id)
        if task is not None:
            task.cancel()
            logger.info("tunnel %s cancelled by the managed side", tunnel_id,
                        extra={"event": "tunnel_cancelled", "tunnel_id": tunnel_id})

    async def cancel_all(self) -> int:
        """Cuts every tunnel (the link is gone: nobody reads their answers any more); returns how many."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)

    async def finish(self, grace_s: float) -> tuple[int, int]:
        """Takes no new tunnel; gives the open ones grace_s to end, then cuts the rest. Returns (finished, cut)."""
        self.accepting = False
        return await finish_within(list(self._tasks.values()), grace_s)

    async def _refuse(self, tunnel_id: str, error_code: str, message: str) -> None:
        await self._sender.put(tunnel_id, _end(tunnel_id, error_code, message))
        await self._sender.flushed(tunnel_id)

    @contextlib.asynccontextmanager
    async def _local_request(self, request: link_pb2.TunnelRequest,
                             headers: dict[str, str]) -> AsyncIterator[aiohttp.ClientResponse]:
        """The request made of the http processes in turn; one that refuses the connection (restarting, say) passes it
        to the next, which is safe because nothing reached the refusing one."""
        self._turn += 1
        for attempt in range(len(self._base_urls)):
            base_url = self._base_urls[(self._turn + attempt) % len(self._base_urls)]
            try:
                response = await self._http.request(request.method or "POST", base_url + request.path,
                                                    headers=headers, data=request.body)
            except aiohttp.ClientConnectorError:
                if attempt == len(self._base_urls) - 1:
                    raise
                continue
            async with response:
                yield response
            return

    async def _run(self, request: link_pb2.TunnelRequest) -> None:
        tunnel_id = request.tunnel_id
        if not allowed_path(request.path):
            await self._refuse(tunnel_id, PATH_NOT_ALLOWED,
                               f"a tunnel carries inference calls only ({', '.join(ALLOWED_PATH_PREFIXES)})")
            return
        headers = {name: value for name, value in request.headers.items()
                   if name.lower() in FORWARDED_REQUEST_HEADERS}
        headers[protocol.TUNNEL_HEADER] = service_tokens.mint(
            self._secret, protocol.LINK_SERVICE_NAME, TUNNEL_TOKEN_TTL_S, scope=service_tokens.HYBRID_LINK)
        headers[protocol.TUNNEL_ID_HEADER] = tunnel_id
        # Verified by the http process against this node's credential: the caller the managed side vouches for.
        headers[ASSERTION_HEADER] = request.assertion
        put = self._sender.put
        headed = False
        try:
            async with self._local_request(request, headers) as response:
                await put(tunnel_id, _head(tunnel_id, response))
                headed = True
                async for chunk in response.content.iter_chunked(FRAME_MAX_BYTES):
                    await put(tunnel_id, link_pb2.TunnelFrame(tunnel_id=tunnel_id, data=chunk))
        except Exception as exc:  # whatever failed, the managed side hears of it rather than waiting for ever
            code = NODE_HTTP_CUT if headed else NODE_HTTP_UNAVAILABLE
            expected = isinstance(exc, aiohttp.ClientError | TimeoutError)
            logger.warning("tunnel %s: the node's http process failed: %s", tunnel_id, exc, exc_info=not expected,
                           extra={"event": "tunnel_failed", "tunnel_id": tunnel_id, "error_code": code})
            await self._refuse(tunnel_id, code, f"the node's http process failed ({type(exc).__name__})")
            return
        await put(tunnel_id, _end(tunnel_id))
        await self._sender.flushed(tunnel_id)
