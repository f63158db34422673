"""The chaos run's load on a real appliance stack: without a fault every request succeeds and the audit finds nothing
lost. (Misbehaving models are the fault table's upstream rows: test_chaos.py runs the cut, make chaos all three.)"""

import asyncio
import dataclasses
import hashlib
import json
import secrets
import ssl
import time
from collections.abc import Iterator

import pytest
from aiohttp import web

from appliance import devstack
from tests.appliance_stack import ApplianceStack, start_stack
from tests.backends import FakeBackend
from tests.chaos.audit import audit
from tests.chaos.load import (
    DOCUMENTED,
    OTHER,
    STACK_SETTINGS,
    STORAGE,
    SUCCEEDED,
    Caller,
    Stats,
    Traffic,
    World,
    prepare,
)
from tests.support.waiting import eventually
from tests.threaded_server import ThreadedServer
from tests.webhook_receiver import Receiver

MIN_PER_KIND = 12  # requests of each kind a run waits for: enough that every caller sent each kind a few times
FINDINGS = ("usage_missing", "usage_doubled", "events_lost", "objects_corrupt", "usage_unmatched")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, mariadb: devstack.MariaDB, redis_server: devstack.Redis,
          s3_server: devstack.S3Server) -> Iterator[ApplianceStack]:
    running = start_stack(tmp_path_factory.mktemp("chaos"), mariadb, redis_server, s3_server, **STACK_SETTINGS)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def world(stack: ApplianceStack) -> Iterator[World]:
    fake, receiver = FakeBackend().start(), Receiver().start()
    try:
        yield prepare(stack, fake, receiver)
    finally:
        receiver.stop()
        fake.stop()


def counted(traffic: Traffic, wanted: dict[str, int], by: str) -> bool:
    stats = traffic.stats()
    counts = stats.by_kind if by == "kind" else stats.by_model
    return all(sum(counts.get(name, {}).values()) >= least for name, least in wanted.items())


def findings(report: dict[str, object]) -> dict[str, object]:
    return {name: report[name] for name in FINDINGS}


@pytest.mark.timeout(300)
def test_a_steady_load_without_faults_succeeds_and_loses_nothing(world: World):
    traffic = Traffic(world, concurrency=8, rate_per_s=15, seed=1).start()
    try:
        wanted = {kind: MIN_PER_KIND for kind in ("chat", "chat_stream", "native_chat", "native_stream",
                                                   "storage_put", "storage_get")}
        eventually(lambda: counted(traffic, wanted, "kind"), "each kind of request sent", 120, interval_s=0.5)
    finally:
        records = traffic.stop()
    stats = Stats.of(records)
    assert (stats.failed_documented, stats.failed_other) == (0, 0), stats
    assert stats.succeeded == stats.attempted
    assert {record.caller for record in records} == set(range(len(world.callers)))  # every key sent some
    report = audit(world.stack, world, records)
    assert findings(report) == dict.fromkeys(FINDINGS, 0), report
    assert report["objects_checked"] == len([r for r in records if r.kind == "storage_put"])

    # What the audit finds when something is lost: a success without a row or an event, bytes that changed.
    chat = next(r for r in records if r.kind == "chat")
    put = next(r for r in records if r.kind == "storage_put")
    lost = [dataclasses.replace(chat, request_id="req_" + secrets.token_hex(12)),
            dataclasses.replace(put, sha256=hashlib.sha256(b"other bytes").hexdigest())]
    report = audit(world.stack, world, [*records, *lost], flush_wait_s=1, events_wait_s=1)
    assert findings(report) == {**dict.fromkeys(FINDINGS, 0), "usage_missing": 1, "events_lost": 1,
                                "objects_corrupt": 1}, report
    assert report["details"]["usage_missing"] == [lost[0].request_id]
    assert report["details"]["objects_corrupt"] == [put.object_key]


# --- the client's judgement, against a stand-in gateway with every defect the chaos run must catch ---

