"""The native inference API (/v1/inference/*, /v1/models) against a node and real test backends: shapes,
validation, streaming (relay, breaks, timeouts, disconnects), defaults and caps, metrics and usage records."""

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
import redis as sync_redis

from appliance import devstack
from scaigrid.accounting import usage
from scaigrid.accounting.records import UsageRecord
from scaigrid.resources import database_ctx
from scaigrid.settings import load_settings
from tests.backends import (  # noqa: F401
    USER,
    FakeBackend,
    Gateway,
    backend,
    chat_model,
    fake_fixture,
    gateway_fixture,
    serving,
    shared_env,
)
from tests.support.env import create_key
from tests.support.http import http_get
from tests.support.waiting import eventually

STREAM_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def node_gateway(mariadb: devstack.MariaDB, redis_server: devstack.Redis, s3_server: devstack.S3Server,
                 fake: FakeBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp_path = tmp_path_factory.mktemp("inference")
    with shared_env(mariadb, redis_server, s3_server) as env:
        env["DISPATCH_STREAM_TIMEOUT_S"] = str(STREAM_TIMEOUT_S)
        with serving(env, tmp_path, [
            backend("plain", fake, "ok"),
            backend("paced", fake, "paced-3-5"),
            backend("gated", fake, "gated-3"),
            backend("cutter", fake, "cut-2"),
            backend("endless", fake, "paced-1000-50"),
            backend("quiet", fake, "nousage-4"),
            backend("slow", fake, "slow-5", timeout_s=0.5),
            backend("garbage", fake, "garbage"),
            backend("liar", fake, "liar"),
            backend("emb", fake, "ok"),
        ], [
            chat_model("acme/chat", [("plain", 1, 1)], max_output_tokens=100, price_input_per_mtok="3",
                       price_output_per_mtok="15.5", default_params={"temperature": 0.2, "seed": 7}),
            chat_model("acme/old", [("plain", 1, 1)], status="deprecated"),
            chat_model("acme/paced", [("paced", 1, 1)], price_input_per_mtok="1", price_output_per_mtok="2"),
            chat_model("acme/gated", [("gated", 1, 1)]),
            chat_model("acme/cut", [("cutter", 1, 1)]),
            chat_model("acme/endless", [("endless", 1, 1)]),
            chat_model("acme/quiet", [("quiet", 1, 1)]),
            chat_model("acme/slow", [("slow", 1, 1)]),
            chat_model("acme/garbage", [("garbage", 1, 1)]),
            chat_model("acme/liar", [("liar", 1, 1)], price_input_per_mtok="3"),
            {"slug": "acme/embed", "modality": "embedding", "routes": [{"backend": "emb"}],
             "price_input_per_mtok": "0.1"},
        ]) as gateway:
            yield gateway


@pytest.fixture
async def session(gateway: Gateway) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(gateway.url, headers={"Authorization": f"Bearer {gateway.key}"}) as client:
        yield client


async def post(session: aiohttp.ClientSession, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    async with session.post(path, json=body) as response:
        return response.status, await response.json()


def frames(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) of every SSE frame."""
    parsed = []
    for block in text.split("\n\n"):
        if not block:
            continue
        name = re.search(r"^event: (.*)$", block, re.M)
        data = re.search(r"^data: (.*)$", block, re.M)
        parsed.append((name[1] if name else None, data[1] if data else ""))
    return parsed


async def test_chat_answers_in_the_native_envelope_with_defaults_and_cap(
        gateway: Gateway, session: aiohttp.ClientSession, fake: FakeBackend) -> None:
    async with session.post("/v1/inference/chat", json={
            "model": "acme/chat", "messages": USER, "seed": 1, "metadata": {"job": "42"}}) as response:
        envelope = await response.json()
        assert response.status == 200 and response.headers["X-Request-ID"].startswith("req_")
    assert envelope["status"] == "ok"
    assert envelope["data"]["model"] == "acme/chat"
    assert envelope["data"]["choices"][0]["message"]["content"] == "hello there"
    [seen] = fake.requests_for("ok")
    # Defaults under the client's values; no limit asked, so the model's cap is sent; metadata stays here.
    assert seen.body == {"model": "ok", "messages": USER, "temperature": 0.2, "seed": 1, "max_tokens": 100}


async def test_streams_are_relayed_as_sse_with_the_frontend_model(session: aiohttp.ClientSession) -> None:
    async with session.post("/v1/inference/chat", json={"model": "acme/paced", "messages": USER,
                                                        "stream": True}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["X-Accel-Buffering"] == "no"
        text = await response.text()
    parsed = frames(text)
    assert parsed[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in parsed[:-1]]
    assert {chunk["model"] for chunk in chunks} == {"acme/paced"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "tok0 tok1 tok2 "
    assert all(chunk["choices"] for chunk in chunks)  # the usage chunk we asked for is not forwarded unasked


async def test_chunks_reach_the_client_while_the_backend_is_still_generating(
        session: aiohttp.ClientSession, fake: FakeBackend) -> None:
    fake.gate.clear()
    async with session.post("/v1/inference/chat", json={"model": "acme/gated", "messages": USER,
                                                        "stream": True}) as response:
        seen = ""
        while "tok0" not in seen:  # the backend holds tok1 back until the gate opens: nothing may be buffered
            seen += (await asyncio.wait_for(response.content.readany(), 10)).decode()
        assert "tok1" not in seen
        fake.gate.set()
        seen += await response.text()
    assert "tok1" in seen and "tok2" in seen and seen.endswith("data: [DONE]\n\n")


async def test_a_stream_cut_mid_way_ends_with_an_error_frame_and_done(session: aiohttp.ClientSession) -> None:
    async with session.post("/v1/inference/chat", json={"model": "acme/cut", "messages": USER,
                                                        "stream": True}) as response:
        assert response.status == 200
        parsed = frames(await response.text())
    assert "tok1" in parsed[-3][1]
    assert parsed[-2][0] == "error"
    assert json.loads(parsed[-2][1])["code"] == "BACKEND_ERROR" and json.loads(parsed[-2][1])["message"]
    assert parsed[-1] == (None, "[DONE]")


async def test_a_stream_longer_than_the_stream_timeout_is_ended_with_an_error_frame(
        session: aiohttp.ClientSession, fake: FakeBackend) -> None:
    async with session.post("/v1/inference/chat", json={"model": "acme/endless", "messages": USER,
                                                        "stream": True}) as response:
        parsed = frames(await asyncio.wait_for(response.text(), STREAM_TIMEOUT_S + 10))
    assert len(parsed) > 3  # it did stream, until the deadline
    assert parsed[-2][0] == "error" and json.loads(parsed[-2][1])["code"] == "BACKEND_TIMEOUT"
    assert parsed[-1] == (None, "[DONE]")
    [seen] = fake.requests_for("paced-1000-50")
    await asyncio.to_thread(seen.gone.wait, 10)
    assert seen.gone.is_set()  # and the backend was told to stop


async def test_a_client_that_disconnects_cancels_the_upstream_request(
        gateway: Gateway, session: aiohttp.ClientSession, fake: FakeBackend) -> None:
    response = await session.post("/v1/inference/chat", json={"model": "acme/endless", "messages": USER,
                                                               "stream": True})
    seen_text = ""
    while "tok0" not in seen_text:
        seen_text += (await asyncio.wait_for(response.content.readany(), 10)).decode()
    [seen] = fake.requests_for("paced-1000-50")
    assert not seen.gone.is_set()
    request_id = response.headers["X-Request-ID"]
    response.close()  # the client goes away mid-stream
    await asyncio.to_thread(seen.gone.wait, 10)
    assert seen.gone.is_set()
    # Recorded as an error, with the chunks it did get counted (this backend's usage chunk never came).
    await asyncio.to_thread(eventually, lambda: request_id in buffered_usage(gateway), "the cut stream's record")
    record = buffered_usage(gateway)[request_id]
    assert record.status == "error" and record.tokens_out >= 1


async def test_bodies_are_validated_with_every_problem_named(session: aiohttp.ClientSession,
                                                             fake: FakeBackend) -> None:
    status, envelope = await post(session, "/v1/inference/chat", {
        "messages": [{"role": "robot", "content": "x"}, {"role": "user"}, "hello"],
        "temperature": 2.5, "top_p": -0.1, "max_tokens": 0, "stream": "yes", "stop": [1], "seed": 1.5,
        "tools": [{"type": "function"}], "tool_choice": "sometimes", "metadata": "m"})
    assert status == 422 and envelope["error"]["code"] == "VALIDATION_ERROR"
    fields = {detail["field"] for detail in envelope["error"]["details"]}
    assert fields == {"model", "messages[0].role", "messages[1].content", "messages[2]", "temperature", "top_p",
                      "max_tokens", "stream", "stop", "seed", "tools[0]", "tool_choice", "metadata"}
    status, envelope = await post(session, "/v1/inference/embed", {"model": "acme/embed", "input": [],
                                                                   "dimensions": 0})
    assert status == 422
    assert {d["field"] for d in envelope["error"]["details"]} == {"input", "dimensions"}
    async with session.post("/v1/inference/chat", data=b"{not json",
                            headers={"Content-Type": "application/json"}) as response:
        assert response.status == 422 and (await response.json())["error"]["details"][0]["field"] == "body"
    nested_too_deep = b'{"model": "acme/chat", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for path, validation_status in (("/v1/inference/chat", 422), ("/oai/v1/chat/completions", 400)):
        async with session.post(path, data=nested_too_deep, headers={"Content-Type": "application/json"}) as response:
            assert response.status == validation_status and "VALIDATION_ERROR" in await response.text()
    assert fake.received == []


async def test_numbers_no_backend_could_take_are_refused_before_going_upstream(
        session: aiohttp.ClientSession, fake: FakeBackend) -> None:
    """Exploit: max_tokens of 10**26 was forwarded upstream; NaN, as aiohttp's request.json() parses it, too."""
    status, envelope = await post(session, "/v1/inference/chat", {
        "model": "acme/chat", "messages": USER, "max_tokens": 10**26, "max_completion_tokens": 2**31, "n": 10**6,
        "seed": 2**63, "presence_penalty": 3, "top_logprobs": 21})
    assert status == 422 and envelope["error"]["code"] == "VALIDATION_ERROR"
    assert {d["field"] for d in envelope["error"]["details"]} == {
        "max_tokens", "max_completion_tokens", "n", "seed", "presence_penalty", "top_logprobs"}
    status, envelope = await post(session, "/v1/inference/embed", {"model": "acme/embed", "input": "x",
                                                                   "dimensions": 10**12})
    assert status == 422 and [d["field"] for d in envelope["error"]["details"]] == ["dimensions"]
    for raw in (b'{"model": "acme/chat", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                b'{"model": "acme/chat", "messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}',
                b'{"model": "acme/chat", "messages": [], "seed": ' + b"9" * 5000 + b"}"):
        async with session.post("/v1/inference/chat", data=raw, headers={"Content-Type": "application/json"}) as r:
            envelope = await r.json()
            assert r.status == 422 and envelope["error"]["details"][0]["field"] == "body", envelope
    assert fake.received == []
    # The largest allowed value passes, capped by the model's max_output_tokens as before; so does a 64-bit seed.
    status, envelope = await post(session, "/v1/inference/chat", {"model": "acme/chat", "messages": USER,
                                                                  "max_tokens": 2**31 - 1, "seed": -(2**63)})
    assert status == 200, envelope
    assert (fake.received[0].body["max_tokens"], fake.received[0].body["seed"]) == (100, -(2**63))


async def test_the_model_must_fit_the_route(session: aiohttp.ClientSession) -> None:
    status, envelope = await post(session, "/v1/inference/chat", {"model": "acme/embed", "messages": USER})
    assert status == 422 and envelope["error"]["code"] == "VALIDATION_ERROR"
    assert "embedding model" in envelope["error"]["details"][0]["message"]
    assert "/v1/inference/embed" in envelope["error"]["details"][0]["message"]
    status, envelope = await post(session, "/v1/inference/embed", {"model": "acme/chat", "input": "x"})
    assert status == 422 and "chat model" in envelope["error"]["details"][0]["message"]
    status, envelope = await post(session, "/v1/inference/chat", {"model": "acme/missing", "messages": USER})
    assert status == 404 and envelope["error"]["code"] == "MODEL_NOT_FOUND"


async def test_embeddings_in_the_native_envelope(session: aiohttp.ClientSession, fake: FakeBackend) -> None:
    status, envelope = await post(session, "/v1/inference/embed", {"model": "acme/embed", "input": "a b c"})
    assert status == 200 and envelope["status"] == "ok"
    assert envelope["data"]["model"] == "acme/embed"
    assert envelope["data"]["data"][0]["embedding"] == [1.0] * 4
    assert fake.received[0].path == "/v1/embeddings" and fake.received[0].body["model"] == "ok"


async def test_upstream_failures_map_to_documented_codes(session: aiohttp.ClientSession) -> None:
    status, envelope = await post(session, "/v1/inference/chat", {"model": "acme/slow", "messages": USER})
    assert (status, envelope["error"]["code"]) == (504, "BACKEND_TIMEOUT")
    status, envelope = await post(session, "/v1/inference/chat", {"model": "acme/garbage", "messages": USER})
    assert (status, envelope["error"]["code"]) == (502, "UPSTREAM_SHAPE_MISMATCH")
    status, envelope = await post(session, "/v1/inference/chat", {"model": "acme/garbage", "messages": USER,
                                                                  "stream": True})
    assert (status, envelope["error"]["code"]) == (502, "UPSTREAM_SHAPE_MISMATCH")  # nothing was sent yet


async def test_models_list_shows_deprecated_models_which_still_serve(gateway: Gateway,
                                                                     session: aiohttp.ClientSession) -> None:
    async with session.get("/v1/models") as response:
        envelope = await response.json()
    assert envelope["data"]["pagination"] == {"has_more": False, "next_cursor": None}
    by_slug = {item["slug"]: item for item in envelope["data"]["items"]}
    assert by_slug["acme/old"]["status"] == "deprecated"
    assert by_slug["acme/chat"]["price_output_per_mtok"] == "15.5"
    assert by_slug["acme/embed"]["modality"] == "embedding"
    status, reply = await post(session, "/v1/inference/chat", {"model": "acme/old", "messages": USER})
    assert status == 200 and reply["data"]["model"] == "acme/old"
    async with session.get("/v1/models/acme/chat") as response:
        assert (await response.json())["data"]["max_output_tokens"] == 100
    async with session.get("/v1/models/acme/none") as response:
        assert response.status == 404 and (await response.json())["error"]["code"] == "MODEL_NOT_FOUND"

    viewer = create_key(gateway.env, "tenant_viewer")
    async with aiohttp.ClientSession(gateway.url, headers={"Authorization": f"Bearer {viewer}"}) as as_viewer:
        async with as_viewer.get("/v1/models") as response:
            assert response.status == 200
        status, reply = await post(as_viewer, "/v1/inference/chat", {"model": "acme/chat", "messages": USER})
        assert (status, reply["error"]["code"]) == (403, "AUTHZ_PERMISSION_DENIED")


def buffered_usage(gateway: Gateway) -> dict[str, UsageRecord]:
    """The usage records waiting in Redis for the worker (none runs in these tests), by request id."""
    with sync_redis.Redis.from_url(gateway.env["REDIS_URL"]) as redis:
        return {record.request_id: record for record in map(usage.decode, redis.lrange(usage.BUFFER_KEY, 0, -1))}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample (labels may be a subset of the sample's)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        sample_labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(sample_labels.get(key) == value for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{labels}")


async def test_metrics_and_usage_records_account_for_each_request(
        gateway: Gateway, session: aiohttp.ClientSession) -> None:
    async with session.post("/v1/inference/chat", json={"model": "acme/paced", "messages": USER,
                                                        "stream": True}) as response:
        await response.read()
        stream_id = response.headers["X-Request-ID"]
    async with session.post("/v1/inference/chat", json={"model": "acme/quiet", "messages": USER,
                                                        "stream": True}) as response:
        await response.read()
        quiet_id = response.headers["X-Request-ID"]
    async with session.post("/oai/v1/chat/completions", json={"model": "acme/slow", "messages": USER}) as response:
        failed_id = response.headers["X-Request-ID"]
    # Recorded once the client has its answer: wait for them.
    await asyncio.to_thread(eventually, lambda: {stream_id, quiet_id, failed_id} <= set(buffered_usage(gateway)),
                            "three usage records")
    records = buffered_usage(gateway)
    streamed = records[stream_id]
    assert (streamed.model, streamed.backend_id, streamed.protocol, streamed.status) == (
        "acme/paced", "paced", "native", "ok")
    assert (streamed.tokens_in, streamed.tokens_out) == (11, 3)  # from the stream's usage chunk
    assert streamed.cost == Decimal(11 * 1 + 3 * 2) / 1_000_000
    assert streamed.tenant_id and streamed.api_key_id and streamed.latency_ms >= 0
    assert (records[quiet_id].tokens_in, records[quiet_id].tokens_out) == (0, 4)  # no usage chunk: chunks counted
    assert (records[failed_id].status, records[failed_id].protocol, records[failed_id].backend_id) == (
        "error", "oai", "slow")

    text = http_get(gateway.url + "/metrics")[2].decode()
    assert metric(text, "scaigrid_requests_total", model="acme/paced", status="ok", protocol="native") >= 1
    assert metric(text, "scaigrid_requests_total", model="acme/slow", status="BACKEND_TIMEOUT", protocol="oai") >= 1
    assert metric(text, "scaigrid_tokens_total", model="acme/paced", direction="out",
                  tenant_id=streamed.tenant_id) >= 3
    assert metric(text, "scaigrid_request_duration_seconds_count", model="acme/paced", backend="paced") >= 1
    assert metric(text, "scaigrid_time_to_first_token_seconds_count", model="acme/paced") >= 1
    assert metric(text, "scaigrid_gateway_overhead_seconds_count") >= 3
    assert metric(text, "scaigrid_backend_inflight_requests", backend_id="paced") == 0
    assert metric(text, "scaigrid_backend_health", backend_id="paced") == 1
    assert metric(text, "scaigrid_circuit_breaker_state", backend_id="paced") == 0


async def test_requests_in_flight_together_are_each_admitted_and_recorded(gateway: Gateway) -> None:
    # Admissions and the usage records of requests just answered go to Redis together, in batches: each request is
    # counted once against its limit and recorded once, however they were batched.
    key = create_key(gateway.env, "tenant_user")
    async with aiohttp.ClientSession(gateway.url, headers={"Authorization": f"Bearer {key}"}) as client:
        async def three_in_a_row() -> list[tuple[int, str, int]]:
            answers = []
            for _ in range(3):
                async with client.post("/oai/v1/chat/completions", json={"model": "acme/chat",
                                                                         "messages": USER}) as response:
                    await response.read()
                    answers.append((response.status, response.headers["X-Request-ID"],
                                    int(response.headers["X-Scaigrid-Ratelimit-Remaining"])))
            return answers

        answers = [answer for row in await asyncio.gather(*(three_in_a_row() for _ in range(8))) for answer in row]
    assert {status for status, _, _ in answers} == {200}
    left = sorted(remaining for _, _, remaining in answers)
    assert left == list(range(left[0], left[0] + 24))  # each counted once against the limit
    ids = {request_id for _, request_id, _ in answers}
    await asyncio.to_thread(eventually, lambda: ids <= set(buffered_usage(gateway)), "24 usage records")


async def test_a_backend_reporting_impossible_usage_cannot_stall_accounting(
        gateway: Gateway, session: aiohttp.ClientSession) -> None:
    # A count the usage table cannot hold would fail the worker's flush of every record queued after it.
    async with session.post("/v1/inference/chat", json={"model": "acme/liar", "messages": USER}) as response:
        assert response.status == 200
        request_id = response.headers["X-Request-ID"]
    await asyncio.to_thread(eventually, lambda: request_id in buffered_usage(gateway), "the usage record")
    record = buffered_usage(gateway)[request_id]
    assert (record.tokens_in, record.tokens_out) == (2**31 - 1, 0)
    assert record.cost == Decimal(3 * (2**31 - 1)) / 1_000_000
    async with database_ctx(load_settings(gateway.env, env_file=None)) as engine, engine.begin() as conn:
        await usage.store(conn, [record])  # as the worker's flush stores it
