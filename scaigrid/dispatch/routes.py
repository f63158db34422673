"""Inference routes: native /v1/inference/* and /v1/models, OpenAI-compatible /oai/v1/*, backend health."""

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from scaigrid import errors
from scaigrid.access import requires
from scaigrid.appkeys import DB, DISPATCHER, PRINCIPAL, STARTED
from scaigrid.auth.service_tokens import OPERATOR
from scaigrid.dispatch import media, schemas
from scaigrid.dispatch.metrics import BACKEND_INFLIGHT
from scaigrid.dispatch.pipeline import NATIVE, OAI, Exchange
from scaigrid.envelope import DEFAULT_PAGE, MAX_PAGE, PAGE, ok
from scaigrid.errors import FieldError
from scaigrid.fields import decimal_text, json_object
from scaigrid.routing import store
from scaigrid.routing.catalogue import MODALITIES, MODEL_SLUG, MODEL_STATUSES, Model

# Which route serves which modality, and where a client should go instead.
_ROUTE_FOR = {"chat": "/v1/inference/chat (or /oai/v1/chat/completions)",
              "embedding": "/v1/inference/embed (or /oai/v1/embeddings)",
              "image": "/v1/inference/images/generate (or /oai/v1/images/generations)",
              "audio": "/v1/inference/audio/transcribe|synthesize (or /oai/v1/audio/transcriptions|speech)"}


def chat_payload(model: Model, body: dict[str, Any]) -> tuple[dict[str, Any], bool, bool]:
    """(upstream body, streamed?, forward the usage chunk?): defaults under the client's values, output capped.

    `metadata` stays with ScaiGrid. Without a limit from the client, the model's max_output_tokens is sent, so the
    cap holds whatever the backend's own default is.
    """
    payload = {**model.default_params, **body}
    payload.pop("metadata", None)
    cap = model.max_output_tokens
    if cap:
        name = "max_completion_tokens" if payload.get("max_completion_tokens") is not None else "max_tokens"
        given = payload.get(name)
        payload[name] = cap if given is None or given > cap else given
    stream = payload.get("stream") is True
    forward_usage = False
    if stream:
        options = payload.get("stream_options") or {}
        forward_usage = bool(options.get("include_usage"))
        payload["stream_options"] = {**options, "include_usage": True}  # accounting needs the usage chunk
    return payload, stream, forward_usage


def _model_for(request: web.Request, slug: str, modality: str) -> Model:
    model = request.app[DISPATCHER].catalogue.current.model(slug, request[PRINCIPAL].tenant_id)
    if model.modality != modality:
        where = _ROUTE_FOR.get(model.modality, "no inference route of this node")
        raise errors.validation_error(
            [FieldError("model", f"{slug!r} is a {model.modality} model, not a {modality} model; it is served by "
                                 f"{where}")], f"{slug!r} cannot be used here")
    return model


async def _run(request: web.Request, exchange: Exchange, stream: bool, payload: dict[str, Any],
               forward_usage: bool, embeddings: bool) -> web.StreamResponse:
    """Dispatches and answers; every outcome, a client that went away included, is counted and accounted."""
    dispatcher = request.app[DISPATCHER]
    try:
        if stream:
            response = await dispatcher.stream(exchange, payload, forward_usage)
        else:
            answer = await dispatcher.call(exchange, payload, embeddings)
            body = answer if exchange.protocol == OAI else b'{"status":"ok","data":' + answer + b"}"
            response = web.Response(body=body, content_type="application/json")
    except asyncio.CancelledError:
        # A client that closes as soon as it has [DONE] cancels us while we read the backend's last bytes: served.
        if not exchange.answered:
            exchange.status = "CLIENT_CLOSED"
        raise
    except Exception as exc:
        exchange.status = exc.code if isinstance(exc, errors.ScaigridError) else "INTERNAL_ERROR"
        raise
    finally:
        dispatcher.finish(exchange)
    return response