class DefectiveGateway(ThreadedServer):
    """Answers chat as the caller's key says (the key is the behaviour's name); stores objects, and reads back
    other bytes for the storage token `corrupt`."""

    name = "defective-gateway"

    def __init__(self) -> None:
        super().__init__()
        self.objects: dict[str, bytes] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def tls_context() -> ssl.SSLContext:
        return ssl.create_default_context()  # unused: the URL is plain HTTP

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/oai/v1/chat/completions", self._chat), web.post("/v1/inference/chat", self._chat),
                web.put(STORAGE + "/objects/{key:.+}", self._put), web.get(STORAGE + "/objects/{key:.+}", self._get)]

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        behaviour = request.headers["Authorization"].removeprefix("Bearer ")
        stream = bool((await request.json()).get("stream"))
        native = request.path.startswith("/v1/")
        chunk = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
        headers = {"X-Request-ID": "req_" + secrets.token_hex(12)}
        if behaviour == "html-502":
            return web.Response(status=502, text="<html>bad gateway</html>", content_type="text/html")
        if behaviour == "internal":
            return web.json_response({"status": "error", "error": {"code": "INTERNAL_ERROR", "message": "bug"}},
                                     status=500, headers=headers)
        if behaviour == "undocumented":
            return web.json_response({"status": "error", "error": {"code": "DATABASE_DOWN", "message": "no"}},
                                     status=503, headers=headers)
        if behaviour == "reset":
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if behaviour == "hang":
            await asyncio.sleep(30)  # far past the client's timeout, which ends it (handler cancellation)
        if behaviour == "frame" and not stream:
            return web.json_response({"status": "error", "error": {"code": "BACKEND_ERROR", "message": "cut"}},
                                     status=502, headers=headers)
        if not stream:
            body = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]})
            body = '{"status":"ok","data":' + body + "}" if native else body
            if behaviour == "silent-cut":  # fewer bytes than Content-Length promises, then the connection drops
                response = web.StreamResponse(headers={**headers, "Content-Type": "application/json"})
                response.content_length = len(body)
                await response.prepare(request)
                await response.write(body[:len(body) // 2].encode())
                assert request.transport is not None
                request.transport.close()
                return response
            return web.Response(text=body, content_type="application/json", headers=headers)
        response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chunk)
        if behaviour == "silent-cut":  # a 200 stream that just ends: no [DONE], no error frame
            await response.write_eof()
            return response
        if behaviour == "frame":
            await response.write(b'event: error\ndata: {"code":"BACKEND_ERROR","message":"cut"}\n\n')
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _put(self, request: web.Request) -> web.Response:
        data = await request.read()
        self.objects[request.match_info["key"]] = data
        return web.json_response({"status": "ok", "data": {"size": len(data)}}, status=201)

    async def _get(self, request: web.Request) -> web.Response:
        data = self.objects[request.match_info["key"]]
        corrupt = request.headers["Authorization"] == "Bearer corrupt"
        return web.Response(body=data[::-1] if corrupt else data, content_type="application/octet-stream")


# What each key's chat requests must count as, whatever the kind (streamed or not, either surface).
JUDGED = {"ok": SUCCEEDED, "frame": DOCUMENTED, "silent-cut": OTHER, "html-502": OTHER, "internal": OTHER,
          "undocumented": OTHER, "reset": OTHER, "hang": OTHER}
CHAT_KINDS = ("chat", "chat_stream", "native_chat", "native_stream")


@pytest.mark.timeout(120)
def test_the_client_counts_every_gateway_defect_as_failed_other():
    gateway = DefectiveGateway().start()
    try:
        # Every caller stores objects with a good token but "ok"'s, which reads back other bytes.
        callers = [Caller("t", "ten_1", f"usr_{key}", key, "corrupt" if key == "ok" else "good") for key in JUDGED]
        # Traffic needs a stack's url and tls_context() alone, and no backend or receiver.
        world = World(gateway, None, None, [], callers, time.time())  # type: ignore[arg-type]
        traffic = Traffic(world, concurrency=4, rate_per_s=40, client_timeout_s=1, seed=3).start()
        try:
            eventually(lambda: {(r.caller, r.kind) for r in traffic.records()} >= {
                (caller, kind) for caller in range(len(callers)) for kind in (*CHAT_KINDS, "storage_get")},
                "every key's every kind of request", 60, interval_s=0.2)
        finally:
            records = traffic.stop()
    finally:
        gateway.stop()
    judged = {(callers[r.caller].key, r.kind, r.outcome) for r in records if r.chat}
    assert judged == {(key, kind, outcome) for key, outcome in JUDGED.items() for kind in CHAT_KINDS}, [
        (callers[r.caller].key, r.kind, r.outcome, r.note) for r in records if r.chat]
    assert {r.note for r in records if r.chat and callers[r.caller].key == "hang"} == {
        "no answer within the client's 1 s"}
    storage = {(callers[r.caller].key == "ok", r.kind, r.outcome) for r in records if not r.chat}
    assert storage == {(False, "storage_put", SUCCEEDED), (False, "storage_get", SUCCEEDED),
                       (True, "storage_put", SUCCEEDED), (True, "storage_get", OTHER)}
    assert {r.error_code for r in records if r.chat and callers[r.caller].key == "frame"} == {"BACKEND_ERROR"}
