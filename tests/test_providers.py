"""Providers `anthropic` and `azure` through the node with the official openai SDK, against stand-ins that speak
Anthropic's Messages API and Azure OpenAI's deployment URLs."""

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import redis as sync_redis

from appliance import devstack
from scaigrid.accounting.usage import BUFFER_KEY, decode
from tests.backends import Gateway, chat_model, http_call, serving, shared_env
from tests.catalogue_fixtures import call, sql
from tests.fake_providers import (
    ANTHROPIC_KEY,
    AZURE_KEY,
    AZURE_PROMPT_TOKENS,
    CACHE_READ_TOKENS,
    INPUT_TOKENS,
    TOOL_INPUT,
    FakeAnthropic,
    FakeAzure,
)
from tests.support.env import create_key
from tests.support.waiting import eventually

PROMPT_TOKENS = INPUT_TOKENS + CACHE_READ_TOKENS
WEATHER = [{"type": "function", "function": {
    "name": "weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def anthropic(backend_id: str, server: FakeAnthropic, model: str, **extra: Any) -> dict[str, Any]:
    return {"id": backend_id, "provider": "anthropic", "base_url": server.url, "model": model,
            "api_key": ANTHROPIC_KEY, **extra}


def azure(backend_id: str, server: FakeAzure, deployment: str, **extra: Any) -> dict[str, Any]:
    return {"id": backend_id, "provider": "azure", "base_url": server.url, "model": "gpt-4o",
            "deployment": deployment, "api_key": AZURE_KEY, **extra}


@pytest.fixture(name="claude", scope="module")
def claude_fixture() -> Iterator[FakeAnthropic]:
    server = FakeAnthropic().start()
    yield server
    server.stop()


@pytest.fixture(name="resource", scope="module")
def resource_fixture() -> Iterator[FakeAzure]:
    server = FakeAzure({"gpt4o-prod": "chat", "gpt4o-busy": "busy", "embed-prod": "embed"}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def node_gateway(mariadb: devstack.MariaDB, redis_server: devstack.Redis, s3_server: devstack.S3Server,
                 claude: FakeAnthropic, resource: FakeAzure, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Gateway]:
    with shared_env(mariadb, redis_server, s3_server) as env, serving(env, tmp_path_factory.mktemp("providers"), [
        anthropic("claude", claude, "claude-ok"),
        anthropic("claude-busy", claude, "claude-ratelimit-8"),
        anthropic("claude-down", claude, "claude-overloaded"),
        anthropic("claude-picky", claude, "claude-invalid"),
        anthropic("claude-cut", claude, "claude-midstream"),
        anthropic("claude-badkey", claude, "claude-ok", api_key="sk-ant-revoked"),
        azure("az", resource, "gpt4o-prod"),
        azure("az-busy", resource, "gpt4o-busy"),
        azure("az-old", resource, "gpt4o-prod", api_version="2023-03-15-preview"),
        azure("az-gone", resource, "gpt4o-deleted"),
        azure("az-embed", resource, "embed-prod"),
    ], [
        chat_model("acme/claude", [("claude", 1, 1)], max_output_tokens=256),
        chat_model("acme/claude-tools", [("claude", 1, 1)]),
        chat_model("acme/claude-busy", [("claude-busy", 1, 1)]),
        chat_model("acme/claude-picky", [("claude-picky", 1, 1)]),
        chat_model("acme/claude-cut", [("claude-cut", 1, 1)]),
        chat_model("acme/claude-badkey", [("claude-badkey", 1, 1)]),
        chat_model("acme/resilient", [("claude-down", 1, 1), ("az", 1, 2)]),
        chat_model("acme/gpt", [("az", 1, 1)]),
        chat_model("acme/gpt-busy", [("az-busy", 1, 1)]),
        chat_model("acme/gpt-old", [("az-old", 1, 1)]),
        chat_model("acme/gpt-gone", [("az-gone", 1, 1)]),
        {"slug": "acme/embed", "modality": "embedding", "routes": [{"backend": "az-embed"}]},
        {"slug": "acme/claude-embed", "modality": "embedding", "routes": [{"backend": "claude"}]},
    ]) as gateway:
        yield gateway


@pytest.fixture(name="gateway")
def gateway_fixture(node_gateway: Gateway, claude: FakeAnthropic, resource: FakeAzure) -> Iterator[Gateway]:
    claude.received.clear()
    resource.received.clear()
    with sync_redis.Redis.from_url(node_gateway.env["REDIS_URL"]) as client:
        client.delete(BUFFER_KEY)  # each test sees its own usage records (no worker flushes them here)
    yield node_gateway
    node_gateway.close_clients()


def recorded(env: dict[str, str], model: str, count: int = 1) -> list[tuple[str | None, int, int, str]]:
    """(backend, tokens in, tokens out, status) of the usage records the node buffered for `model` in this test,
    once there are `count` (the node hands each record over after it answered)."""
    def records() -> list[tuple[str | None, int, int, str]]:
        with sync_redis.Redis.from_url(env["REDIS_URL"]) as client:
            found = [decode(raw) for raw in client.lrange(BUFFER_KEY, 0, -1)]
        return [(r.backend_id, r.tokens_in, r.tokens_out, r.status) for r in found if r.model == model]
    return eventually(lambda: len(records()) >= count and records(), f"{count} usage record(s) of {model}")


# --- anthropic ---

def test_a_chat_becomes_a_messages_call_and_its_answer_a_completion(gateway: Gateway, claude: FakeAnthropic) -> None:
    completion = gateway.client().chat.completions.create(model="acme/claude", messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"}], temperature=1.5, top_p=0.9, stop=["END"], user="alice")
    assert completion.choices[0].message.content == "Hello from Claude"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "acme/claude"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (PROMPT_TOKENS, 5)
    [seen] = claude.received
    assert seen.path == "/v1/messages"
    assert seen.headers["x-api-key"] == ANTHROPIC_KEY and seen.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in seen.headers
    assert seen.body == {
        "model": "claude-ok", "max_tokens": 256,  # the model's max_output_tokens: Anthropic requires one
        "system": "Be brief.", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "stop_sequences": ["END"], "temperature": 1.0, "top_p": 0.9, "metadata": {"user_id": "alice"}}
    assert recorded(gateway.env, "acme/claude") == [("claude", PROMPT_TOKENS, 5, "ok")]


def test_tool_calls_and_their_results_go_both_ways(gateway: Gateway, claude: FakeAnthropic) -> None:
    client = gateway.client()
    asked = [{"role": "user", "content": "Weather in Paris?"}]
    completion = client.chat.completions.create(model="acme/claude-tools", messages=asked, tools=WEATHER,
                                                tool_choice="required", parallel_tool_calls=False)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    [call_] = choice.message.tool_calls or []
    assert (call_.id, call_.function.name, json.loads(call_.function.arguments)) == ("toolu_01A", "weather",
                                                                                       TOOL_INPUT)
    sent = claude.received[0].body
    assert sent["max_tokens"] == 4096  # neither the request nor the model sets one: the documented default
    assert sent["tools"] == [{"name": "weather", "description": "The weather in a city",
                              "input_schema": WEATHER[0]["function"]["parameters"]}]
    assert sent["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}

    answered = client.chat.completions.create(model="acme/claude-tools", tools=WEATHER, messages=[
        *asked, {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_.id, "type": "function",
             "function": {"name": "weather", "arguments": call_.function.arguments}}]},
        {"role": "tool", "tool_call_id": call_.id, "content": "sunny, 21 C"}])
    assert answered.choices[0].message.content == "Hello from Claude"
    assert claude.received[1].body["messages"][1:] == [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01A", "name": "weather",
                                           "input": TOOL_INPUT}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01A", "content": "sunny, 21 C"}]}]


def test_the_event_stream_becomes_openai_chunks_with_usage(gateway: Gateway, claude: FakeAnthropic) -> None:
    chunks = list(gateway.client().chat.completions.create(
        model="acme/claude", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from Claude"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert {c.model for c in chunks} == {"acme/claude"}
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (PROMPT_TOKENS, 6)
    assert claude.received[0].body["stream"] is True and "stream_options" not in claude.received[0].body
    assert recorded(gateway.env, "acme/claude") == [("claude", PROMPT_TOKENS, 6, "ok")]

    # Without include_usage the client gets no usage chunk, and the node still counts it.
    plain = list(gateway.client().chat.completions.create(
        model="acme/claude", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert all(c.usage is None for c in plain)
    assert recorded(gateway.env, "acme/claude", 2)[1] == ("claude", PROMPT_TOKENS, 6, "ok")


def test_a_streamed_tool_call_arrives_in_pieces_the_sdk_joins(gateway: Gateway) -> None:
    stream = gateway.client().chat.completions.create(
        model="acme/claude-tools", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=WEATHER,
        stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            call_ = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call_["id"] += delta.id or ""
            call_["name"] += (delta.function.name or "") if delta.function else ""
            call_["arguments"] += (delta.function.arguments or "") if delta.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["id"], c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("toolu_01A", "weather", TOOL_INPUT)]


def test_the_native_route_answers_in_the_envelope(gateway: Gateway) -> None:
    status, _, body = http_call("POST", gateway.url + "/v1/inference/chat", gateway.key, {
        "model": "acme/claude", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200, body
    data = json.loads(body)["data"]
    assert data["choices"][0]["message"]["content"] == "Hello from Claude" and data["model"] == "acme/claude"


def test_an_overloaded_anthropic_backend_fails_over(gateway: Gateway, claude: FakeAnthropic,
                                                    resource: FakeAzure) -> None:
    completion = gateway.client().chat.completions.create(
        model="acme/resilient", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == "Hello from Azure"
    assert len(claude.requests_for("claude-overloaded")) == 1 and len(resource.requests_for("gpt4o-prod")) == 1
    assert recorded(gateway.env, "acme/resilient") == [("az", AZURE_PROMPT_TOKENS, 3, "ok")]


def test_anthropic_errors_become_the_documented_ones(gateway: Gateway, claude: FakeAnthropic) -> None:
    client = gateway.client()
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="acme/claude-busy", messages=messages)
    assert limited.value.code == "BACKEND_RATE_LIMITED" and limited.value.response.headers["Retry-After"] == "8"

    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="acme/claude-picky", messages=messages)
    assert refused.value.code == "VALIDATION_ERROR"
    assert "10.1.2.3" not in refused.value.message  # a backend's own words stay below platform reach

    with pytest.raises(openai.InternalServerError) as failed:  # the backend's key is the operator's problem
        client.chat.completions.create(model="acme/claude-badkey", messages=messages)
    assert failed.value.status_code == 502 and failed.value.code == "BACKEND_ERROR"
    assert claude.requests_for("claude-ok")[-1].headers["x-api-key"] == "sk-ant-revoked"
    status, health = call(gateway.url, "GET", "/v1/backends/claude-badkey/health",
                          create_key(gateway.env, "super_admin"))
    assert status == 200 and "HTTP 401" in json.dumps(health["data"])

    with pytest.raises(openai.BadRequestError) as no_embeddings:
        client.embeddings.create(model="acme/claude-embed", input="x")
    assert no_embeddings.value.code == "VALIDATION_ERROR"
    assert "Anthropic has no embeddings API" in json.dumps(no_embeddings.value.body)


def test_an_error_event_after_the_first_chunk_ends_the_stream_with_an_error(gateway: Gateway) -> None:
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in gateway.client().chat.completions.create(
                model="acme/claude-cut", messages=[{"role": "user", "content": "hi"}], stream=True):
            received.append(chunk.choices[0].delta.content if chunk.choices else None)
    assert "Hello" in received
    assert caught.value.code == "BACKEND_ERROR"


# --- azure ---

def test_azure_chat_goes_to_the_deployment_with_api_version_and_api_key(gateway: Gateway, resource: FakeAzure) -> None:
    completion = gateway.client().chat.completions.create(
        model="acme/gpt", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == "Hello from Azure" and completion.model == "acme/gpt"
    [seen] = resource.received
    assert seen.path == "/openai/deployments/gpt4o-prod/chat/completions"
    assert seen.query == {"api-version": "2024-10-21"}  # the default, stored with the backend
    assert seen.headers["api-key"] == AZURE_KEY and "Authorization" not in seen.headers

    chunks = list(gateway.client().chat.completions.create(
        model="acme/gpt", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from Azure"
    assert all(c.usage is None for c in chunks)
    assert recorded(gateway.env, "acme/gpt", 2) == [("az", AZURE_PROMPT_TOKENS, 3, "ok")] * 2

    result = gateway.client().embeddings.create(model="acme/embed", input=["a", "b"])
    assert [item.embedding for item in result.data] == [[0.5, -0.5, 0.0], [0.5, -0.5, 1.0]]
    assert resource.received[-1].path == "/openai/deployments/embed-prod/embeddings"


def test_azure_refusals_fail_the_backend(gateway: Gateway, resource: FakeAzure) -> None:
    client = gateway.client()
    messages = [{"role": "user", "content": "hi"}]
    for model in ("acme/gpt-old", "acme/gpt-gone"):  # an api-version or a deployment Azure does not know: 404
        with pytest.raises(openai.InternalServerError) as failed:
            client.chat.completions.create(model=model, messages=messages)
        assert failed.value.status_code == 502 and failed.value.code == "BACKEND_ERROR"
    assert resource.received[0].query == {"api-version": "2023-03-15-preview"}
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="acme/gpt-busy", messages=messages)
    assert limited.value.code == "BACKEND_RATE_LIMITED" and limited.value.response.headers["Retry-After"] == "9"


# --- the backends themselves ---

def test_provider_fields_are_checked_stored_and_shown(gateway: Gateway) -> None:
    admin = create_key(gateway.env, "super_admin")
    status, body = call(gateway.url, "POST", "/v1/backends", admin, {
        "id": "az-x", "provider": "azure", "base_url": "https://acme.openai.azure.com", "model": "gpt-4o",
        "api_version": "2024-13", "api_key": "k"})
    assert status == 422
    assert {d["field"] for d in body["error"]["details"]} == {"deployment", "api_version"}
    status, body = call(gateway.url, "POST", "/v1/backends", admin, {
        "id": "vllm-x", "provider": "custom", "base_url": "http://10.0.0.5/v1", "model": "m",
        "deployment": "d", "api_version": "2024-10-21"})
    assert status == 422 and {d["field"] for d in body["error"]["details"]} == {"deployment", "api_version"}

    status, body = call(gateway.url, "POST", "/v1/backends", admin, {
        "id": "claude-default", "provider": "anthropic", "model": "claude-sonnet-4-5", "api_key": "sk-ant-secret"})
    assert status == 201, body
    shown = body["data"]
    assert (shown["base_url"], shown["api_version"], shown["deployment"], shown["has_api_key"]) == (
        "https://api.anthropic.com", "2023-06-01", None, True)
    [(stored,)] = sql(gateway.env, "SELECT api_key_encrypted FROM backends WHERE id = 'claude-default'")
    assert "sk-ant-secret" not in stored  # encrypted at rest, like every backend key

    status, body = call(gateway.url, "GET", "/v1/backends/az", admin)
    assert (body["data"]["deployment"], body["data"]["api_version"]) == ("gpt4o-prod", "2024-10-21")


def test_a_tenants_anthropic_or_azure_backend_stays_off_private_addresses(gateway: Gateway) -> None:
    admin = create_key(gateway.env, "super_admin")
    for body in ({"id": "mine", "provider": "anthropic", "base_url": "http://127.0.0.1:9", "model": "c",
                  "tenant": "default"},
                 {"id": "mine", "provider": "azure", "base_url": "http://10.1.1.1", "model": "g", "deployment": "d",
                  "tenant": "default"}):
        status, answer = call(gateway.url, "POST", "/v1/backends", admin, body)
        assert status == 422 and [d["field"] for d in answer["error"]["details"]] == ["base_url"], answer
