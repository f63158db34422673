"""Stand-in upstreams for the nginx tests: a backend that streams on a schedule, and a WebSocket echo."""

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import WSMsgType, web

from tests.threaded_server import ThreadedServer


def _frame(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    chunk = {"id": "chatcmpl-nginx", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class ScheduledStream(ThreadedServer):
    """An OpenAI-compatible chat backend streaming token 0 at once, then one token after each of `gaps_s`.

    It records when it wrote each token (time.monotonic()), so a test can tell a relayed chunk from a buffered one.
    """

    name = "scheduled-stream"

    def __init__(self, gaps_s: Sequence[float]) -> None:
        super().__init__()
        self.gaps_s = tuple(gaps_s)
        self.sent_at: list[float] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/chat/completions", self._chat)]

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        model = str((await request.json())["model"])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_frame(model, {"role": "assistant", "content": ""}))
        for index, gap_s in enumerate((0.0, *self.gaps_s)):
            await asyncio.sleep(gap_s)  # the gaps between chunks are what the test measures through nginx
            self.sent_at.append(time.monotonic())
            await response.write(_frame(model, {"content": f"tok{index} "}))
        await response.write(_frame(model, {}, "stop"))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


class EchoSocket(ThreadedServer):
    """Stands in for the http process, which has no WebSocket route yet: echoes text messages on any path."""

    name = "echo-socket"

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/{path:.*}", self._echo)]

    async def _echo(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:
            if message.type == WSMsgType.TEXT:
                await socket.send_str(f"{request.path}: {message.data}")
        return socket
