"""Backends of provider `anthropic`: an OpenAI chat request as a Messages API call, its answer back as OpenAI's.

The pipeline reads every backend as OpenAI bytes (dispatch/transport.py): the non-streamed answer becomes one
chat.completion, and Anthropic's event stream (message_start, content_block_start/delta/stop, message_delta,
message_stop, ping, error) becomes chat.completion.chunk frames, a usage chunk and `data: [DONE]`, so failover,
breakers, relaying and accounting are those of every other backend. Anthropic's 529 (overloaded) counts as a 429.
"""

import dataclasses
import json
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web

from scaigrid.dispatch.failures import Failure
from scaigrid.dispatch.sse import DONE_FRAME
from scaigrid.dispatch.transport import (
    DEFAULT_RETRY_AFTER_S,
    EMBEDDINGS,
    ERROR_BODY_MAX_BYTES,
    MEDIA,
    HttpTransport,
    status_failure,
)
from scaigrid.routing.catalogue import Backend

# Anthropic requires max_tokens; sent when neither the request nor the model's max_output_tokens sets one.
DEFAULT_MAX_TOKENS = 4096
MAX_TEMPERATURE = 1.0  # Anthropic's range is 0-1 where OpenAI's is 0-2: a higher value is sent as 1
OVERLOADED_STATUS = 529
LACKS = {EMBEDDINGS: "Anthropic has no embeddings API, and every backend of this model is an anthropic backend",
         MEDIA: "Anthropic has no image or audio API, and every backend of this model is an anthropic backend"}
FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
                  "tool_use": "tool_calls", "refusal": "content_filter"}
# Error types in a stream that mean "try later", as a 429 or 529 does before it.
BUSY_ERRORS = frozenset({"overloaded_error", "rate_limit_error"})


def _refused(why: str) -> Failure:
    """A request the Messages API cannot express: the client's fault, told in our own words."""
    return Failure("refused", why, public=why)


def _text(content: Any) -> str:
    """A system or tool message's content as text: a string, or the text of its text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(str(part.get("text", "")) for part in content if part.get("type") == "text")


def _image(part: dict[str, Any]) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise _refused("an image_url part needs image_url.url")
    if url.startswith("data:"):
        media_type, _, data = url[5:].partition(";base64,")
        if not data:
            raise _refused("an image data URL must be base64: data:<media type>;base64,<data>")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _blocks(content: Any) -> list[dict[str, Any]]:
    """A user or assistant message's content as content blocks (empty text is left out: Anthropic refuses it)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for part in content:
        if part["type"] == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": str(part["text"])})
        elif part["type"] == "image_url":
            blocks.append(_image(part))
        else:
            raise _refused(f"an anthropic backend takes text and image_url parts, not {part['type']!r}")
    return blocks


def _tool_use(call: Any) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise _refused("each tool_calls item needs {id, function: {name, arguments}}")
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except ValueError:
        raise _refused("a tool call's arguments must be a JSON object") from None
    if not isinstance(arguments, dict):
        raise _refused("a tool call's arguments must be a JSON object")
    return {"type": "tool_use", "id": str(call.get("id", "")), "name": function["name"], "input": arguments}


