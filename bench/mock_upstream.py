"""A zero-delay OpenAI-compatible backend: instant chat completions and paced SSE streams, bodies precomputed."""

import argparse
import asyncio
import json
import re

from aiohttp import web

# A model named like "stream-64x20" streams 64 chunks 20 ms apart; ?chunks=&interval_ms= override it.
STREAM_SHAPE = re.compile(r"(\d+)x(\d+)$")
DEFAULT_CHUNKS = 64
DEFAULT_INTERVAL_MS = 20
PROMPT_TOKENS = 12
COMPLETION_TOKENS = 8
CREATED = 1_700_000_000
BACKLOG = 1024  # 500 streams connect at once; the default 128 would drop SYNs and add 1 s retries


def completion_body(model: str) -> bytes:
    return json.dumps({
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "pong " * COMPLETION_TOKENS},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                  "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS},
    }, separators=(",", ":")).encode()


def sse(payload: object) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def stream_events(model: str, chunks: int) -> tuple[bytes, bytes, bytes]:
    """(one content chunk, the closing chunk with finish_reason, the usage chunk and [DONE])."""
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": CREATED, "model": model}
    content = sse({**base, "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}]})
    closing = sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": chunks, "total_tokens": PROMPT_TOKENS + chunks}
    tail = sse({**base, "choices": [], "usage": usage}) + b"data: [DONE]\n\n"
    return content, closing, tail


class Mock:
    def __init__(self) -> None:
        self._bodies: dict[str, bytes] = {}
        self._streams: dict[tuple[str, int], tuple[bytes, bytes, bytes]] = {}

    async def chat(self, request: web.Request) -> web.StreamResponse:
        payload = json.loads(await request.read())
        model = str(payload.get("model", "mock"))
        if not payload.get("stream"):
            body = self._bodies.get(model)
            if body is None:
                body = self._bodies[model] = completion_body(model)
            return web.Response(body=body, content_type="application/json")
        shape = STREAM_SHAPE.search(model)
        chunks = int(request.query.get("chunks", shape[1] if shape else DEFAULT_CHUNKS))
        interval_s = int(request.query.get("interval_ms", shape[2] if shape else DEFAULT_INTERVAL_MS)) / 1000
        events = self._streams.get((model, chunks))
        if events is None:
            events = self._streams[(model, chunks)] = stream_events(model, chunks)
        content, closing, tail = events
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for index in range(chunks):
            if index:
                await asyncio.sleep(interval_s)
            await response.write(content)
        await response.write(closing + tail)
        await response.write_eof()
        return response

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "mock", "object": "model", "owned_by": "bench"}]})


def make_app() -> web.Application:
    mock = Mock()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", mock.chat)
    app.router.add_get("/v1/models", mock.models)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(make_app(), host="127.0.0.1", port=args.port, access_log=None, print=None, backlog=BACKLOG)


if __name__ == "__main__":
    main()