async def _chat(request: web.Request, protocol: str) -> web.StreamResponse:
    started = request[STARTED]  # authentication and admission count as gateway time too
    body = await json_object(request)
    schemas.chat(body)
    model = _model_for(request, body["model"], "chat")
    payload, stream, forward_usage = chat_payload(model, body)
    exchange = Exchange(request, request[PRINCIPAL], model, protocol, started)
    return await _run(request, exchange, stream, payload, forward_usage, embeddings=False)


async def _embed(request: web.Request, protocol: str) -> web.StreamResponse:
    started = request[STARTED]
    body = await json_object(request)
    schemas.embed(body)
    model = _model_for(request, body["model"], "embedding")
    payload = {**model.default_params, **body}
    exchange = Exchange(request, request[PRINCIPAL], model, protocol, started)
    return await _run(request, exchange, False, payload, False, embeddings=True)


@requires("models:use", metered=True)
async def native_chat(request: web.Request) -> web.StreamResponse:
    return await _chat(request, NATIVE)


@requires("models:use", metered=True)
async def native_embed(request: web.Request) -> web.StreamResponse:
    return await _embed(request, NATIVE)


@requires("models:use", metered=True)
async def oai_chat(request: web.Request) -> web.StreamResponse:
    return await _chat(request, OAI)


@requires("models:use", metered=True)
async def oai_embeddings(request: web.Request) -> web.StreamResponse:
    return await _embed(request, OAI)


@requires("models:use", metered=True)
async def native_generate(request: web.Request) -> web.StreamResponse:
    """A text completion from a prompt: served as a chat completion of one user message, answered in the
    text_completion shape (choices[].text)."""
    started = request[STARTED]
    body = await json_object(request)
    schemas.generate(body)
    model = _model_for(request, body["model"], "chat")
    chat = {name: value for name, value in body.items() if name != "prompt"}
    payload, _, _ = chat_payload(model, {**chat, "messages": [{"role": "user", "content": body["prompt"]}]})
    payload.pop("stream", None)  # a default_params stream would ask for SSE this route does not answer with
    payload.pop("stream_options", None)
    exchange = Exchange(request, request[PRINCIPAL], model, NATIVE, started)

    async def serve() -> web.StreamResponse:
        answer = json.loads(await request.app[DISPATCHER].call(exchange, payload, False))
        choices = [choice if isinstance(choice, dict) else {} for choice in answer["choices"]]
        return ok({"id": answer.get("id"), "object": "text_completion", "created": answer.get("created"),
                   "model": model.slug, "usage": answer.get("usage"), "choices": [
                       {"index": choice.get("index", index), "finish_reason": choice.get("finish_reason"),
                        "text": (choice.get("message") or {}).get("content") or ""}
                       for index, choice in enumerate(choices)]})

    return await _served(request, exchange, serve())


# --- images and audio (dispatch/media.py) ---

async def _served(request: web.Request, exchange: Exchange, serve: Awaitable[web.StreamResponse]
                  ) -> web.StreamResponse:
    """`serve`'s answer; every outcome, a client that went away included, counted and accounted (as _run)."""
    try:
        return await serve
    except asyncio.CancelledError:
        if not exchange.answered:
            exchange.status = "CLIENT_CLOSED"
        raise
    except Exception as exc:
        exchange.status = exc.code if isinstance(exc, errors.ScaigridError) else "INTERNAL_ERROR"
        raise
    finally:
        request.app[DISPATCHER].finish(exchange)


async def _images(request: web.Request, protocol: str) -> web.StreamResponse:
    started = request[STARTED]
    body = await json_object(request)
    schemas.image(body)
    model = _model_for(request, body["model"], "image")
    exchange = Exchange(request, request[PRINCIPAL], model, protocol, started)

    async def serve() -> web.StreamResponse:
        answer = await media.generate_images(exchange, body)
        return web.Response(body=answer if protocol == OAI else b'{"status":"ok","data":' + answer + b"}",
                            content_type="application/json")

    return await _served(request, exchange, serve())


async def _transcribe(request: web.Request, protocol: str) -> web.StreamResponse:
    started = request[STARTED]
    async with media.read_upload(request) as upload:
        schemas.transcription(upload.fields, upload.path is not None)
        model = _model_for(request, upload.fields["model"], "audio")
        exchange = Exchange(request, request[PRINCIPAL], model, protocol, started)
        return await _served(request, exchange, media.transcribe(exchange, upload))


