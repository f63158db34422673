"""Backends `scaiinfer:<node>/<model>`: a chat request as an InferenceRequest, the node's chunks as OpenAI SSE bytes.

The node's stream is turned into the same `data: {chat.completion.chunk}` frames an HTTP backend sends, so the
pipeline relays, counts and fails over exactly as it does for HTTP. Each node endpoint gets one cached grpc.aio
channel; calls carry the node's call credential (`nodes.call_token`), which the node learnt from its heartbeats.
"""

import json
import time
from typing import Any

import grpc

from scaigrid.dispatch.failures import Failure
from scaigrid.routing.catalogue import Backend
from scaigrid.rpc.generated.scaiinfer.v1 import scaiinfer_pb2, scaiinfer_pb2_grpc
from scaigrid.rpc.nodes import NodeDirectory, call_token
from scaigrid.settings import Settings

DONE_FRAME = b"data: [DONE]\n\n"
# A node that restarts is reachable again within seconds, not after gRPC's default backoff of up to two minutes.
CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 5000))
# Which status means what for failover and the breaker. Unlisted codes are a failing node ("status").
FAILURE_KINDS = {
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
        return Failure(kind, exc.details() or name)
    return Failure(kind, detail, public=f"gRPC {name}" if kind == "status" else "")


def _text(content: Any) -> str:
    """A message's content as text: a string, or text parts (the protocol carries no images or audio)."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            raise Failure("refused", "scaiinfer.v1 carries text only; this message has a non-text part")
        texts.append(str(part.get("text", "")))
    return "".join(texts)


def inference_request(payload: dict[str, Any], model: str, request_id: str) -> scaiinfer_pb2.InferenceRequest:
    """The chat body as the node gets it; refused (422, no failover) when it asks for what the protocol lacks."""
    if payload.get("tools"):
        raise Failure("refused", "scaiinfer.v1 has no tool calls; route this model to a backend that has")
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
    """One StreamInference call read as OpenAI SSE bytes (b"" after [DONE]); gRPC errors raise Failure."""

    __slots__ = ("_call", "_created", "_ended", "_id", "_model", "_sent_role")

    def __init__(self, call: Any, model: str, request_id: str) -> None:
        self._call = call
        self._model = model
        self._id = "chatcmpl-" + request_id
        self._created = int(time.time())
        self._ended = False
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
        return chunk

    async def read(self) -> bytes:
        was_open = not self._ended
        chunk = await self.next_chunk()
        if chunk is None:
            return DONE_FRAME if was_open else b""
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
        finish_reason = None
        usage = None
        while (chunk := await self.next_chunk()) is not None:
            parts.append(chunk.delta)
            finish_reason = chunk.finish_reason or finish_reason
            if chunk.HasField("usage"):
                usage = _usage(chunk.usage)
        body: dict[str, Any] = {
            "id": self._id, "object": "chat.completion", "created": self._created, "model": self._model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                         "finish_reason": finish_reason or "stop"}]}
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
    """Opens StreamInference calls to the nodes the directory knows, over one cached channel per endpoint."""

    def __init__(self, settings: Settings, directory: NodeDirectory) -> None:
        self.directory = directory
        self._secret = settings.auth.service_token_secret
        self._channels: dict[str, Any] = {}

    def _metadata(self, node_id: str) -> tuple[tuple[str, str], ...]:
        if self._secret is None:
            raise Failure("status", "SERVICE_TOKEN_SECRET is not set: this gateway cannot authenticate to nodes",
                          public="not configured")
        return (("authorization", f"Bearer {call_token(self._secret, node_id)}"),)

    def reachable(self, backend: Backend, now_s: float) -> bool:
        """False for a scaiinfer backend whose node is unknown or stale: skipped, not a failure of the backend."""
        return backend.node_id is None or self.directory.reachable(backend.node_id, now_s) is not None

    def open(self, backend: Backend, payload: dict[str, Any], request_id: str) -> NodeStream:
        """Starts the call (nothing is awaited: the first read waits for the node)."""
        assert backend.node_id is not None
        node = self.directory.reachable(backend.node_id, time.time())
        if node is None:
            raise Failure("connect", f"node {backend.node_id} went stale", public="node stale")
        request = inference_request(payload, backend.node_model, request_id)
        channel = self._channels.get(node.endpoint)
        if channel is None:
            channel = self._channels[node.endpoint] = grpc.aio.insecure_channel(node.endpoint, CHANNEL_OPTIONS)
        call = scaiinfer_pb2_grpc.InferenceServiceStub(channel).StreamInference(
            request, metadata=self._metadata(backend.node_id))
        return NodeStream(call, backend.node_model, request_id)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
