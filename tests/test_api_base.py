"""The shared HTTP base, in process: error envelope for every kind of failure, request ids, draining."""

import asyncio
import logging
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from scaigrid import errors
from scaigrid.api.base import base_app
from scaigrid.appkeys import DRAIN
from scaigrid.settings import load_settings
from tests.support.waiting import eventually_async


async def boom(request: web.Request) -> web.Response:
    raise RuntimeError("database password is hunter2")  # internals must not reach the client


async def limited(request: web.Request) -> web.Response:
    raise errors.ScaigridError("slow down", "RATE_LIMITED", 429, retry_after_s=7,
                               details=[errors.FieldError("model", "too many")])


@dataclass
class Gate:
    """Holds /slow requests in flight until the test releases them."""

    entered: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)


GATE = web.AppKey("gate", Gate)


async def slow(request: web.Request) -> web.Response:
    request.app[GATE].entered.set()
    await request.app[GATE].release.wait()
    return web.json_response({"done": True})


@pytest.fixture
async def client():
    app = base_app(load_settings({}, env_file=None))
    app.router.add_get("/boom", boom)
    app.router.add_get("/limited", limited)
    app.router.add_get("/slow", slow)
    app[GATE] = Gate()
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def test_unhandled_error_is_a_500_envelope_without_internals(client, caplog):
    with caplog.at_level(logging.ERROR):
        response = await client.get("/boom")
    body = await response.json()
    assert response.status == 500
    assert body["error"]["code"] == "INTERNAL_ERROR"
    assert "hunter2" not in await response.text()
    assert body["meta"]["request_id"] == response.headers["X-Request-ID"]
    assert any("hunter2" in record.exc_text for record in caplog.records if record.exc_text)  # but the log has it


async def test_domain_error_carries_retry_after_and_details(client):
    response = await client.get("/limited")
    assert response.status == 429
    assert response.headers["Retry-After"] == "7"
    assert (await response.json())["error"] == {"code": "RATE_LIMITED", "message": "slow down", "retry_after": 7,
                                                 "details": [{"field": "model", "message": "too many"}]}


async def test_wrong_method_is_a_405_envelope(client):
    response = await client.post("/health")
    assert response.status == 405
    assert (await response.json())["error"]["code"] == "METHOD_NOT_ALLOWED"


async def test_request_ids_are_unique(client):
    ids = {(await client.get("/health")).headers["X-Request-ID"] for _ in range(20)}
    assert len(ids) == 20


async def test_drain_waits_for_in_flight_and_refuses_new(client):
    gate = client.server.app[GATE]
    in_flight = asyncio.create_task(client.get("/slow"))
    await asyncio.wait_for(gate.entered.wait(), 10)
    drain = client.server.app[DRAIN]
    draining = asyncio.create_task(drain.drain(grace_s=5))
    await eventually_async(lambda: drain.draining, "draining started")
    refused = await client.get("/slow")
    assert refused.status == 503 and (await refused.json())["error"]["code"] == "SERVICE_DRAINING"
    assert (await client.get("/health/ready")).status == 503
    assert (await client.get("/health")).status == 200
    assert not draining.done()  # the held request is still in flight
    gate.release.set()
    assert await draining == (1, 0)
    assert (await (await in_flight).json()) == {"done": True}
