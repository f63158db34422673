"""What the pipeline asks of a backend's transport, what a request needs of it, and the HTTP transport.

Every transport reads the backend's answer as OpenAI bytes (SSE or JSON): HTTP backends speak the OpenAI protocol,
ScaiInfer nodes scaiinfer.v1 over gRPC (dispatch/scaiinfer.py), and the hybrid link carries an OpenAI answer
made elsewhere (dispatch/hybrid.py). An answer that is not 200 means the same whichever way it came: status_failure.
"""

import json
import math
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from yarl import URL

from scaigrid.dispatch.failures import Failure
from scaigrid.routing.catalogue import Backend

# What a request may need that not every transport carries; a backend lacking one is passed over for the request.
TOOLS, NON_TEXT, EMBEDDINGS = "tools", "non-text content", "embeddings"
MEDIA = "images and audio"  # the OpenAI media calls (dispatch/media.py): only HttpTransport.send serves them
# Where a client's request asks for each need, for the 422 when no backend of the model has it.
NEED_FIELDS = {TOOLS: "tools", NON_TEXT: "messages", EMBEDDINGS: "model", MEDIA: "model"}
DEFAULT_RETRY_AFTER_S = 1.0  # a 429 without a usable Retry-After still cools the backend down this long
MAX_RETRY_AFTER_S = 3600.0
ERROR_BODY_MAX_BYTES = 4096
# Statuses meaning "this request is wrong", not "this backend is broken": passed back, no failover.
REFUSED_STATUSES = frozenset({400, 413, 422})
_COMPACT = json.JSONEncoder(separators=(",", ":"))  # json.dumps with options would build one per request


def request_needs(payload: dict[str, Any], embeddings: bool) -> frozenset[str]:
    """What of NEED_FIELDS the request needs (the body is already validated by dispatch/schemas.py)."""
    if embeddings:
        return frozenset((EMBEDDINGS,))
    needs = set()
    if payload.get("tools"):
        needs.add(TOOLS)
    if any(isinstance(message.get("content"), list) and any(part.get("type") != "text" for part in message["content"])
           for message in payload["messages"]):
        needs.add(NON_TEXT)
    return frozenset(needs)


class Upstream(Protocol):
    """A backend's streamed answer as OpenAI SSE bytes, whatever its transport."""

    async def read(self) -> bytes:
        """The next bytes; b"" at the end (before [DONE], that is a cut stream)."""

    def close(self) -> None:
        """Lets go of the answer; before its end, the backend sees us go and stops generating."""


class Transport(Protocol):
    """How the pipeline reaches one kind of backend; failures raise dispatch.failures.Failure.

    `request` is the client's request: its id (appkeys.REQUEST_ID), and the headers a transport that acts with the
    client's own credential forwards.
    """

    lacks: Mapping[str, str]  # the needs it cannot serve, each with why (for the client's 422)

    def available(self, backend: Backend, now_s: float) -> bool:
        """False when the backend cannot be reached now for a reason that is not its breaker's business."""

    async def open(self, backend: Backend, payload: dict[str, Any], request: web.Request) -> Upstream:
        """The backend's stream, once it has accepted the request (or at its first read)."""

    async def fetch(self, backend: Backend, payload: dict[str, Any], request: web.Request, embeddings: bool) -> bytes:
        """The backend's whole JSON answer."""


# --- an OpenAI answer, whichever way it came ---

def _retry_after_s(header: str | None) -> float:
    """Retry-After as seconds or an HTTP date; a missing or odd value means DEFAULT_RETRY_AFTER_S."""
    if header:
        try:
            seconds = float(header)
        except ValueError:
            try:
                seconds = parsedate_to_datetime(header).timestamp() - time.time()
            except (TypeError, ValueError):
                seconds = DEFAULT_RETRY_AFTER_S
        if math.isfinite(seconds) and seconds > 0:
            return min(seconds, MAX_RETRY_AFTER_S)
    return DEFAULT_RETRY_AFTER_S


