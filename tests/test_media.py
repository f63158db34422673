"""Images and audio through the official openai SDK and the native API, against a node and a real test backend
speaking OpenAI's media formats: relay, failover, limits, budgets and per-unit accounting."""

import base64
import json
from collections.abc import Iterator
from decimal import Decimal

import openai
import pytest
import redis as sync_redis

from appliance import devstack
from scaigrid.accounting import usage
from scaigrid.accounting.records import UsageRecord
from scaigrid.dispatch.media import MAX_UPLOAD_BYTES
from tests.backends import (  # noqa: F401 (fake_fixture, gateway_fixture: the fixtures `fake`, `gateway`)
    AUDIO_SECONDS,
    TRANSCRIPT,
    FakeBackend,
    Gateway,
    backend,
    chat_model,
    fake_fixture,
    gateway_fixture,
    http_call,
    image_bytes,
    serving,
    shared_env,
    speech_bytes,
    wav,
)
from tests.catalogue_fixtures import add_tenant, sql
from tests.support.env import create_key
from tests.support.processes import scaigrid
from tests.support.waiting import eventually

IMAGE_PRICE, SECOND_PRICE, MCHAR_PRICE = "0.04", "0.0001", "15"
WAV_SECONDS = 2
WAV = wav(WAV_SECONDS)  # the upload of the transcription tests


def _media(slug: str, modality: str, routes: list[tuple[str, int]], **extra: str) -> dict[str, object]:
    """A model routed to (backend, priority) pairs."""
    return {"slug": slug, "modality": modality, **extra,
            "routes": [{"backend": name, "weight": 1, "priority": priority} for name, priority in routes]}