def _conversation(messages: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """(system texts, messages): system messages go to `system`, tool results into the user turn that follows the
    call, and consecutive turns of one role are joined (Anthropic alternates user and assistant)."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if role == "system":
            system.append(_text(message.get("content")))
            continue
        if role == "tool":
            role, blocks = "user", [{"type": "tool_result", "tool_use_id": message["tool_call_id"],
                                     "content": _text(message.get("content"))}]
        else:
            blocks = _blocks(message.get("content"))
            if role == "assistant":
                blocks += [_tool_use(call) for call in message.get("tool_calls") or ()]
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return system, turns


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None and parallel is not False:
        return None
    if choice is None or choice == "auto":
        translated: dict[str, Any] = {"type": "auto"}
    elif choice == "required":
        translated = {"type": "any"}
    elif choice == "none":
        return {"type": "none"}
    else:
        translated = {"type": "tool", "name": choice["function"]["name"]}
    if parallel is False:
        translated["disable_parallel_tool_use"] = True
    return translated


def messages_request(payload: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
    """The Messages API body of a chat request (validated by dispatch/schemas.py).

    Sent: messages, max_tokens, stop, temperature, top_p, tools, tool_choice, parallel_tool_calls, user (as
    metadata.user_id). OpenAI-only fields (n, seed, penalties, logprobs, response_format, ...) are left out.
    """
    system, turns = _conversation(payload["messages"])
    body: dict[str, Any] = {
        "model": model, "messages": turns,
        "max_tokens": payload.get("max_completion_tokens") or payload.get("max_tokens") or DEFAULT_MAX_TOKENS}
    if system:
        body["system"] = "\n\n".join(system)
    stop = payload.get("stop")
    if stop:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    if payload.get("temperature") is not None:
        body["temperature"] = min(float(payload["temperature"]), MAX_TEMPERATURE)
    if payload.get("top_p") is not None:
        body["top_p"] = payload["top_p"]
    if payload.get("tools"):
        body["tools"] = [{"name": tool["function"]["name"],
                          "description": tool["function"].get("description") or "",
                          "input_schema": tool["function"].get("parameters") or {"type": "object", "properties": {}}}
                         for tool in payload["tools"]]
        choice = _tool_choice(payload.get("tool_choice"), payload.get("parallel_tool_calls"))
        if choice is not None:
            body["tool_choice"] = choice
    if isinstance(payload.get("user"), str):
        body["metadata"] = {"user_id": payload["user"]}
    if stream:
        body["stream"] = True
    return body


def _usage(usage: Any) -> dict[str, int]:
    """OpenAI's usage from Anthropic's: cached input tokens (read or written) are input tokens too."""
    usage = usage if isinstance(usage, dict) else {}
    prompt = sum(usage.get(name) or 0 for name in (
        "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
    completion = usage.get("output_tokens") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _arguments(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def chat_completion(body: bytes) -> bytes:
    """A Messages API answer as one chat.completion; Failure("shape") when it is not one."""
    try:
        answer = json.loads(body)
    except ValueError:
        raise Failure("shape", "the answer is not JSON") from None
    content = answer.get("content") if isinstance(answer, dict) else None
    if not isinstance(content, list) or not all(isinstance(block, dict) for block in content):
        raise Failure("shape", "the answer is not a Messages API message")
    text = "".join(str(block.get("text", "")) for block in content if block.get("type") == "text")
    calls = [{"id": block.get("id"), "type": "function",
              "function": {"name": block.get("name"), "arguments": _arguments(block.get("input") or {})}}
             for block in content if block.get("type") == "tool_use"]
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return json.dumps({
        "id": answer.get("id"), "object": "chat.completion", "created": int(time.time()), "model": answer.get("model"),
        "choices": [{"index": 0, "message": message,
                     "finish_reason": FINISH_REASONS.get(answer.get("stop_reason") or "end_turn", "stop")}],
        "usage": _usage(answer.get("usage"))}, separators=(",", ":")).encode()


def _event(raw: bytes) -> dict[str, Any] | None:
    """The JSON data of one SSE event (its `type` says what it is); None for an event without data."""
    data = [line[5:].strip() for line in raw.split(b"\n") if line.startswith(b"data:")]
    if not data:
        return None
    try:
        event = json.loads(b"\n".join(data))
    except ValueError:
        raise Failure("shape", "the backend sent a stream event that is not JSON") from None
    if not isinstance(event, dict):
        raise Failure("shape", "the backend sent a stream event that is not a JSON object")
    return event


def stream_failure(error: Any) -> Failure:
    """An `error` event: overloaded or rate limited cools the backend down like a 429, anything else fails it."""
    error = error if isinstance(error, dict) else {}
    detail = f"{error.get('type', 'error')}: {str(error.get('message', ''))[:300]}"
    if error.get("type") in BUSY_ERRORS:
        return Failure("rate_limited", detail, DEFAULT_RETRY_AFTER_S)
    return Failure("upstream", detail, public="error in its stream")


class MessageStream:
    """Anthropic's event stream read as OpenAI SSE bytes. It ends well only with message_stop (then [DONE]); an
    end before it reads b"", which the pipeline takes for a cut stream."""

    __slots__ = ("_buffer", "_created", "_ended", "_failure", "_id", "_model", "_response", "_tools", "_usage")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._buffer = b""
        self._created = int(time.time())
        self._id = ""
        self._model = ""
        self._tools: dict[int, int] = {}  # a tool_use block's index → its index among the tool calls
        self._usage: dict[str, Any] = {}
        self._ended = False
        self._failure: Failure | None = None  # raised at the next read, after the frames that came before it

    async def read(self) -> bytes:
        if self._failure is not None:
            raise self._failure
        read = self._response.content.readany
        while not self._ended:
            data = await read()
            if not data:
                return b""
            frames = self._translate(data)
            if frames:
                return frames
        while await read():  # after message_stop: to the end, so the connection goes back to the pool
            pass
        return b""

    def close(self) -> None:
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()

    def _translate(self, data: bytes) -> bytes:
        buffer = (self._buffer + data).replace(b"\r\n", b"\n")
        *events, self._buffer = buffer.split(b"\n\n")
        frames = []
        for event in events:
            try:
                frames.append(self._frames(event))
            except Failure as exc:
                if not any(frames):
                    raise
                self._failure = exc
                break
        return b"".join(frames)

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return self._frame([{"index": 0, "delta": delta, "finish_reason": finish_reason}])

    def _frame(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {"id": self._id, "object": "chat.completion.chunk", "created": self._created, "model": self._model,
                 "choices": choices, **extra}
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    def _frames(self, raw: bytes) -> bytes:
        event = _event(raw)
        if event is None or self._ended:
            return b""
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            message = message if isinstance(message, dict) else {}
            self._id, self._model = str(message.get("id", "")), str(message.get("model", ""))
            self._usage.update(message.get("usage") or {})
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") != "tool_use":
                return b""
            index = self._tools[event.get("index", -1)] = len(self._tools)
            return self._chunk({"tool_calls": [{"index": index, "id": block.get("id"), "type": "function",
                                                "function": {"name": block.get("name"), "arguments": ""}}]})
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta":
                return self._chunk({"content": delta.get("text", "")})
            if delta.get("type") == "input_json_delta" and event.get("index") in self._tools:
                return self._chunk({"tool_calls": [{"index": self._tools[event["index"]],
                                                    "function": {"arguments": delta.get("partial_json", "")}}]})
            return b""  # thinking and signature deltas have no OpenAI chunk
        if kind == "message_delta":
            self._usage.update(event.get("usage") or {})  # output_tokens so far (cumulative)
            reason = (event.get("delta") or {}).get("stop_reason")
            return self._chunk({}, FINISH_REASONS.get(reason, "stop")) if reason else b""
        if kind == "message_stop":
            self._ended = True
            return self._frame([], usage=_usage(self._usage)) + DONE_FRAME
        if kind == "error":
            raise stream_failure(event.get("error"))
        return b""  # ping, content_block_stop, and event types added later


class AnthropicTransport(HttpTransport):
    """POST {base_url}/v1/messages with the backend's x-api-key and anthropic-version (routing.catalogue)."""

    lacks: Mapping[str, str] = LACKS

    async def open(self, backend: Backend, payload: dict[str, Any], request: web.Request) -> MessageStream:
        body = json.dumps(messages_request(payload, backend.model, stream=True), separators=(",", ":")).encode()
        return MessageStream(await self._open_stream(backend, body, request))

    async def fetch(self, backend: Backend, payload: dict[str, Any], request: web.Request, embeddings: bool) -> bytes:
        body = json.dumps(messages_request(payload, backend.model, stream=False), separators=(",", ":")).encode()
        return chat_completion(await self._fetch_body(backend, backend.chat_url, body, request))

    async def _status_failure(self, response: aiohttp.ClientResponse) -> Failure:
        if response.status != OVERLOADED_STATUS:
            return await super()._status_failure(response)
        body = await response.content.read(ERROR_BODY_MAX_BYTES)
        failure = status_failure(429, response.headers.get("Retry-After"), body)
        return dataclasses.replace(failure, detail="HTTP 529 (overloaded)")