def _upstream_message(body: bytes) -> str:
    try:
        payload = json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace")
    error = payload.get("error") if isinstance(payload, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    return str(message or payload)[:300]


def status_failure(status: int, retry_after: str | None, body: bytes,
                   refused: frozenset[int] = REFUSED_STATUSES, *, for_client: bool = False) -> Failure:
    """An answer other than 200 (`body`: its first ERROR_BODY_MAX_BYTES), for failover, the breaker and the client.

    `for_client`: the other side is a ScaiGrid answering this very client (hybrid, managed), so its refusal is
    passed on as it is; any other backend's words stay with the log and the platform.
    """
    if status == 429:
        return Failure("rate_limited", "HTTP 429", _retry_after_s(retry_after))
    if status in refused:
        message = _upstream_message(body)
        return Failure("refused", message, public=message if for_client else f"HTTP {status}")
    return Failure("status", f"HTTP {status}: {_upstream_message(body)}", public=f"HTTP {status}")


def check_event_stream(content_type: str) -> None:
    """Raises Failure unless a stream was answered with an event stream."""
    if not content_type.startswith("text/event-stream"):
        raise Failure("shape", f"asked for a stream, the backend answered {content_type or 'with no content type'}")


def upstream_body(payload: dict[str, Any], model: str) -> bytes:
    """The request as the backend gets it: under the backend's own name for the model."""
    payload["model"] = model
    return _COMPACT.encode(payload).encode()


# --- HTTP ---

class HttpStream:
    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def read(self) -> bytes:
        return await self._response.content.readany()

    def close(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # back to the pool
        else:
            self._response.close()


class HttpTransport:
    """Backends that speak the OpenAI protocol over HTTP: they serve whatever a request needs.

    A backend marked `guarded` (a tenant's) goes through the `guarded` session, whose resolver refuses what
    scaigrid.netguard refuses. Redirects are never followed: a 3xx is a failed attempt like any other status.
    """

    lacks: Mapping[str, str] = {}
    refused_statuses = REFUSED_STATUSES
    answers_client = False  # whether the backend's refusals are addressed to the client (status_failure)

    def __init__(self, session: aiohttp.ClientSession, guarded: aiohttp.ClientSession | None = None) -> None:
        self._session = session
        self._guarded = guarded or session

    def available(self, backend: Backend, now_s: float) -> bool:
        return True

    def headers(self, backend: Backend, request: web.Request) -> Mapping[str, str]:
        """The request's headers upstream: the backend's own credential."""
        return backend.headers

    def _session_for(self, backend: Backend) -> aiohttp.ClientSession:
        if not backend.guarded:
            return self._session
        if backend.refused is not None:
            raise Failure("connect", f"refused target: {backend.refused}", public="refused target")
        return self._guarded

    async def open(self, backend: Backend, payload: dict[str, Any], request: web.Request) -> Upstream:
        return HttpStream(await self._open_stream(backend, upstream_body(payload, backend.model), request))

    async def fetch(self, backend: Backend, payload: dict[str, Any], request: web.Request, embeddings: bool) -> bytes:
        url = backend.embeddings_url if embeddings else backend.chat_url
        return await self._fetch_body(backend, url, upstream_body(payload, backend.model), request)

    async def _open_stream(self, backend: Backend, body: bytes, request: web.Request) -> aiohttp.ClientResponse:
        """POSTs `body` to the backend's chat URL; the response, open, once it is a 200 event stream."""
        response = await self._session_for(backend).post(
            backend.chat_url, data=body, headers=self.headers(backend, request), allow_redirects=False)
        try:
            if response.status != 200:
                raise await self._status_failure(response)
            check_event_stream(response.headers.get("Content-Type", ""))
        except BaseException:
            response.close()
            raise
        return response

    async def _fetch_body(self, backend: Backend, url: URL, body: bytes, request: web.Request) -> bytes:
        """POSTs `body` to `url`; the whole answer of a 200."""
        async with self._session_for(backend).post(url, data=body, headers=self.headers(backend, request),
                                                   allow_redirects=False) as response:
            if response.status != 200:
                raise await self._status_failure(response)
            return await response.read()

    async def send(self, backend: Backend, path: str, data: Any, content_type: str | None,
                   request: web.Request) -> aiohttp.ClientResponse:
        """POSTs `data` to `path` under the backend's API root (images, audio: dispatch/media.py); the response, open,
        once it is a 200. `content_type` None: the payload's own (a multipart body names its boundary)."""
        headers = {name: value for name, value in self.headers(backend, request).items()
                   if name.lower() != "content-type"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        response = await self._session_for(backend).post(URL(backend.base_url + path), data=data, headers=headers,
                                                         allow_redirects=False)
        if response.status != 200:
            try:
                raise await self._status_failure(response)
            finally:
                response.close()
        return response

    async def _status_failure(self, response: aiohttp.ClientResponse) -> Failure:
        body = await response.content.read(ERROR_BODY_MAX_BYTES)
        return status_failure(response.status, response.headers.get("Retry-After"), body, self.refused_statuses,
                              for_client=self.answers_client)


class AzureTransport(HttpTransport):
    """Azure OpenAI: the OpenAI protocol at deployment URLs (routing/catalogue.py builds them); chat and embeddings
    only, since `send` posts images and audio under the backend's API root, where Azure has no such routes."""

    lacks: Mapping[str, str] = {MEDIA: "images and audio are not relayed to azure backends, and every backend of "
                                       "this model is an azure backend"}