@pytest.fixture(scope="module")
def node_gateway(mariadb: devstack.MariaDB, redis_server: devstack.Redis, s3_server: devstack.S3Server,
                 fake: FakeBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp_path = tmp_path_factory.mktemp("media")
    with shared_env(mariadb, redis_server, s3_server) as env:
        add_tenant(env, "beta")
        add_tenant(env, "gamma")
        with serving(env, tmp_path, [
            backend("plain", fake, "ok", api_key="sk-media-secret"),
            backend("broken", fake, "fail"),
            backend("busy", fake, "ratelimit-9"),
            backend("hoarse", fake, "ratelimit-8"),  # a cooling backend is passed over: one of its own for speech
        ], [
            _media("acme/painter", "image", [("plain", 1)], price_per_image=IMAGE_PRICE),
            _media("acme/painter-failover", "image", [("broken", 1), ("plain", 2)], price_per_image=IMAGE_PRICE),
            _media("acme/painter-busy", "image", [("busy", 1)]),
            _media("acme/whisper", "audio", [("plain", 1)], price_per_audio_second=SECOND_PRICE),
            _media("acme/whisper-failover", "audio", [("broken", 1), ("plain", 2)],
                   price_per_audio_second=SECOND_PRICE),
            _media("acme/voice", "audio", [("plain", 1)], price_per_mchar=MCHAR_PRICE),
            _media("acme/voice-failover", "audio", [("hoarse", 1), ("plain", 2)], price_per_mchar=MCHAR_PRICE),
            chat_model("acme/chat", [("plain", 1, 1)], max_output_tokens=50),
            _media("acme/embed", "embedding", [("plain", 1)]),
            _media("beta/voice", "audio", [("plain", 1)], tenant="beta"),
        ]) as gateway:
            yield gateway


def _usage(gateway: Gateway) -> list[UsageRecord]:
    """The usage records waiting in Redis for the worker (none runs in these tests), oldest first."""
    with sync_redis.Redis.from_url(gateway.env["REDIS_URL"]) as redis:
        return [usage.decode(raw) for raw in redis.lrange(usage.BUFFER_KEY, 0, -1)]


def _record_of(gateway: Gateway, model: str) -> UsageRecord:
    return eventually(lambda: next((r for r in reversed(_usage(gateway)) if r.model == model), None),
                      f"the usage record of {model}")


# --- images ---

def test_images_through_the_sdk_as_urls_and_base64_priced_per_image(gateway: Gateway, fake: FakeBackend) -> None:
    client = gateway.client()
    result = client.images.generate(model="acme/painter", prompt="a lighthouse", n=2, size="1024x1024")
    assert [image.url for image in result.data] == ["https://images.example/0.png", "https://images.example/1.png"]
    [seen] = fake.requests_for("ok")
    assert seen.path == "/v1/images/generations" and seen.authorization == "Bearer sk-media-secret"
    assert (seen.body["prompt"], seen.body["n"], seen.body["size"]) == ("a lighthouse", 2, "1024x1024")
    record = _record_of(gateway, "acme/painter")
    assert (record.status, record.backend_id, record.protocol) == ("ok", "plain", "oai")
    assert record.cost == 2 * Decimal(IMAGE_PRICE)

    encoded = client.images.generate(model="acme/painter", prompt="a boat", response_format="b64_json")
    assert base64.b64decode(encoded.data[0].b64_json or "") == image_bytes(0)
    assert encoded.data[0].revised_prompt == "revised: a boat"


def test_native_images_answer_in_the_envelope(gateway: Gateway) -> None:
    status, _, body = http_call("POST", gateway.url + "/v1/inference/images/generate", gateway.key, {
        "model": "acme/painter", "prompt": "a tree", "n": 1, "quality": "standard", "style": "vivid"})
    assert status == 200, body
    answer = json.loads(body)
    assert answer["status"] == "ok" and answer["data"]["data"] == [{"url": "https://images.example/0.png"}]
    assert _record_of(gateway, "acme/painter").protocol == "native"


def test_images_fail_over_to_the_next_backend(gateway: Gateway, fake: FakeBackend) -> None:
    result = gateway.client().images.generate(model="acme/painter-failover", prompt="x")
    assert len(result.data) == 1
    assert [r.body["model"] for r in fake.received] == ["fail", "ok"]
    assert _record_of(gateway, "acme/painter-failover").backend_id == "plain"


def test_a_rate_limited_image_backend_is_the_documented_429(gateway: Gateway) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        gateway.client().images.generate(model="acme/painter-busy", prompt="x")
    assert caught.value.code == "BACKEND_RATE_LIMITED"
    assert caught.value.response.headers["Retry-After"] == "9"


def test_bad_image_bodies_and_wrong_modalities_are_refused_before_any_backend(gateway: Gateway,
                                                                              fake: FakeBackend) -> None:
    client = gateway.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="acme/painter", prompt="x", n=11)
    assert caught.value.code == "VALIDATION_ERROR" and "n:" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="acme/chat", prompt="x")
    assert "is a chat model, not a image model" in caught.value.message
    status, _, body = http_call("POST", gateway.url + "/v1/inference/images/generate", gateway.key,
                                {"model": "acme/painter", "response_format": "gif"})
    assert status == 422
    assert {d["field"] for d in json.loads(body)["error"]["details"]} == {"prompt", "response_format"}
    assert fake.received == []


# --- transcription ---

