"""Real OpenAI-compatible backends for the tests: an aiohttp server in its own thread, behaving as its model says.

The `model` a request names selects the behaviour (or `FakeBackend.behaviours[model]` overrides it at run time):
  ok                 answers at once (streams: 3 chunks, then a usage chunk)
  paced-N-D          streams N chunks D ms apart, then a usage chunk
  nousage-N          streams N chunks and no usage chunk
  gated-N            streams 1 chunk, waits for `gate` to be set, then the other N-1
  cut-N              streams N chunks, then drops the connection (no [DONE])
  chop-N             streams like cut-N; not streamed: half of the answer's promised bytes, then drops the connection
  stall-N-S          streams N chunks, then waits S seconds (or until its client goes away) before the rest;
                     not streamed: waits S seconds, then answers like ok
  fail               HTTP 500
  refuse             HTTP 400 (a refusal of the request, not a failing backend)
  redirect-PORT      HTTP 307 to the same path on 127.0.0.1:PORT
  ratelimit-S        HTTP 429 with Retry-After: S
  slow-S             sleeps S seconds, then answers like ok
  garbage            HTTP 200 whose body is not JSON
  liar               answers like ok, with a usage no real call has (2**40 tokens in, -5 out)
The media routes (images, audio transcriptions and speech) answer in OpenAI's formats; a transcription's form is
recorded as its fields, with `file` as {filename, content_type, size}.
Every request is recorded (path, body, Authorization) with an event set when its client went away.
"""

import asyncio
import base64
import io
import json
import re
import secrets
import struct
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import wave
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
import redis as sync_redis
from aiohttp import BodyPartReader, web

from appliance import devstack
from tests.support.env import create_key, node_env, s3_client
from tests.support.http import http_ok
from tests.support.processes import REPO, ModeProcess, command_env, scaigrid
from tests.threaded_server import ThreadedServer

PROMPT_TOKENS = 11
CREATED = 1_700_000_000
EMBEDDING_DIMENSIONS = 4
TRANSCRIPT = "hello from the audio"
AUDIO_SECONDS = 3  # what a transcription says the audio lasted (usage.seconds, duration, the last cue)
SPEECH_CONTENT_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
                        "wav": "audio/wav", "pcm": "audio/pcm"}
REFUSAL_TEXT = "the internal host 10.9.8.7 says: bad request"  # what a backend's 400 says ("refuse")