async def _synthesize(request: web.Request, protocol: str) -> web.StreamResponse:
    started = request[STARTED]
    body = await json_object(request)
    schemas.speech(body)
    model = _model_for(request, body["model"], "audio")
    exchange = Exchange(request, request[PRINCIPAL], model, protocol, started)
    return await _served(request, exchange, media.synthesize(exchange, body))


@requires("models:use", metered=True)
async def native_images(request: web.Request) -> web.StreamResponse:
    return await _images(request, NATIVE)


@requires("models:use", metered=True)
async def oai_images(request: web.Request) -> web.StreamResponse:
    return await _images(request, OAI)


@requires("models:use", metered=True)
async def native_transcribe(request: web.Request) -> web.StreamResponse:
    return await _transcribe(request, NATIVE)


@requires("models:use", metered=True)
async def oai_transcriptions(request: web.Request) -> web.StreamResponse:
    return await _transcribe(request, OAI)


@requires("models:use", metered=True)
async def native_synthesize(request: web.Request) -> web.StreamResponse:
    return await _synthesize(request, NATIVE)


@requires("models:use", metered=True)
async def oai_speech(request: web.Request) -> web.StreamResponse:
    return await _synthesize(request, OAI)


# --- the model list, both shapes ---

# What each modality offers; per-model flags (tools, vision) are not known to the node.
CAPABILITIES = {"chat": ("chat", "streaming"), "embedding": ("embeddings",), "image": ("images",),
                "audio": ("audio",)}
HEALTHY, DEGRADED, UNAVAILABLE = "healthy", "degraded", "unavailable"
MODEL_QUERY = (*PAGE, "modality", "status")


def native_model(request: web.Request, model: Model) -> dict[str, Any]:
    """The model with its health as this process's dispatcher sees it for the caller's tenant (docs/api.md)."""
    dispatcher, tenant_id, now_s = request.app[DISPATCHER], request[PRINCIPAL].tenant_id, time.time()
    enabled = [route.backend for group in model.groups for route in group]
    active = sum(dispatcher.takes_requests(backend, tenant_id, now_s) for backend in enabled)
    health = HEALTHY if enabled and active == len(enabled) else DEGRADED if active else UNAVAILABLE
    return {
        "id": model.id, "slug": model.slug, "display_name": model.display_name, "description": model.description,
        "modality": model.modality, "capabilities": list(CAPABILITIES.get(model.modality, ())),
        "context_window": model.context_window, "max_output_tokens": model.max_output_tokens,
        **store.prices(model.price_input_per_mtok, model.price_output_per_mtok),
        "price_per_image": decimal_text(model.price_per_image),
        "price_per_audio_second": decimal_text(model.price_per_audio_second),
        "price_per_mchar": decimal_text(model.price_per_mchar),
        "default_params": dict(model.default_params), "status": model.status, "owned_by": model.owned_by,
        "created": model.created_unix, "health_status": health, "active_backend_count": active,
        "total_backend_count": model.route_count,
    }


def oai_model(model: Model) -> dict[str, Any]:
    return {"id": model.slug, "object": "model", "created": model.created_unix, "owned_by": model.owned_by,
            "context_window": model.context_window, "max_output_tokens": model.max_output_tokens}


def _visible_models(request: web.Request) -> list[Model]:
    return request.app[DISPATCHER].catalogue.current.models_for(request[PRINCIPAL].tenant_id)


def _visible_model(request: web.Request) -> Model:
    return request.app[DISPATCHER].catalogue.current.model(request.match_info["slug"], request[PRINCIPAL].tenant_id)


