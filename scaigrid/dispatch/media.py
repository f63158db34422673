"""Images and audio: OpenAI's media calls relayed to OpenAI-compatible backends, and priced per unit.

They take the chat pipeline's path (Dispatcher.relay: routing, failover, breakers; the gateway's rate limits and
budgets before it; one usage record after it), and are priced at the model's per-unit prices besides its token
prices: per image, per second of transcribed audio, per million characters of speech input.

An upload is spooled to a temporary file as it arrives (never whole in memory), bounded by MAX_UPLOAD_BYTES, so
that failing over to another backend can send it again.
"""

import asyncio
import contextlib
import json
import logging
import os
import re
import tempfile
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp
from aiohttp import BodyPartReader, web

from scaigrid import errors
from scaigrid.appkeys import DISPATCHER, SETTINGS
from scaigrid.dispatch.failures import Failure
from scaigrid.dispatch.pipeline import NATIVE, Exchange, usage_tokens
from scaigrid.dispatch.transport import HttpTransport, upstream_body
from scaigrid.errors import FieldError
from scaigrid.routing.catalogue import Backend

logger = logging.getLogger(__name__)

IMAGES_PATH, TRANSCRIPTIONS_PATH, SPEECH_PATH = "/images/generations", "/audio/transcriptions", "/audio/speech"
MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # OpenAI's own limit for an audio file
FORM_OVERHEAD_BYTES = 64 * 1024  # a form's other fields and boundaries, on top of the file
MAX_FIELD_BYTES = 32 * 1024  # one text field of the form (a prompt)
CHUNK_BYTES = 64 * 1024
JSON_FORMATS = ("json", "verbose_json")
# The end time of a subtitle cue (srt: 00:00:01,500; vtt: 00:00:01.500): the last one is the audio's length.
_CUE_TIME = re.compile(rb"(\d+):([0-5]\d):([0-5]\d)[,.](\d{3})")
_NOT_AUDIO = ("application/json", "text/")


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise Failure("shape", "the answer is not JSON") from None


# --- images ---

async def generate_images(exchange: Exchange, body: dict[str, Any]) -> bytes:
    """OpenAI's answer {created, data: [{url | b64_json, revised_prompt?}]}; priced per image returned."""
    payload = {**exchange.model.default_params, **body}

    async def attempt(transport: HttpTransport, backend: Backend) -> tuple[bytes, dict[str, Any]]:
        response = await transport.send(backend, IMAGES_PATH, upstream_body(dict(payload), backend.model),
                                        "application/json", exchange.request)
        async with response:
            raw = await response.read()
        answer = _json(raw)
        if not isinstance(answer, dict) or not isinstance(answer.get("data"), list):
            raise Failure("shape", "the answer lacks `data`")
        return raw, answer

    raw, answer = await exchange.request.app[DISPATCHER].relay(exchange, attempt)
    usage = answer.get("usage")  # gpt-image models count tokens: input_tokens, output_tokens
    if isinstance(usage, dict):
        exchange.tokens_in, exchange.tokens_out = usage_tokens(
            {"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens")})
    exchange.unit_cost = exchange.model.price_per_image * len(answer["data"])
    return raw


# --- transcription: a multipart upload ---

@dataclass
class Upload:
    """A transcription form: its text fields in order, and its file spooled to `path`."""

    fields: dict[str, str] = field(default_factory=dict)
    path: str | None = None
    filename: str = "audio"
    content_type: str = "application/octet-stream"


def _too_large() -> errors.ScaigridError:
    return errors.request_too_large(MAX_UPLOAD_BYTES + FORM_OVERHEAD_BYTES)


async def _spool(part: BodyPartReader, upload: Upload) -> None:
    # Written as it arrives: local disk writes of 64 KiB take microseconds, less than a thread hop would.
    descriptor, upload.path = tempfile.mkstemp(prefix="scaigrid-upload-")
    size = 0
    with os.fdopen(descriptor, "wb") as spooled:
        while chunk := await part.read_chunk(CHUNK_BYTES):
            size += len(chunk)
            if size > MAX_UPLOAD_BYTES:
                raise _too_large()
            spooled.write(chunk)


@contextlib.asynccontextmanager
async def read_upload(request: web.Request) -> AsyncIterator[Upload]:
    """The form of a transcription, its file spooled to disk (removed at the end); 413 past MAX_UPLOAD_BYTES."""
    if request.content_length is not None and request.content_length > MAX_UPLOAD_BYTES + FORM_OVERHEAD_BYTES:
        raise _too_large()
    if request.content_type != "multipart/form-data":
        raise errors.validation_error([FieldError("body", "a multipart/form-data body with a `file` part")],
                                      "the request body is not a form")
    upload = Upload()
    try:
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader) or not part.name:
                    raise ValueError("a nested or unnamed part")
                if part.name == "file":
                    if upload.path is not None:
                        raise ValueError("two `file` parts")
                    upload.filename = part.filename or upload.filename
                    upload.content_type = part.headers.get("Content-Type", upload.content_type)
                    await _spool(part, upload)
                    continue
                value = bytearray()
                while chunk := await part.read_chunk(CHUNK_BYTES):
                    value += chunk
                    if len(value) > MAX_FIELD_BYTES:
                        raise errors.validation_error([FieldError(part.name, f"at most {MAX_FIELD_BYTES} bytes")])
                upload.fields[part.name] = value.decode()
        except (ValueError, AssertionError, aiohttp.ClientError) as exc:  # aiohttp's parser asserts on some forms
            raise errors.validation_error([FieldError("body", f"not a readable form ({type(exc).__name__})")],
                                          "the request body is not a form") from None
        yield upload
    finally:
        if upload.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(upload.path)