@dataclass
class Received:
    path: str
    body: dict[str, Any]
    authorization: str | None
    gone: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": CREATED, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class FakeBackend(ThreadedServer):
    name = "fake-backend"

    def __init__(self) -> None:
        super().__init__()
        self.received: list[Received] = []
        self.behaviours: dict[str, str] = {}
        self.gate = threading.Event()

    @property
    def url(self) -> str:
        """The OpenAI API root, as a backend's base_url."""
        return f"http://127.0.0.1:{self.port}/v1"

    def releasing(self) -> None:
        self.gate.set()

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/chat/completions", self._chat), web.post("/v1/embeddings", self._embeddings),
                web.post("/v1/images/generations", self._images),
                web.post("/v1/audio/transcriptions", self._transcriptions),
                web.post("/v1/audio/speech", self._speech)]

    def requests_for(self, model: str) -> list[Received]:
        return [r for r in self.received if r.body.get("model") == model]

    async def _record(self, request: web.Request) -> tuple[Received, str]:
        body = await request.json()
        received = Received(request.path, body, request.headers.get("Authorization"))
        self.received.append(received)
        model = str(body.get("model", ""))
        return received, self.behaviours.get(model, model)

    async def _refusal(self, behaviour: str) -> web.Response | None:
        """The answers that are not a success, shared by both routes."""
        if behaviour == "fail":
            return web.json_response({"error": {"message": "the model crashed", "type": "server_error"}}, status=500)
        if behaviour == "refuse":
            return web.json_response({"error": {"message": REFUSAL_TEXT, "type": "invalid_request_error"}},
                                     status=400)
        if match := re.fullmatch(r"redirect-(\d+)", behaviour):
            raise web.HTTPTemporaryRedirect(f"http://127.0.0.1:{match[1]}/v1/chat/completions")
        if match := re.fullmatch(r"ratelimit-(\d+)", behaviour):
            return web.json_response({"error": {"message": "slow down", "type": "rate_limit"}}, status=429,
                                     headers={"Retry-After": match[1]})
        if behaviour == "garbage":
            return web.Response(text="<html>proxy error</html>", content_type="application/json")
        if match := re.fullmatch(r"slow-([\d.]+)", behaviour):
            await asyncio.sleep(float(match[1]))  # a slow backend is the behaviour asked for, not an ordering wait
        return None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        received, behaviour = await self._record(request)
        try:
            refusal = await self._refusal(behaviour)
            if refusal is not None:
                return refusal
            model = str(received.body["model"])
            if not received.body.get("stream"):
                if match := re.fullmatch(r"stall-\d+-([\d.]+)", behaviour):
                    await asyncio.sleep(float(match[1]))  # the stall asked for; a client that goes away cancels it
                if behaviour.startswith("chop-"):
                    return await self._chopped(request, model)
                return web.json_response({
                    "id": "chatcmpl-test", "object": "chat.completion", "created": CREATED, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello there"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 2**40, "completion_tokens": -5} if behaviour == "liar" else
                    {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 2, "total_tokens": 13}})
            return await self._stream(request, received, behaviour, model)
        except (asyncio.CancelledError, ConnectionResetError):
            received.gone.set()
            raise
        finally:
            received.finished.set()

    async def _stream(self, request: web.Request, received: Received, behaviour: str,
                      model: str) -> web.StreamResponse:
        chunks, interval_s, usage, cut = 3, 0.0, True, False
        if match := re.fullmatch(r"paced-(\d+)-(\d+)", behaviour):
            chunks, interval_s = int(match[1]), int(match[2]) / 1000
        elif match := re.fullmatch(r"(nousage|gated|cut|chop)-(\d+)", behaviour):
            chunks = int(match[2])
            usage, cut = match[1] != "nousage", match[1] in ("cut", "chop")
        stall_s = 0.0
        if match := re.fullmatch(r"stall-(\d+)-([\d.]+)", behaviour):
            chunks, stall_s = int(match[1]), float(match[2])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_sse(_chunk(model, {"role": "assistant", "content": ""})))
        for index in range(chunks):
            if index and interval_s:
                await asyncio.sleep(interval_s)  # the pace asked for between chunks, not an ordering wait
            if index == 1 and behaviour.startswith("gated"):
                await asyncio.get_running_loop().run_in_executor(None, self.gate.wait)
            await response.write(_sse(_chunk(model, {"content": f"tok{index} "})))
        if cut:
            assert request.transport is not None
            request.transport.close()
            return response
        if stall_s:
            await asyncio.sleep(stall_s)  # the stall asked for; a client that goes away cancels it
        await response.write(_sse(_chunk(model, {}, "stop")))
        if usage:
            await response.write(_sse({
                "id": "chatcmpl-test", "object": "chat.completion.chunk", "created": CREATED, "model": model,
                "choices": [], "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": chunks,
                                         "total_tokens": PROMPT_TOKENS + chunks}}))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    @staticmethod
    async def _chopped(request: web.Request, model: str) -> web.StreamResponse:
        """An answer whose Content-Length promises more than is sent before the connection drops."""
        body = json.dumps({"id": "chatcmpl-test", "object": "chat.completion", "created": CREATED, "model": model,
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello there"},
                                        "finish_reason": "stop"}]}).encode()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[:len(body) // 2])
        assert request.transport is not None
        request.transport.close()
        return response

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        received, behaviour = await self._record(request)
        try:
            refusal = await self._refusal(behaviour)
            if refusal is not None:
                return refusal
            body = received.body
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            dimensions = int(body.get("dimensions") or EMBEDDING_DIMENSIONS)
            data = []
            for index in range(len(inputs)):
                vector = [float(index + 1)] * dimensions
                encoded: Any = vector
                if body.get("encoding_format") == "base64":
                    encoded = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
                data.append({"object": "embedding", "index": index, "embedding": encoded})
            tokens = sum(len(text.split()) for text in inputs)
            return web.json_response({"object": "list", "data": data, "model": body["model"],
                                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        finally:
            received.finished.set()


    async def _images(self, request: web.Request) -> web.StreamResponse:
        received, behaviour = await self._record(request)
        try:
            if (refusal := await self._refusal(behaviour)) is not None:
                return refusal
            body = received.body
            data: list[dict[str, Any]] = []
            for index in range(int(body.get("n") or 1)):
                if body.get("response_format") == "b64_json":
                    data.append({"b64_json": base64.b64encode(image_bytes(index)).decode(),
                                 "revised_prompt": "revised: " + body["prompt"]})
                else:
                    data.append({"url": f"https://images.example/{index}.png"})
            return web.json_response({"created": CREATED, "data": data})
        finally:
            received.finished.set()

    async def _transcriptions(self, request: web.Request) -> web.StreamResponse:
        fields: dict[str, Any] = {}
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            assert isinstance(part, BodyPartReader)
            if part.filename is not None:
                content = await part.read()
                fields[str(part.name)] = {"filename": part.filename, "size": len(content),
                                          "content_type": part.headers.get("Content-Type")}
            else:
                fields[str(part.name)] = await part.text()
        received = Received(request.path, fields, request.headers.get("Authorization"))
        self.received.append(received)
        behaviour = self.behaviours.get(str(fields.get("model")), str(fields.get("model")))
        try:
            if (refusal := await self._refusal(behaviour)) is not None:
                return refusal
            fmt = fields.get("response_format") or "json"
            if fmt == "text":
                return web.Response(text=TRANSCRIPT + "\n", content_type="text/plain")
            if fmt in ("srt", "vtt"):
                comma = "," if fmt == "srt" else "."
                cue = f"00:00:00{comma}000 --> 00:00:0{AUDIO_SECONDS}{comma}000\n{TRANSCRIPT}\n\n"
                return web.Response(text=("1\n" + cue) if fmt == "srt" else "WEBVTT\n\n" + cue,
                                    content_type="text/plain")
            if fmt == "verbose_json":
                return web.json_response({"task": "transcribe", "language": fields.get("language") or "english",
                                          "duration": float(AUDIO_SECONDS), "text": TRANSCRIPT, "segments": []})
            return web.json_response({"text": TRANSCRIPT, "usage": {"type": "duration", "seconds": AUDIO_SECONDS}})
        finally:
            received.finished.set()

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        received, behaviour = await self._record(request)
        try:
            if (refusal := await self._refusal(behaviour)) is not None:
                return refusal
            audio = speech_bytes(received.body["input"])
            fmt = received.body.get("response_format") or "mp3"
            response = web.StreamResponse(headers={"Content-Type": SPEECH_CONTENT_TYPES[fmt]})
            await response.prepare(request)
            for start in range(0, len(audio), 1024):  # in pieces, as a real backend streams its audio
                await response.write(audio[start:start + 1024])
            await response.write_eof()
            return response
        finally:
            received.finished.set()


def image_bytes(index: int) -> bytes:
    """The bytes of the fake image number `index` (a b64_json answer carries them)."""
    return b"\x89PNG\r\n\x1a\n" + bytes([index]) * 16


def wav(seconds: int, rate: int = 8000) -> bytes:
    """A silent mono 16-bit WAV of `seconds`, as a client uploads for transcription (its length is what is billed)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(2)
        audio.setframerate(rate)
        audio.writeframes(b"\0\0" * rate * seconds)
    return out.getvalue()


def speech_bytes(text: str) -> bytes:
    """The fake audio a speech request for `text` answers with: more than one piece of 1024 bytes."""
    return b"ID3" + text.encode() * (4096 // max(1, len(text.encode())) + 1)


# --- the catalogue, the way an operator writes it ---

def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {_toml(item)}" for key, item in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    raise TypeError(type(value))


def catalogue_toml(backends: list[dict[str, Any]], models: list[dict[str, Any]]) -> str:
    tables = [("backends", item) for item in backends] + [("models", item) for item in models]
    return "\n".join(f"[[{name}]]\n" + "".join(f"{key} = {_toml(value)}\n" for key, value in item.items())
                     for name, item in tables)


def backend(backend_id: str, server: FakeBackend, model: str, **extra: Any) -> dict[str, Any]:
    return {"id": backend_id, "provider": "custom", "base_url": server.url, "model": model, **extra}


def chat_model(slug: str, routes: list[tuple[str, int, int]], **extra: Any) -> dict[str, Any]:
    """A chat model routed to (backend, weight, priority) triples."""
    return {"slug": slug, "modality": "chat", **extra,
            "routes": [{"backend": b, "weight": w, "priority": p} for b, w, p in routes]}


def apply(env: dict[str, str], path: Path, backends: list[dict[str, Any]], models: list[dict[str, Any]]) -> None:
    """`scaigrid admin apply` of a catalogue file written to `path`."""
    path.write_text(catalogue_toml(backends, models))
    result = scaigrid("admin", "apply", str(path), env=env)
    assert result.returncode == 0, result.stdout + result.stderr


# Generous limits: these tests are about inference, not rate limiting.
GATEWAY_SETTINGS = {"RATE_LIMIT_KEY_RPM": "100000", "RATE_LIMIT_USER_RPM": "100000",
                    "RATE_LIMIT_TENANT_RPM": "100000", "RATE_LIMIT_PARTNER_RPM": "100000"}


@contextmanager
def shared_env(mariadb: devstack.MariaDB, redis_server: devstack.Redis, s3_server: devstack.S3Server
               ) -> Iterator[dict[str, str]]:
    """A migrated node's settings on a database of its own, for fixtures that outlive one test."""
    name = "t_" + secrets.token_hex(6)
    database_url = mariadb.create_database(name, name, secrets.token_hex(12))
    bucket = "t-" + secrets.token_hex(6)
    s3_client(s3_server).make_bucket(bucket)
    with sync_redis.Redis(port=redis_server.port) as client:
        client.flushall()
    env = {**node_env(database_url, redis_server.url, s3_server, bucket), **GATEWAY_SETTINGS}
    result = scaigrid("migrate", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    try:
        yield env
    finally:
        mariadb.drop_database(name)


@contextmanager
def mode_process(mode: str, env: dict[str, str], log_path: Path, ready: Callable[[], bool]
                 ) -> Iterator[ModeProcess]:
    """A mode process (like conftest's start_mode, for any fixture scope), once `ready`; killed at the end."""
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "scaigrid", "run", "--mode", mode],
                                   env=command_env(env), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    running = ModeProcess(mode, process, log_path)
    try:
        running.wait_for(ready, what="readiness")
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def http_process(env: dict[str, str], log_path: Path) -> AbstractContextManager[ModeProcess]:
    return mode_process("http", env, log_path, lambda: http_ok(f"http://127.0.0.1:{env['HTTP_PORT']}/health/ready"))


@contextmanager
def two_http_processes(env: dict[str, str], log_dir: Path, **second_env: str) -> Iterator[tuple[str, str]]:
    """Two http processes of one node (same database and Redis), the second on a port of its own with `second_env`
    on top of `env`: their base URLs."""
    other = {**env, **second_env, "HTTP_PORT": str(devstack.free_port())}
    with http_process(env, log_dir / "http-a.log"), http_process(other, log_dir / "http-b.log"):
        yield f"http://127.0.0.1:{env['HTTP_PORT']}", f"http://127.0.0.1:{other['HTTP_PORT']}"


@dataclass
class Gateway:
    """A node serving a catalogue of fake backends, and a tenant_user key of the default tenant."""

    env: dict[str, str]
    key: str
    clients: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['HTTP_PORT']}"

    def client(self, key: str | None = None) -> openai.OpenAI:
        """An OpenAI SDK client on /oai/v1 (no retries, so every error is the node's); closed after the test."""
        client = openai.OpenAI(base_url=self.url + "/oai/v1", api_key=key or self.key, max_retries=0, timeout=20)
        self.clients.append(client)
        return client

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/oai/v1", api_key=self.key, max_retries=0, timeout=20)

    def close_clients(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()


@contextmanager
def serving(env: dict[str, str], tmp_path: Path, backends: list[dict[str, Any]], models: list[dict[str, Any]]
            ) -> Iterator[Gateway]:
    """The catalogue applied, then an http process serving it, with a tenant_user key."""
    apply(env, tmp_path / "catalogue.toml", backends, models)
    with http_process(env, tmp_path / "http.log"):
        yield Gateway(env, create_key(env, "tenant_user"))


# Fixtures for the test modules that import them; `gateway` needs a module-scoped `node_gateway` of the module's own.

@pytest.fixture(name="fake", scope="module")
def fake_fixture() -> Iterator[FakeBackend]:
    server = FakeBackend().start()
    yield server
    server.stop()


@pytest.fixture(name="gateway")
def gateway_fixture(node_gateway: Gateway, fake: FakeBackend) -> Iterator[Gateway]:
    """The module's node, with the backend's record of requests cleared and the test's SDK clients closed after."""
    fake.received.clear()
    yield node_gateway
    node_gateway.close_clients()


# --- plain HTTP with a key, for the native API ---

def http_call(method: str, url: str, key: str, body: Any = None, timeout_s: float = 20, raw: bytes | None = None
              ) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request, errors included; `raw` is sent as the body as it is."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


USER = [{"role": "user", "content": "hi"}]


def chat_call(url: str, key: str, model: str) -> tuple[int, bytes]:
    """(status, body) of one native chat request saying hi to `model`, errors included."""
    status, _, body = http_call("POST", url + "/v1/inference/chat", key, {"model": model, "messages": USER})
    return status, body


def models_listed(url: str, key: str) -> set[str]:
    status, _, body = http_call("GET", url + "/oai/v1/models", key)
    return {item["id"] for item in json.loads(body)["data"]} if status == 200 else set()
