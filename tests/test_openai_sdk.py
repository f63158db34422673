"""The /oai/v1/ surface through the official openai SDK, sync and async, against a node and real test backends."""

from collections.abc import Iterator

import openai
import pytest

from appliance import devstack
from tests.backends import FakeBackend, Gateway, backend, chat_model, fake_fixture, gateway_fixture, serving, shared_env  # noqa: F401
from tests.catalogue_fixtures import add_tenant
from tests.support.env import create_key


@pytest.fixture(scope="module")
def node_gateway(mariadb: devstack.MariaDB, redis_server: devstack.Redis, s3_server: devstack.S3Server,
                 fake: FakeBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One node for the module: each test uses models of its own, so they do not disturb each other."""
    tmp_path = tmp_path_factory.mktemp("sdk")
    with shared_env(mariadb, redis_server, s3_server) as env:
        env["SCAIGRID_BACKEND_KEY_FAKE"] = "sk-from-the-environment"
        env["BACKEND_ALLOW_PRIVATE_TARGETS"] = "true"  # beta's own backend is a fake on loopback
        add_tenant(env, "beta")
        with serving(env, tmp_path, [
            backend("plain", fake, "ok", api_key="sk-plain-secret"),
            backend("env-keyed", fake, "tooled", api_key_env="SCAIGRID_BACKEND_KEY_FAKE"),
            backend("paced", fake, "paced-4-10"),
            backend("emb", fake, "ok"),
            backend("broken", fake, "fail"),
            backend("doomed", fake, "fail"),
            backend("busy", fake, "ratelimit-7"),
            backend("cutter", fake, "cut-2"),
            backend("beta-only", fake, "ok", tenant="beta"),
        ], [
            chat_model("acme/chat", [("plain", 1, 1)], display_name="Chat", context_window=8000,
                       max_output_tokens=64, default_params={"temperature": 0.3, "top_p": 0.9}),
            chat_model("acme/paced", [("paced", 1, 1)]),
            chat_model("acme/tools", [("env-keyed", 1, 1)]),
            {"slug": "acme/embed", "modality": "embedding", "routes": [{"backend": "emb"}]},
            chat_model("acme/broken", [("broken", 1, 1)]),
            chat_model("acme/doomed", [("doomed", 1, 1)]),
            chat_model("acme/busy", [("busy", 1, 1)]),
            chat_model("acme/cut", [("cutter", 1, 1)]),
            chat_model("beta/private", [("beta-only", 1, 1)], tenant="beta"),
        ]) as gateway:
            yield gateway


def test_chat_completion_goes_to_the_backend_with_defaults_cap_and_key(gateway: Gateway, fake: FakeBackend) -> None:
    completion = gateway.client().chat.completions.create(
        model="acme/chat", messages=[{"role": "user", "content": "hi"}], max_tokens=1000, temperature=1.5)
    assert completion.choices[0].message.content == "hello there"
    assert completion.model == "acme/chat"  # the client sees the name it asked for, never the backend's
    assert completion.usage is not None and completion.usage.prompt_tokens == 11
    [seen] = fake.requests_for("ok")
    assert seen.authorization == "Bearer sk-plain-secret"
    assert seen.body["max_tokens"] == 64  # capped by the model's max_output_tokens
    assert seen.body["temperature"] == 1.5 and seen.body["top_p"] == 0.9  # the client's value wins over defaults


def test_tools_reach_the_backend_which_gets_its_key_from_the_environment(gateway: Gateway,
                                                                          fake: FakeBackend) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    gateway.client().chat.completions.create(
        model="acme/tools", messages=[{"role": "user", "content": "hi"}], tools=tools, tool_choice="auto",
        response_format={"type": "text"})
    [seen] = fake.requests_for("tooled")
    assert seen.authorization == "Bearer sk-from-the-environment"
    assert (seen.body["tools"], seen.body["tool_choice"], seen.body["response_format"]) == (
        tools, "auto", {"type": "text"})


def test_streaming_chat_relays_every_chunk_renamed(gateway: Gateway, fake: FakeBackend) -> None:
    stream = gateway.client().chat.completions.create(
        model="acme/paced", messages=[{"role": "user", "content": "hi"}], stream=True)
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "tok0 tok1 tok2 tok3 "
    assert {chunk.model for chunk in chunks} == {"acme/paced"}
    assert all(chunk.usage is None for chunk in chunks)  # the client did not ask for usage
    [seen] = fake.requests_for("paced-4-10")
    assert seen.body["stream_options"] == {"include_usage": True}  # but we did, for accounting

    with_usage = list(gateway.client().chat.completions.create(
        model="acme/paced", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens == 4


async def test_async_client_streams_and_completes(gateway: Gateway) -> None:
    async with gateway.async_client() as client:
        completion = await client.chat.completions.create(
            model="acme/chat", messages=[{"role": "user", "content": "a"}])
        assert completion.choices[0].message.content == "hello there"
        stream = await client.chat.completions.create(
            model="acme/paced", messages=[{"role": "user", "content": "b"}], stream=True)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert text == "tok0 tok1 tok2 tok3 "


def test_embeddings_sync_and_async_shapes(gateway: Gateway) -> None:
    client = gateway.client()
    result = client.embeddings.create(model="acme/embed", input=["one two", "three"])
    assert [item.embedding for item in result.data] == [[1.0] * 4, [2.0] * 4]  # base64 by default, decoded
    assert result.model == "acme/embed" and result.usage.prompt_tokens == 3
    assert len(client.embeddings.create(model="acme/embed", input="x", dimensions=2).data[0].embedding) == 2


def test_models_list_and_retrieve_show_only_what_the_tenant_may_use(gateway: Gateway) -> None:
    ids = [model.id for model in gateway.client().models.list()]
    assert ids == ["acme/broken", "acme/busy", "acme/chat", "acme/cut", "acme/doomed", "acme/embed", "acme/paced",
                   "acme/tools"]
    model = gateway.client().models.retrieve("acme/chat")
    assert (model.id, model.object, model.owned_by) == ("acme/chat", "model", "scaigrid")
    assert (model.model_extra or {}).get("context_window") == 8000
    assert (model.model_extra or {}).get("max_output_tokens") == 64
    with pytest.raises(openai.NotFoundError):
        gateway.client().models.retrieve("beta/private")

    beta = gateway.client(create_key(gateway.env, "tenant_user", "beta"))
    assert "beta/private" in [model.id for model in beta.models.list()]
    assert beta.models.retrieve("beta/private").owned_by == "beta"


def test_another_tenants_private_model_does_not_exist_for_you(gateway: Gateway, fake: FakeBackend) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        gateway.client().chat.completions.create(model="beta/private", messages=[{"role": "user", "content": "x"}])
    assert caught.value.code == "MODEL_NOT_FOUND"
    assert "beta/private" in caught.value.message and "tenant" not in caught.value.message
    assert fake.received == []
    beta = gateway.client(create_key(gateway.env, "tenant_user", "beta"))
    assert beta.chat.completions.create(
        model="beta/private", messages=[{"role": "user", "content": "x"}]).model == "beta/private"


def test_errors_raise_the_sdk_exception_for_each_case(gateway: Gateway, fake: FakeBackend) -> None:
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.AuthenticationError):
        gateway.client("sgk_" + "x" * 40).chat.completions.create(model="acme/chat", messages=messages)
    with pytest.raises(openai.PermissionDeniedError):
        gateway.client(create_key(gateway.env, "tenant_viewer")).chat.completions.create(
            model="acme/chat", messages=messages)
    with pytest.raises(openai.NotFoundError):
        gateway.client().chat.completions.create(model="acme/nope", messages=messages)
    with pytest.raises(openai.BadRequestError) as bad:
        gateway.client().chat.completions.create(model="acme/chat", messages=messages, temperature=3)
    assert bad.value.code == "VALIDATION_ERROR" and bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as wrong_kind:
        gateway.client().embeddings.create(model="acme/chat", input="x")
    assert "chat model" in wrong_kind.value.message
    with pytest.raises(openai.InternalServerError) as failed:
        gateway.client().chat.completions.create(model="acme/broken", messages=messages)
    assert failed.value.status_code == 502 and failed.value.code == "BACKEND_ERROR"
    with pytest.raises(openai.RateLimitError) as limited:
        gateway.client().chat.completions.create(model="acme/busy", messages=messages)
    assert limited.value.code == "BACKEND_RATE_LIMITED" and limited.value.response.headers["Retry-After"] == "7"
    assert limited.value.response.headers["X-Request-ID"].startswith("req_")
    assert fake.requests_for("ratelimit-7")  # asked once; the cooldown now spares it
    with pytest.raises(openai.RateLimitError):
        gateway.client().chat.completions.create(model="acme/busy", messages=messages)
    assert len(fake.requests_for("ratelimit-7")) == 1


def test_a_stream_cut_by_the_backend_raises_in_the_sdk(gateway: Gateway) -> None:
    stream = gateway.client().chat.completions.create(
        model="acme/cut", messages=[{"role": "user", "content": "x"}], stream=True)
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content if chunk.choices else None)
    assert "tok0 " in received and "tok1 " in received  # what arrived before the cut was relayed
    assert caught.value.code == "BACKEND_ERROR"


def test_all_backends_down_is_a_503_model_unavailable(gateway: Gateway) -> None:
    # BREAKER_FAILURE_THRESHOLD is 5: five failures open the breaker, then nothing is left to try.
    messages = [{"role": "user", "content": "x"}]
    client = gateway.client()
    for _ in range(5):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="acme/doomed", messages=messages)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="acme/doomed", messages=messages)
    assert caught.value.status_code == 503 and caught.value.code == "MODEL_UNAVAILABLE"