def _model_page(request: web.Request, all_models: list[Model]) -> tuple[list[Model], str | None]:
    """One page of the models (by slug), filtered by ?modality= and ?status=; the cursor is the last slug shown."""
    problems = []
    raw_limit = request.query.get("limit", str(DEFAULT_PAGE))
    limit = int(raw_limit) if raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 9 else 0
    if not 1 <= limit <= MAX_PAGE:
        problems.append(FieldError("limit", f"a whole number 1-{MAX_PAGE}"))
    after = ""
    if cursor := request.query.get("cursor"):
        with contextlib.suppress(ValueError):  # binascii.Error and UnicodeDecodeError are ValueErrors
            after = base64.b64decode(cursor.encode(), altchars=b"-_", validate=True).decode()
        if not MODEL_SLUG.fullmatch(after):
            problems.append(FieldError("cursor", "not a cursor from a previous page"))
    for name, choices in (("modality", MODALITIES), ("status", MODEL_STATUSES)):
        if name in request.query and request.query[name] not in choices:
            problems.append(FieldError(name, "one of: " + ", ".join(choices)))
    if problems:
        raise errors.validation_error(problems, "invalid query parameters")
    wanted = [model for model in all_models if model.slug > after
              and request.query.get("modality", model.modality) == model.modality
              and request.query.get("status", model.status) == model.status]
    shown = wanted[:limit]
    more = len(wanted) > limit
    return shown, base64.urlsafe_b64encode(shown[-1].slug.encode()).decode() if more else None


@requires("models:list", query=MODEL_QUERY)
async def list_models(request: web.Request) -> web.Response:
    """The models the caller's tenant may use (deprecated ones included, marked so), by slug, a page at a time."""
    shown, next_cursor = _model_page(request, _visible_models(request))
    return ok({"items": [native_model(request, model) for model in shown],
               "pagination": {"has_more": next_cursor is not None, "next_cursor": next_cursor}})


@requires("models:list")
async def get_model(request: web.Request) -> web.Response:
    return ok(native_model(request, _visible_model(request)))


@requires("models:list")
async def oai_list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [oai_model(model) for model in _visible_models(request)]})


@requires("models:list")
async def oai_get_model(request: web.Request) -> web.Response:
    return web.json_response(oai_model(_visible_model(request)))


# --- GET /v1/backends/{id}/health ---

@requires("routing:view", scopes=(OPERATOR,), query=("tenant",))
async def backend_health(request: web.Request) -> web.Response:
    """The backend's circuit breaker as all http processes share it, and this process's requests in flight."""
    name = request.match_info["id"]
    async with request.app[DB].connect() as conn:  # names resolve as for GET /v1/backends/{id}, ?tenant= included
        key = await store.backend_key_for(conn, request[PRINCIPAL], name, request.query.get("tenant"))
    dispatcher = request.app[DISPATCHER]
    backend = dispatcher.catalogue.current.backend(key)
    if backend is None:
        raise errors.backend_not_found(name)
    # A backend's own error text may quote any URL it reaches, name hosts or key prefixes: only for the platform.
    health = await dispatcher.breakers.health(key, platform=request[PRINCIPAL].reach == "platform")
    inflight = sum(sample.value for metric in BACKEND_INFLIGHT.collect() for sample in metric.samples
                   if sample.labels.get("backend_id") == key)
    return ok({"backend_id": name, "status": backend.status, **health, "inflight": int(inflight)})


ROUTES: list[web.RouteDef] = [
    web.post("/v1/inference/chat", native_chat),
    web.post("/v1/inference/embed", native_embed),
    web.post("/v1/inference/embeddings", native_embed),  # the name the public docs also use
    web.post("/v1/inference/generate", native_generate),
    web.post("/v1/inference/images/generate", native_images),
    web.post("/v1/inference/audio/transcribe", native_transcribe),
    web.post("/v1/inference/audio/synthesize", native_synthesize),
    web.get("/v1/models", list_models),
    web.get("/v1/models/{slug:.+}", get_model),
    web.post("/oai/v1/chat/completions", oai_chat),
    web.post("/oai/v1/embeddings", oai_embeddings),
    web.post("/oai/v1/images/generations", oai_images),
    web.post("/oai/v1/audio/transcriptions", oai_transcriptions),
    web.post("/oai/v1/audio/speech", oai_speech),
    web.get("/oai/v1/models", oai_list_models),
    web.get("/oai/v1/models/{slug:.+}", oai_get_model),
    web.get("/v1/backends/{id}/health", backend_health),
]
