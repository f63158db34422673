"""`make run`'s demo model server: an OpenAI-compatible backend that streams the last user message back word by word.

Only `make run` starts it (a private service, like its MariaDB) and routes the model `demo/echo` to it, so the
README's first call answers with no real model configured; an appliance image never runs it.
"""

import argparse
import json
import time
from typing import Any

from aiohttp import web

MODEL = "echo"
EMPTY_REPLY = "(nothing to echo: send a user message)"


def last_user_text(messages: Any) -> str:
    """The text of the last user message: a string, or the text parts of a list of content parts."""
    for message in reversed(messages if isinstance(messages, list) else []):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
        return content if isinstance(content, str) else ""
    return ""


def _words(body: dict[str, Any]) -> list[str]:
    words = last_user_text(body.get("messages")).split()
    return words or EMPTY_REPLY.split()


def _usage(body: dict[str, Any], words: list[str]) -> dict[str, int]:
    prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or [] if isinstance(m, dict))
    return {"prompt_tokens": prompt, "completion_tokens": len(words), "total_tokens": prompt + len(words)}


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


async def chat(request: web.Request) -> web.StreamResponse:
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": {"message": "the body is not JSON", "type": "invalid_request_error"}},
                                 status=400)
    words = _words(body if isinstance(body, dict) else {})
    model, created = str(body.get("model", MODEL)), int(time.time())
    base = {"id": f"chatcmpl-demo-{created}", "created": created, "model": model}
    if not body.get("stream"):
        return web.json_response({**base, "object": "chat.completion", "usage": _usage(body, words), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": " ".join(words)}, "finish_reason": "stop"}]})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    chunk = {**base, "object": "chat.completion.chunk"}
    await response.write(_sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                     "finish_reason": None}]}))
    for index, word in enumerate(words):
        text = word if index == len(words) - 1 else word + " "
        await response.write(_sse({**chunk, "choices": [{"index": 0, "delta": {"content": text},
                                                         "finish_reason": None}]}))
    await response.write(_sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    await response.write(_sse({**chunk, "choices": [], "usage": _usage(body, words)}))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "demo"}]})


def app() -> web.Application:
    application = web.Application()
    application.add_routes([web.post("/v1/chat/completions", chat), web.get("/v1/models", models)])
    return application


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
