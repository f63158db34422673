"""Stand-ins for Anthropic and Azure OpenAI: aiohttp servers speaking each provider's own wire format.

FakeAnthropic serves `POST /v1/messages` as Anthropic documents it: `x-api-key` and `anthropic-version` checked
(401 authentication_error, 400 invalid_request_error), `max_tokens` required, only user/assistant turns, answers a
Messages API message or its event stream (message_start, content_block_start, ping, content_block_delta,
content_block_stop, message_delta, message_stop). The request's `model` selects the behaviour:
  claude-ok           answers "Hello from Claude" (end_turn); a tool_use when the request has tools and no result yet
  claude-overloaded   HTTP 529 overloaded_error
  claude-ratelimit-S  HTTP 429 rate_limit_error with retry-after: S
  claude-invalid      HTTP 400 invalid_request_error
  claude-midstream    streams one text delta, then an `error` event (overloaded_error)

FakeAzure serves `/openai/deployments/{deployment}/chat/completions|embeddings?api-version=...` as Azure OpenAI
does: a wrong `api-key` is 401, an api-version it does not know or any other path 404 "Resource not found", an
unknown deployment 404 DeploymentNotFound. Answers are OpenAI's, with Azure's content filter results and the
prompt-filter chunk that opens its streams. `deployments` maps each deployment to a behaviour: chat, busy (429), or
embed.
"""

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.threaded_server import ThreadedServer

ANTHROPIC_KEY = "sk-ant-api03-good"
AZURE_KEY = "0123456789abcdef0123456789abcdef"
AZURE_API_VERSIONS = frozenset({"2024-10-21", "2024-06-01", "2025-01-01-preview"})
INPUT_TOKENS, CACHE_READ_TOKENS = 17, 4  # a Messages API usage; OpenAI's prompt_tokens is their sum
TEXT_DELTAS = ("Hello", " from", " Claude")
TOOL_INPUT = {"city": "Paris"}
AZURE_MODEL = "gpt-4o-2024-08-06"
AZURE_PROMPT_TOKENS = 9


@dataclass
class Seen:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict[str, Any]


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"type": "error", "error": {"type": kind, "message": message}}, status=status,
                             headers=headers)


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


