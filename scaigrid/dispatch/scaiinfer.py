"""Backends `scaiinfer:<node>/<model>`: a chat request as an InferenceRequest, the node's chunks as OpenAI SSE bytes.

The node's stream is turned into the same `data: {chat.completion.chunk}` frames an HTTP backend sends, so the
pipeline relays, counts and fails over exactly as it does for HTTP. Calls go over the node directory's channel to
the node (TLS unless SCAIINFER_PLAINTEXT: `nodes.registry.channel_credentials`), and carry the node's call credential
(`nodes.registry.call_token`), which the node learnt from its heartbeats.
"""

import json
import time
from collections.abc import Mapping
from typing import Any

import grpc
from aiohttp import web

from scaigrid.appkeys import REQUEST_ID
from scaigrid.dispatch.failures import Failure, FailureKind
from scaigrid.dispatch.sse import DONE_FRAME
from scaigrid.dispatch.transport import EMBEDDINGS, MEDIA, NON_TEXT, TOOLS
from scaigrid.nodes.registry import NodeDirectory, call_token
from scaigrid.routing.catalogue import Backend
from scaigrid.rpc.generated.scaiinfer.v1 import scaiinfer_pb2, scaiinfer_pb2_grpc
from scaigrid.settings import Settings

# What scaiinfer.v1 cannot carry: a request needing it goes to another backend of the model, or is refused.
LACKS = {TOOLS: "scaiinfer.v1 has no tool calls, and every backend of this model is a ScaiInfer node",
         NON_TEXT: "scaiinfer.v1 carries text only, and every backend of this model is a ScaiInfer node",
         EMBEDDINGS: "scaiinfer.v1 has no embeddings call, and every backend of this model is a ScaiInfer node",
         MEDIA: "scaiinfer.v1 has no image or audio call, and every backend of this model is a ScaiInfer node"}
# Which status means what for failover and the breaker. Unlisted codes are a failing node ("status").
FAILURE_KINDS: dict[grpc.StatusCode, FailureKind] = {
    grpc.StatusCode.UNAVAILABLE: "connect",
    grpc.StatusCode.DEADLINE_EXCEEDED: "timeout",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "rate_limited",
    grpc.StatusCode.INVALID_ARGUMENT: "refused",
    grpc.StatusCode.OUT_OF_RANGE: "refused",
    grpc.StatusCode.FAILED_PRECONDITION: "refused",
}
RETRY_AFTER_S = 1.0  # how long a node that answered RESOURCE_EXHAUSTED cools down


def rpc_failure(exc: grpc.aio.AioRpcError) -> Failure:
    code = exc.code()
    name = code.name if code is not None else "UNKNOWN"
    kind = FAILURE_KINDS.get(code, "status")
    detail = f"gRPC {name}: {(exc.details() or '')[:300]}"
    if kind == "rate_limited":
        return Failure(kind, detail, RETRY_AFTER_S)
    if kind == "refused":
        return Failure(kind, exc.details() or name, public=f"gRPC {name}")
    return Failure(kind, detail, public=f"gRPC {name}" if kind == "status" else "")


