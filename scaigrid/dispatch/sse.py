"""Server-sent events between a backend and the client: upstream bytes in, client frames out, nothing held back.

Each complete upstream event becomes one client frame as soon as it arrives. Chunks are not decoded and
re-encoded one by one (a gateway relaying hundreds of streams would spend its CPU on that): the model name is
rewritten in the bytes, and only the first chunk, chunks that carry usage or an error, and anything that does not
look like a JSON object are decoded.
"""

import functools
import json
import re
from typing import Any

DONE_FRAME = b"data: [DONE]\n\n"
# The only unescaped "model" key of a completion or chunk is the top-level one (generated text is inside JSON
# strings, where its quotes are escaped).
_MODEL_FIELD = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')
_CONTENT_TEXT = re.compile(rb'"content"\s*:\s*"[^"]')


class ShapeError(Exception):
    """The backend's answer is not the OpenAI shape we relay."""


class UpstreamStreamError(Exception):
    """The backend reported an error inside its stream."""


@functools.lru_cache(maxsize=4096)
def model_field(slug: str) -> bytes:
    """The `"model":"<slug>"` that replaces the backend's model name."""
    return b'"model":' + json.dumps(slug).encode()


def rename_model(body: bytes, field: bytes) -> bytes:
    """The answer with its model name replaced (or as it is, when it names none)."""
    match = _MODEL_FIELD.search(body)
    return body if match is None else body[:match.start()] + field + body[match.end():]


def _error_message(payload: Any) -> str:
    error = payload.get("error") if isinstance(payload, dict) else None
    message = error.get("message") if isinstance(error, dict) else error or (
        payload.get("message") if isinstance(payload, dict) else None)
    return str(message or "the backend reported an error in its stream")[:300]


def error_frame(code: str, message: str, oai: bool) -> bytes:
    """`event: error` with {code, message}; on /oai/ also an OpenAI `error` object, so OpenAI SDKs raise."""
    data: dict[str, Any] = {"code": code, "message": message}
    if oai:
        data["error"] = {"message": message, "type": "server_error", "param": None, "code": code}
    return b"event: error\ndata: " + json.dumps(data).encode() + b"\n\n"


class ChunkRelay:
    """Turns a backend's SSE bytes into client frames; records usage, content chunks and the end of the stream."""

    __slots__ = ("_buffer", "_field", "_forward_usage", "_needle", "content_chunks", "done", "events", "usage")

    def __init__(self, field: bytes, forward_usage: bool) -> None:
        self._buffer = b""
        self._field = field
        self._needle = b""  # the backend's `"model":"..."` exactly as it writes it, learned from its chunks
        self._forward_usage = forward_usage  # the client asked for the usage chunk (we always ask the backend)
        self.content_chunks = 0
        self.events = 0
        self.done = False
        self.usage: dict[str, Any] | None = None

    def feed(self, data: bytes) -> bytes:
        """The frames for every event completed by `data` (b"" while an event is still partial)."""
        buffer = self._buffer + data if self._buffer else data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        *events, self._buffer = buffer.split(b"\n\n")
        if len(events) == 1:
            return self._frame(events[0])
        return b"".join(map(self._frame, events))

    def _frame(self, event: bytes) -> bytes:
        # The usual chunk, after the first: one data line holding a JSON object, no error, no usage.
        if (self.events and not self.done and event.startswith(b"data: {") and event.endswith(b"}")
                and b"\n" not in event and b'"error"' not in event and b'"usage":{' not in event
                and b'"usage": {' not in event):
            self.events += 1
            if _CONTENT_TEXT.search(event):
                self.content_chunks += 1
            return b"data: " + self._renamed(event[6:]) + b"\n\n"
        payload, name = _fields(event)
        if payload is None or self.done:
            return b""  # comments, keep-alives, anything after [DONE]
        if payload == b"[DONE]":
            self.done = True
            return b""
        self.events += 1
        return self._decoded(payload, name)

    def _renamed(self, data: bytes) -> bytes:
        if self._needle and self._needle in data:
            return data.replace(self._needle, self._field, 1)
        match = _MODEL_FIELD.search(data)
        if match is None:
            return data
        self._needle = match.group()
        return data[:match.start()] + self._field + data[match.end():]

    def _decoded(self, data: bytes, name: bytes | None) -> bytes:
        """The first chunk (it proves the shape), errors, usage, and anything that does not look right."""
        try:
            chunk = json.loads(data)
        except ValueError:
            raise ShapeError("the backend sent a stream event that is not JSON") from None
        if not isinstance(chunk, dict):
            raise ShapeError("the backend sent a stream event that is not a JSON object")
        if name == b"error" or (chunk.get("error") and not chunk.get("choices")):
            raise UpstreamStreamError(_error_message(chunk))
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise ShapeError("the backend sent a stream chunk without `choices`")
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
            if not choices and not self._forward_usage:
                return b""
        if any(isinstance(c, dict) and isinstance(c.get("delta"), dict) and c["delta"].get("content")
               for c in choices):
            self.content_chunks += 1
        return b"data: " + self._renamed(data) + b"\n\n"


def _fields(event: bytes) -> tuple[bytes | None, bytes | None]:
    """(data, event name) of one SSE event; data None when it has no data lines."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:], None  # what every OpenAI-compatible server sends
    data: list[bytes] = []
    name = None
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        elif line.startswith(b"event:"):
            name = line[6:].strip()
    return (b"\n".join(data) if data else None), name