def _form(upload: Upload, backend: Backend) -> aiohttp.FormData:
    """A new form for each attempt: aiohttp closes the file it has sent."""
    form = aiohttp.FormData()
    for name, value in upload.fields.items():
        form.add_field(name, backend.model if name == "model" else value)
    assert upload.path is not None
    form.add_field("file", open(upload.path, "rb"), filename=upload.filename,  # noqa: SIM115 (aiohttp closes it)
                   content_type=upload.content_type)
    return form


def _seconds(fmt: str, answer: Any, raw: bytes, upload: Upload) -> Decimal:
    """How long the audio was: as the answer says (usage.seconds, verbose_json's duration, the last subtitle cue),
    else from the file when it is WAV; 0 when neither says."""
    if isinstance(answer, dict):
        usage = answer.get("usage")
        for value in (usage.get("seconds") if isinstance(usage, dict) else None, answer.get("duration")):
            if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1e9:
                return Decimal(str(value))
    if fmt in ("srt", "vtt"):
        ends = [int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000 for h, m, s, ms in _CUE_TIME.findall(raw)]
        if ends:
            return Decimal(str(max(ends)))
    assert upload.path is not None
    try:
        with wave.open(upload.path, "rb") as audio:
            return Decimal(audio.getnframes()) / audio.getframerate()
    except (wave.Error, EOFError, ZeroDivisionError, OSError):
        return Decimal(0)


async def transcribe(exchange: Exchange, upload: Upload) -> web.Response:
    """The backend's answer as it came (JSON, text, srt or vtt), with its content type; the native surface puts a
    JSON answer in its envelope. Priced per second of audio."""
    fmt = upload.fields.get("response_format") or "json"

    async def attempt(transport: HttpTransport, backend: Backend) -> tuple[bytes, str, Any]:
        response = await transport.send(backend, TRANSCRIPTIONS_PATH, _form(upload, backend), None, exchange.request)
        async with response:
            raw = await response.read()
        answer = _json(raw) if fmt in JSON_FORMATS else None
        if fmt in JSON_FORMATS and not (isinstance(answer, dict) and isinstance(answer.get("text"), str)):
            raise Failure("shape", "the answer lacks `text`")
        return raw, response.headers.get("Content-Type", ""), answer

    raw, content_type, answer = await exchange.request.app[DISPATCHER].relay(exchange, attempt)
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if isinstance(usage, dict) and usage.get("type") == "tokens":  # gpt-4o-transcribe counts tokens
        exchange.tokens_in, exchange.tokens_out = usage_tokens(
            {"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens")})
    exchange.unit_cost = exchange.model.price_per_audio_second * _seconds(fmt, answer, raw, upload)
    if fmt in JSON_FORMATS:
        body = raw if exchange.protocol != NATIVE else b'{"status":"ok","data":' + raw + b"}"
        return web.Response(body=body, content_type="application/json")
    media_type, _, _ = content_type.partition(";")
    return web.Response(body=raw, content_type=media_type.strip() or "text/plain", charset="utf-8")


# --- speech: raw audio bytes, streamed through ---

async def synthesize(exchange: Exchange, body: dict[str, Any]) -> web.StreamResponse:
    """The backend's audio, streamed to the client as it comes, with its content type; no envelope. Priced per
    character of input, once the backend has started to answer."""
    request = exchange.request
    payload = {**exchange.model.default_params, **body}

    async def attempt(transport: HttpTransport, backend: Backend) -> aiohttp.ClientResponse:
        response = await transport.send(backend, SPEECH_PATH, upstream_body(dict(payload), backend.model),
                                        "application/json", request)
        if response.headers.get("Content-Type", "").startswith(_NOT_AUDIO):
            response.close()
            raise Failure("shape", f"asked for audio, the backend answered {response.headers['Content-Type']}")
        return response

    upstream = await request.app[DISPATCHER].relay(exchange, attempt)
    exchange.unit_cost = exchange.model.price_per_mchar * len(body["input"]) / 1_000_000
    client = web.StreamResponse(headers={"Content-Type": upstream.headers.get("Content-Type",
                                                                              "application/octet-stream")})
    try:
        await client.prepare(request)
        async with asyncio.timeout(request.app[SETTINGS].dispatch.stream_timeout_s):
            async for chunk in upstream.content.iter_any():
                await client.write(chunk)
        await client.write_eof()
        exchange.answered = True
    except ConnectionResetError:
        exchange.status = "CLIENT_CLOSED"
    except (aiohttp.ClientError, TimeoutError) as exc:
        # Raw bytes have no error frame: the client sees the answer cut short, and the record says why.
        exchange.status = "BACKEND_TIMEOUT" if isinstance(exc, TimeoutError) else "BACKEND_ERROR"
        logger.warning("speech from backend %s broke after it started: %s", exchange.backend and exchange.backend.id,
                       type(exc).__name__, extra={"event": "stream_broken"})
        if request.transport is not None:
            request.transport.close()
    finally:
        upstream.close()
    return client