def test_transcriptions_through_the_sdk_in_every_format(gateway: Gateway, fake: FakeBackend) -> None:
    client = gateway.client()
    result = client.audio.transcriptions.create(model="acme/whisper", file=("note.wav", WAV, "audio/wav"),
                                                language="en", temperature=0.2, prompt="a note")
    assert result.text == TRANSCRIPT
    [seen] = fake.received
    assert seen.path == "/v1/audio/transcriptions" and seen.authorization == "Bearer sk-media-secret"
    assert seen.body["model"] == "ok"  # the backend's own name for the model
    assert seen.body["file"] == {"filename": "note.wav", "size": len(WAV), "content_type": "audio/wav"}
    assert (seen.body["language"], seen.body["prompt"], seen.body["temperature"]) == ("en", "a note", "0.2")
    # Priced by the seconds the backend's usage states.
    assert _record_of(gateway, "acme/whisper").cost == AUDIO_SECONDS * Decimal(SECOND_PRICE)

    text = client.audio.transcriptions.create(model="acme/whisper", file=("n.wav", WAV), response_format="text")
    assert text.strip() == TRANSCRIPT
    assert _record_of(gateway, "acme/whisper").cost == WAV_SECONDS * Decimal(SECOND_PRICE)  # from the WAV itself
    srt = client.audio.transcriptions.create(model="acme/whisper", file=("n.wav", WAV), response_format="srt")
    assert f"--> 00:00:0{AUDIO_SECONDS},000" in srt
    vtt = client.audio.transcriptions.create(model="acme/whisper", file=("n.wav", WAV), response_format="vtt")
    assert vtt.startswith("WEBVTT")
    verbose = client.audio.transcriptions.create(model="acme/whisper", file=("n.wav", WAV),
                                                 response_format="verbose_json")
    assert (verbose.text, verbose.duration) == (TRANSCRIPT, AUDIO_SECONDS)


def test_native_transcription_and_failover(gateway: Gateway, fake: FakeBackend) -> None:
    result = gateway.client().audio.transcriptions.create(model="acme/whisper-failover", file=("n.wav", WAV))
    assert result.text == TRANSCRIPT
    # The upload went to both backends whole: failing over sends it again.
    assert [(r.body["model"], r.body["file"]["size"]) for r in fake.received] == [("fail", len(WAV)),
                                                                                ("ok", len(WAV))]
    native = openai.OpenAI(base_url=gateway.url + "/v1/inference", api_key=gateway.key, max_retries=0)
    with native:
        answer = native.post("/audio/transcribe", cast_to=object, files={"file": ("n.wav", WAV)},
                             body={"model": "acme/whisper"},
                             options={"headers": {"Content-Type": "multipart/form-data"}})
    assert answer == {"status": "ok", "data": {"text": TRANSCRIPT,
                                               "usage": {"type": "duration", "seconds": AUDIO_SECONDS}}}


def test_transcription_uploads_are_bounded_and_checked(gateway: Gateway, fake: FakeBackend) -> None:
    client = gateway.client()
    with pytest.raises(openai.APIStatusError) as caught:
        client.audio.transcriptions.create(model="acme/whisper", file=("big.wav", b"\0" * (MAX_UPLOAD_BYTES + 1)))
    assert (caught.value.status_code, caught.value.code) == (413, "REQUEST_TOO_LARGE")
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="acme/whisper", file=("n.wav", WAV), response_format="doc")  # type: ignore[arg-type]
    assert caught.value.code == "VALIDATION_ERROR" and "response_format" in caught.value.message
    status, _, body = http_call("POST", gateway.url + "/v1/inference/audio/transcribe", gateway.key,
                                {"model": "acme/whisper"})
    assert status == 422 and json.loads(body)["error"]["details"][0]["field"] == "body"
    assert fake.received == []


# --- speech ---

def test_speech_streams_the_backends_audio_priced_per_character(gateway: Gateway, fake: FakeBackend) -> None:
    text = "Hello, world."
    with gateway.client().audio.speech.with_streaming_response.create(
            model="acme/voice", voice="alloy", input=text, speed=1.5) as response:
        assert response.headers["Content-Type"] == "audio/mpeg"
        audio = b"".join(response.iter_bytes())
    assert audio == speech_bytes(text)
    [seen] = fake.received
    assert seen.path == "/v1/audio/speech" and seen.body == {"model": "ok", "voice": "alloy", "input": text,
                                                              "speed": 1.5}
    assert _record_of(gateway, "acme/voice").cost == len(text) * Decimal(MCHAR_PRICE) / 1_000_000

    status, headers, body = http_call("POST", gateway.url + "/v1/inference/audio/synthesize", gateway.key, {
        "model": "acme/voice-failover", "voice": "nova", "input": "native", "response_format": "wav"})
    assert (status, headers["Content-Type"], body) == (200, "audio/wav", speech_bytes("native"))  # no envelope
    assert [r.body["model"] for r in fake.received][1:] == ["ratelimit-8", "ok"]