class FakeAnthropic(ThreadedServer):
    name = "fake-anthropic"

    def __init__(self) -> None:
        super().__init__()
        self.received: list[Seen] = []

    @property
    def url(self) -> str:
        """The API root, as a backend's base_url (Anthropic's is https://api.anthropic.com)."""
        return f"http://127.0.0.1:{self.port}"

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/messages", self._messages)]

    def requests_for(self, model: str) -> list[Seen]:
        return [seen for seen in self.received if seen.body.get("model") == model]

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(Seen(request.path, dict(request.query), dict(request.headers), body))
        if request.headers.get("x-api-key") != ANTHROPIC_KEY:
            return _error(401, "authentication_error", "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return _error(400, "invalid_request_error", "anthropic-version: header is required")
        problem = self._problem(body)
        if problem:
            return _error(400, "invalid_request_error", problem)
        model = body["model"]
        if model == "claude-overloaded":
            return _error(529, "overloaded_error", "Overloaded")
        if model.startswith("claude-ratelimit-"):
            return _error(429, "rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit",
                          {"retry-after": model.rpartition("-")[2]})
        if model == "claude-invalid":
            return _error(400, "invalid_request_error", "messages.0.content: the internal host 10.1.2.3 says no")
        wants_tool = bool(body.get("tools")) and not any(
            block.get("type") == "tool_result" for message in body["messages"] for block in message["content"]
            if isinstance(message["content"], list))
        if body.get("stream"):
            return await self._stream(request, model, wants_tool)
        content: list[dict[str, Any]] = [{"type": "text", "text": "".join(TEXT_DELTAS)}]
        if wants_tool:
            content = [{"type": "text", "text": "Let me look."}, {
                "type": "tool_use", "id": "toolu_01A", "name": body["tools"][0]["name"], "input": TOOL_INPUT}]
        return web.json_response({
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": "tool_use" if wants_tool else "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": INPUT_TOKENS, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": CACHE_READ_TOKENS, "output_tokens": 5}})

    @staticmethod
    def _problem(body: Any) -> str | None:
        """What the Messages API refuses of a body (the parts the gateway's translation could get wrong)."""
        if not isinstance(body.get("max_tokens"), int):
            return "max_tokens: Field required"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "messages: Field required"
        for index, message in enumerate(messages):
            if message.get("role") not in ("user", "assistant"):
                return f"messages.{index}.role: Input should be 'user' or 'assistant'"
            if index and messages[index - 1]["role"] == message["role"]:
                return "messages: roles must alternate between \"user\" and \"assistant\""
            content = message.get("content")
            if isinstance(content, list) and any(block.get("type") == "text" and not block.get("text")
                                                 for block in content):
                return f"messages.{index}.content: text content blocks must be non-empty"
        if body.get("temperature") is not None and not 0 <= body["temperature"] <= 1:
            return "temperature: Input should be less than or equal to 1"
        return None

    async def _stream(self, request: web.Request, model: str, wants_tool: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(_event("message_start", {"type": "message_start", "message": {
            "id": "msg_01StreamStreamStream", "type": "message", "role": "assistant", "content": [], "model": model,
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": INPUT_TOKENS, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": CACHE_READ_TOKENS, "output_tokens": 1}}}))
        await response.write(_event("content_block_start", {
            "type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}))
        await response.write(_event("ping", {"type": "ping"}))
        deltas = ("Let me look.",) if wants_tool else TEXT_DELTAS
        for text in deltas:
            await response.write(_event("content_block_delta", {
                "type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}))
            if model == "claude-midstream":
                await response.write(_event("error", {
                    "type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
                return response
        await response.write(_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
        if wants_tool:
            await response.write(_event("content_block_start", {
                "type": "content_block_start", "index": 1,
                "content_block": {"type": "tool_use", "id": "toolu_01A", "name": "weather", "input": {}}}))
            arguments = json.dumps(TOOL_INPUT)
            for part in (arguments[:5], arguments[5:]):
                await response.write(_event("content_block_delta", {
                    "type": "content_block_delta", "index": 1,
                    "delta": {"type": "input_json_delta", "partial_json": part}}))
            await response.write(_event("content_block_stop", {"type": "content_block_stop", "index": 1}))
        await response.write(_event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": "tool_use" if wants_tool else "end_turn",
                                               "stop_sequence": None}, "usage": {"output_tokens": 6}}))
        await response.write(_event("message_stop", {"type": "message_stop"}))
        await response.write_eof()
        return response


def _azure_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


NOT_FOUND = ("404", "Resource not found")
FILTERED = {name: {"filtered": False, "severity": "safe"} for name in ("hate", "self_harm", "sexual", "violence")}


class FakeAzure(ThreadedServer):
    name = "fake-azure"

    def __init__(self, deployments: dict[str, str]) -> None:
        super().__init__()
        self.deployments = deployments
        self.received: list[Seen] = []

    @property
    def url(self) -> str:
        """The resource endpoint, as a backend's base_url (https://<resource>.openai.azure.com)."""
        return f"http://127.0.0.1:{self.port}"

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/{tail:.*}", self._post)]

    def requests_for(self, deployment: str) -> list[Seen]:
        return [seen for seen in self.received if seen.path.startswith(f"/openai/deployments/{deployment}/")]

    async def _post(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(Seen(request.path, dict(request.query), dict(request.headers), body))
        if request.headers.get("api-key") != AZURE_KEY:
            return _azure_error(401, "401", "Access denied due to invalid subscription key or wrong API endpoint. "
                                            "Make sure to provide a valid key for an active subscription and use a "
                                            "correct regional API endpoint for your resource.")
        parts = request.path.split("/")
        operation = "/".join(parts[4:])
        if (len(parts) < 5 or parts[:3] != ["", "openai", "deployments"] or operation not in (
                "chat/completions", "embeddings") or request.query.get("api-version") not in AZURE_API_VERSIONS):
            return _azure_error(404, *NOT_FOUND)
        behaviour = self.deployments.get(parts[3])
        if behaviour is None:
            return _azure_error(404, "DeploymentNotFound", "The API deployment for this resource does not exist. If "
                                "you created the deployment within the last 5 minutes, please wait a moment and try "
                                "again.")
        if behaviour == "busy":
            return _azure_error(429, "429", "Requests to the ChatCompletions_Create Operation under Azure OpenAI API "
                                "version 2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing "
                                "tier. Please retry after 9 seconds.", {"Retry-After": "9"})
        if operation == "embeddings":
            if behaviour != "embed":
                return _azure_error(400, "OperationNotSupported", "The embeddings operation does not work with the "
                                    "specified model. Please choose different model and try again.")
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            return web.json_response({"object": "list", "model": "text-embedding-3-small", "data": [
                {"object": "embedding", "index": index, "embedding": [0.5, -0.5, float(index)]}
                for index in range(len(inputs))], "usage": {"prompt_tokens": 3, "total_tokens": 3}})
        if body.get("stream"):
            return await self._stream(request, body)
        return web.json_response({
            "id": "chatcmpl-AzUrE", "object": "chat.completion", "created": 1_727_000_000, "model": AZURE_MODEL,
            "system_fingerprint": "fp_azure",
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": FILTERED}],
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None, "content_filter_results": FILTERED,
                         "message": {"role": "assistant", "content": "Hello from Azure", "refusal": None}}],
            "usage": {"prompt_tokens": AZURE_PROMPT_TOKENS, "completion_tokens": 3, "total_tokens": 12}})

    @staticmethod
    async def _stream(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return b"data: " + json.dumps({
                "id": "chatcmpl-AzStream", "object": "chat.completion.chunk", "created": 1_727_000_000,
                "model": AZURE_MODEL, "system_fingerprint": "fp_azure", "choices": choices, **extra}).encode() + b"\n\n"

        # Azure opens every stream with the prompt's filter results: no choices, empty id and model.
        await response.write(b"data: " + json.dumps({
            "choices": [], "created": 0, "id": "", "model": "", "object": "",
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": FILTERED}]}).encode() + b"\n\n")
        await response.write(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None}]))
        for text in ("Hello", " from", " Azure"):
            await response.write(chunk([{"index": 0, "delta": {"content": text}, "finish_reason": None,
                                         "content_filter_results": FILTERED}]))
        await response.write(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(chunk([], usage={"prompt_tokens": AZURE_PROMPT_TOKENS, "completion_tokens": 3,
                                                  "total_tokens": 12}))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