def _text(content: Any) -> str:
    """A message's content as text: a string, or text parts (a request with other parts never comes here: LACKS)."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(str(part.get("text", "")) for part in content)


def inference_request(payload: dict[str, Any], model: str, request_id: str) -> scaiinfer_pb2.InferenceRequest:
    """The chat body as the node gets it."""
    request = scaiinfer_pb2.InferenceRequest(model=model, request_id=request_id, messages=[
        scaiinfer_pb2.ChatMessage(role=str(message.get("role", "")), content=_text(message.get("content")))
        for message in payload["messages"]])
    max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
    if max_tokens:
        request.max_tokens = min(int(max_tokens), 2**32 - 1)
    for name in ("temperature", "top_p"):
        if payload.get(name) is not None:
            setattr(request, name, float(payload[name]))
    stop = payload.get("stop")
    if stop:
        request.stop.extend([stop] if isinstance(stop, str) else stop)
    return request


class NodeStream:
    """One StreamInference call read as OpenAI SSE bytes; gRPC errors raise Failure.

    The node's stream ends well only after a finish_reason: only then does it end with [DONE]. Ending without one,
    it reads b"" (and gathers into a Failure), so the pipeline treats it as a cut stream, as it does an HTTP stream
    that ends without [DONE].
    """

    __slots__ = ("_call", "_created", "_ended", "_finish_reason", "_id", "_model", "_sent_role")

    def __init__(self, call: Any, model: str, request_id: str) -> None:
        self._call = call
        self._model = model
        self._id = "chatcmpl-" + request_id
        self._created = int(time.time())
        self._ended = False
        self._finish_reason = ""
        self._sent_role = False

    async def next_chunk(self) -> scaiinfer_pb2.InferenceChunk | None:
        """The node's next chunk; None at the end of its stream."""
        if self._ended:
            return None
        try:
            chunk = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise rpc_failure(exc) from None
        if chunk is grpc.aio.EOF:
            self._ended = True
            return None
        assert isinstance(chunk, scaiinfer_pb2.InferenceChunk)
        self._finish_reason = chunk.finish_reason or self._finish_reason
        return chunk

    async def read(self) -> bytes:
        was_open = not self._ended
        chunk = await self.next_chunk()
        if chunk is None:
            return DONE_FRAME if was_open and self._finish_reason else b""
        frames = b""
        if chunk.delta or chunk.finish_reason or not chunk.HasField("usage"):
            delta: dict[str, Any] = {"content": chunk.delta} if chunk.delta else {}
            if not self._sent_role:
                delta["role"] = "assistant"
                self._sent_role = True
            frames += self._frame([{"index": 0, "delta": delta, "finish_reason": chunk.finish_reason or None}])
        if chunk.HasField("usage"):
            frames += self._frame([], chunk.usage)
        return frames

    def _frame(self, choices: list[dict[str, Any]], usage: scaiinfer_pb2.Usage | None = None) -> bytes:
        body: dict[str, Any] = {"id": self._id, "object": "chat.completion.chunk", "created": self._created,
                                "model": self._model, "choices": choices}
        if usage is not None:
            body["usage"] = _usage(usage)
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    async def completion(self) -> bytes:
        """The whole stream as one chat.completion (for a client that did not ask for a stream)."""
        parts: list[str] = []
        usage = None
        while (chunk := await self.next_chunk()) is not None:
            parts.append(chunk.delta)
            if chunk.HasField("usage"):
                usage = _usage(chunk.usage)
        if not self._finish_reason:
            raise Failure("cut", "the node's stream ended without a finish_reason", public="stream cut")
        body: dict[str, Any] = {
            "id": self._id, "object": "chat.completion", "created": self._created, "model": self._model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                         "finish_reason": self._finish_reason}]}
        if usage is not None:
            body["usage"] = usage
        return json.dumps(body, separators=(",", ":")).encode()

    def close(self) -> None:
        """Cancels the call unless it ended: the node sees us go, and stops generating."""
        if not self._ended:
            self._call.cancel()


def _usage(usage: scaiinfer_pb2.Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


class NodeClient:
    """The Transport of scaiinfer backends: StreamInference calls to the nodes the directory knows."""

    lacks: Mapping[str, str] = LACKS

    def __init__(self, settings: Settings, directory: NodeDirectory) -> None:
        self.directory = directory
        self._secret = settings.auth.service_token_secret

    def _metadata(self, node_id: str) -> tuple[tuple[str, str], ...]:
        if self._secret is None:
            raise Failure("status", "SERVICE_TOKEN_SECRET is not set: this gateway cannot authenticate to nodes",
                          public="not configured")
        return (("authorization", f"Bearer {call_token(self._secret, node_id)}"),)

    def available(self, backend: Backend, now_s: float) -> bool:
        """False when the node is unknown or stale, or has not announced the backend's model."""
        assert backend.node_id is not None
        node = self.directory.reachable(backend.node_id, now_s)
        return node is not None and backend.node_model in node.models

    async def open(self, backend: Backend, payload: dict[str, Any], request: web.Request) -> NodeStream:
        """Starts the call (nothing is awaited: the first read waits for the node)."""
        assert backend.node_id is not None
        request_id = request[REQUEST_ID]
        node = self.directory.reachable(backend.node_id, time.time())
        if node is None:
            raise Failure("connect", f"node {backend.node_id} went stale", public="node stale")
        request = inference_request(payload, backend.node_model, request_id)
        call = scaiinfer_pb2_grpc.InferenceServiceStub(self.directory.channel(node.endpoint)).StreamInference(
            request, metadata=self._metadata(backend.node_id))
        return NodeStream(call, backend.node_model, request_id)

    async def fetch(self, backend: Backend, payload: dict[str, Any], request: web.Request, embeddings: bool) -> bytes:
        """The node's stream gathered into one chat.completion (never embeddings: LACKS)."""
        stream = await self.open(backend, payload, request)
        try:
            return await stream.completion()
        finally:
            stream.close()