def test_speech_bodies_are_checked_and_models_stay_in_their_tenant(gateway: Gateway) -> None:
    client = gateway.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(model="acme/voice", voice="alloy", input="x" * 4097, speed=9)
    assert caught.value.code == "VALIDATION_ERROR"
    assert "input: a string of 1 to 4096" in caught.value.message and "speed: a number" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        client.audio.speech.create(model="beta/voice", voice="alloy", input="x")
    beta = gateway.client(create_key(gateway.env, "tenant_user", "beta"))
    assert beta.audio.speech.create(model="beta/voice", voice="alloy", input="x").content == speech_bytes("x")


# --- limits and budgets, as for chat ---

def test_media_requests_count_against_rate_limits_and_budgets(gateway: Gateway) -> None:
    limited = create_key(gateway.env, "tenant_user")
    result = scaigrid("admin", "set-limits", "--key", limited, "--rpm", "1", env=gateway.env)
    assert result.returncode == 0, result.stderr
    client = gateway.client(limited)
    client.images.generate(model="acme/painter", prompt="one")
    with pytest.raises(openai.RateLimitError) as caught:
        client.audio.speech.create(model="acme/voice", voice="alloy", input="two")
    assert caught.value.code == "RATE_LIMITED"

    # Two images cost 0.08: past gamma's budget of 0.05, whose next request is refused.
    [(gamma_id,)] = sql(gateway.env, "SELECT id FROM tenants WHERE slug = 'gamma'")
    status, _, body = http_call("POST", gateway.url + "/v1/accounting/budgets", create_key(gateway.env, "super_admin"),
                                {"scope": "tenant", "scope_id": gamma_id, "period": "daily", "limit_type": "cost",
                                 "limit_value": "0.05", "hard_action": "block"})
    assert status == 201, body
    gamma = gateway.client(create_key(gateway.env, "tenant_user", "gamma"))

    def refused() -> bool:
        try:
            gamma.images.generate(model="acme/painter", prompt="spend", n=2)
        except openai.RateLimitError as exc:
            return exc.code == "BUDGET_EXCEEDED"
        return False

    eventually(refused, "gamma's budget refusing its requests")


# --- the other native routes of the public docs ---

def test_embeddings_alias_and_generate(gateway: Gateway, fake: FakeBackend) -> None:
    status, _, body = http_call("POST", gateway.url + "/v1/inference/generate", gateway.key, {
        "model": "acme/chat", "prompt": "Once upon", "max_tokens": 500, "temperature": 0.5, "stop": ["\n"], "seed": 3})
    assert status == 200, body
    data = json.loads(body)["data"]
    assert data["object"] == "text_completion" and data["model"] == "acme/chat"
    assert data["choices"] == [{"index": 0, "finish_reason": "stop", "text": "hello there"}]
    [seen] = fake.received
    assert seen.body["messages"] == [{"role": "user", "content": "Once upon"}]
    assert (seen.body["max_tokens"], seen.body["stop"], seen.body["seed"]) == (50, ["\n"], 3)
    status, _, body = http_call("POST", gateway.url + "/v1/inference/generate", gateway.key,
                                {"model": "acme/chat", "prompt": "x", "stream": True})
    assert status == 422 and json.loads(body)["error"]["details"][0]["field"] == "stream"
    status, _, body = http_call("POST", gateway.url + "/v1/inference/embeddings", gateway.key,
                                {"model": "acme/embed", "input": ["a", "b"]})
    assert status == 200, body
    assert [item["index"] for item in json.loads(body)["data"]["data"]] == [0, 1]
