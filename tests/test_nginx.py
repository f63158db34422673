"""nginx as the appliance renders it: `nginx -t` on the rendered config, then real requests through a running stack
(redirect, TLS, API, metrics restrictions, storage limits, gRPC, a 90-second SSE stream) and WebSocket upgrades."""

import asyncio
import getpass
import http.client
import json
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import httpcore2
import httpx2
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from appliance import config as appliance_config
from appliance import devstack, firstboot, render
from appliance.config import Appliance
from appliance.local import child_env
from appliance.programs import NGINX
from tests.appliance_stack import ApplianceStack, devstack_client, free_listener_ports, start_stack
from tests.backends import catalogue_toml
from tests.nginx_upstreams import EchoSocket, ScheduledStream
from tests.support.waiting import eventually, eventually_async

MiB = 1024 * 1024
LIMIT_BYTES = 10 * MiB  # STORAGE_MAX_OBJECT_BYTES of this module's stack: small, so uploading past it is cheap
PART_BYTES = 5 * MiB
STORAGE = "/v1/modules/scaibunker/storage"
SCRAPER = "127.0.0.2"  # METRICS_ALLOW_NETWORKS of this module's stack: a scraper that is not 127.0.0.1
STRANGER = "127.0.0.3"  # loopback too, yet neither 127.0.0.1 nor a configured network
# The stream test: 90 s in all, its longest quiet gap 70 s; both beyond nginx's default 60 s proxy_read_timeout.
STREAM_GAPS_S = (5.0, 5.0, 70.0, 5.0, 5.0)
STREAM_MODEL = "nginx/scheduled"
# OPENAI_HOSTNAME of this module's stack: a name no resolver knows; the SDK's transport below connects it to loopback.
OPENAI_HOST = "openai.scaigrid.test"


# --- the rendered config, checked by nginx itself ---

def rendered(directory: Path, **values: str) -> Appliance:
    """An appliance config under `directory` on free ports, its secrets and TLS made, its files rendered."""
    keys = {
        "APPLIANCE_USER": getpass.getuser(),
        "APPLIANCE_CONFIG_DIR": str(directory / "etc"),
        "APPLIANCE_STATE_DIR": str(directory / "lib"),
        "APPLIANCE_LOG_DIR": str(directory / "log"),
        "APPLIANCE_RUN_DIR": str(directory / "run"),
        "SYSTEMD_UNIT_DIR": str(directory / "etc" / "systemd"),
        "HTTP_PROCESSES": "2",
        **free_listener_ports(2, 1),
        **values,
    }
    path = directory / "appliance.env"
    path.write_text("".join(f"{key}={value}\n" for key, value in keys.items()))
    appliance = appliance_config.load(path)
    firstboot.ensure_dirs(appliance)
    firstboot.ensure_secrets(appliance)
    firstboot.ensure_tls(appliance)
    render.write(Path("/"), render.outputs(appliance), appliance.config.user)
    return appliance


def nginx_conf(appliance: Appliance) -> Path:
    return appliance.config.config_dir / "nginx.conf"


def metrics_locations(text: str) -> dict[str, list[str]]:
    """Each /metrics location of a rendered nginx.conf, with its access rules in order."""
    return {path: re.findall(r"^\s*((?:allow|deny) \S+);", block, re.M)
            for path, block in re.findall(r"location = (/metrics\S*) \{(.*?)\}", text, re.S)}


S3_KEYS = {"S3_ENDPOINT_URL": "http://127.0.0.1:9", "S3_ACCESS_KEY_ID": "k", "S3_SECRET_ACCESS_KEY": "s",
           "S3_BUCKET": "b"}


@pytest.mark.parametrize(("storage", "values"), [
    pytest.param(set(), {}, id="no-storage"),
    pytest.param({"bunker_proxy"}, {**S3_KEYS, "STORAGE_MAX_OBJECT_BYTES": "123456789"}, id="s3"),
    pytest.param({"bunker_proxy", "garage"}, {"GARAGE_ENABLED": "true"}, id="garage"),
])
def test_the_rendered_config_passes_nginx_t(tmp_path, storage, values):
    networks = ["10.20.0.0/16", "192.0.2.7/32"]
    appliance = rendered(tmp_path, METRICS_ALLOW_NETWORKS=", ".join(networks), DISPATCH_STREAM_TIMEOUT_S="300",
                         **values)
    checked = subprocess.run([NGINX, "-t", "-c", str(nginx_conf(appliance))], capture_output=True,
                             text=True, timeout=30, check=False)
    assert checked.returncode == 0, checked.stderr
    text = nginx_conf(appliance).read_text()
    # Storage routes exist exactly when bunker_proxy runs, with its own body limit.
    assert ("upstream scaigrid_bunker_proxy" in text) == bool(storage)
    assert ("location /v1/modules/scaibunker/storage/objects" in text) == bool(storage)
    if "STORAGE_MAX_OBJECT_BYTES" in values:
        assert "client_max_body_size 123456789;" in text
    # Streams may stay open for DISPATCH_STREAM_TIMEOUT_S; nginx waits 60 s longer.
    assert set(re.findall(r"proxy_read_timeout (\S+);", text)) == {"360s"}
    # Every process's /metrics, each open to loopback and the configured networks alone.
    locations = metrics_locations(text)
    expected = ({"/metrics/http_1", "/metrics/http_2", "/metrics/grpc", "/metrics/worker_1", "/metrics/events"}
                | {f"/metrics/{p}" for p in storage})
    assert set(locations) == expected
    rules = ["allow 127.0.0.1", "allow ::1", *(f"allow {network}" for network in networks), "deny all"]
    assert all(found == rules for found in locations.values()), locations


# --- one running stack for the module ---

@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, mariadb: devstack.MariaDB, redis_server: devstack.Redis,
          s3_server: devstack.S3Server) -> Iterator[ApplianceStack]:
    """The whole appliance, with a small storage limit and one scrape network besides loopback."""
    running = start_stack(tmp_path_factory.mktemp("nginx"), mariadb, redis_server, s3_server,
                          STORAGE_MAX_OBJECT_BYTES=str(LIMIT_BYTES), STORAGE_PART_SIZE_BYTES=str(PART_BYTES),
                          METRICS_ALLOW_NETWORKS=f"{SCRAPER}/32", OPENAI_HOSTNAME=OPENAI_HOST)
    running.extra["s3"] = devstack_client(s3_server)
    yield running
    running.stop()


def request(stack: ApplianceStack, method: str, path: str, *, key: str | None = None,
            body: bytes | Iterable[bytes] | None = None, source: str = "127.0.0.1"
            ) -> tuple[int, dict[str, str], bytes]:
    """One HTTPS request through nginx, verifying its certificate, from the given loopback source address.

    A body given in pieces goes chunked, as from a client that does not know its length up front.
    """
    connection = http.client.HTTPSConnection("127.0.0.1", stack.config.https_port, timeout=60,
                                             context=stack.tls_context(), source_address=(source, 0))
    try:
        connection.request(method, path, body=body,
                           headers={"Authorization": f"Bearer {key}"} if key is not None else {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def scaigrid_cli(stack: ApplianceStack, *args: str) -> str:
    """`scaigrid ARGS` on the stack's rendered env file, as an operator on the appliance runs it."""
    argv = [str(stack.config.venv / "bin" / "scaigrid"), "--env-file", str(stack.config.scaigrid_env_file), *args]
    result = subprocess.run(argv, env=child_env(), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_plain_http_is_redirected_to_https_on_its_port(stack):
    connection = http.client.HTTPConnection("127.0.0.1", stack.config.http_redirect_port, timeout=10)
    try:
        connection.request("GET", "/v1/models?limit=1")
        response = connection.getresponse()
        assert response.status == 301
        assert response.getheader("Location") == f"https://127.0.0.1:{stack.config.https_port}/v1/models?limit=1"
    finally:
        connection.close()


def test_health_and_the_api_answer_through_tls(stack):
    assert request(stack, "GET", "/health")[0] == 200
    status, _, body = request(stack, "GET", "/health/ready")
    assert (status, json.loads(body)["status"]) == (200, "ready")
    # Both API roots reach the http process: its envelope, its request ids, its authentication.
    status, headers, body = request(stack, "GET", "/v1/models", key=stack.admin_key)
    assert (status, json.loads(body)["status"]) == (200, "ok") and headers["x-request-id"].startswith("req_")
    status, _, body = request(stack, "GET", "/oai/v1/models", key=stack.admin_key)
    assert status == 200 and json.loads(body)["object"] == "list"
    status, _, body = request(stack, "GET", "/oai/v1/models")
    assert (status, json.loads(body)["error"]["code"]) == (401, "AUTH_TOKEN_MISSING")
    for unknown in ("/", "/admin", "/v2/models", "/metricsx"):
        assert request(stack, "GET", unknown)[0] == 404, unknown


def test_a_program_that_is_down_is_answered_in_the_api_envelope(stack):
    stack.supervisor.stop("http:http_1")
    try:
        # One http process down: nginx sends every request to the other.
        for _ in range(4):
            assert request(stack, "GET", "/v1/models", key=stack.admin_key)[0] == 200
        stack.supervisor.stop("http:*")
        status, headers, body = request(stack, "GET", "/v1/models", key=stack.admin_key)
        assert (status, json.loads(body)["error"]["code"], headers["retry-after"]) == (503, "UPSTREAM_UNAVAILABLE", "5")
    finally:
        stack.supervisor.start("http:*")
    assert request(stack, "GET", "/health/ready")[0] == 200


def test_metrics_answer_loopback_and_scrape_networks_only(stack):
    paths = ["/metrics/http_1", "/metrics/http_2", "/metrics/grpc", "/metrics/worker_1", "/metrics/worker_2",
             "/metrics/bunker_proxy", "/metrics/events"]
    for path in paths:
        status, _, body = request(stack, "GET", path)
        assert status == 200 and b"# TYPE " in body, path
        assert request(stack, "GET", path, source=SCRAPER)[0] == 200, path
        assert request(stack, "GET", path, source=STRANGER)[0] == 403, path
    # Each http process's own metrics, not another program's.
    assert all(b"scaigrid_requests_total" in request(stack, "GET", f"/metrics/http_{i}")[2] for i in (1, 2))
    assert b"scaigrid_appliance_program_running" in request(stack, "GET", "/metrics/events")[2]
    # Everything else stays open to any address: only metrics are restricted.
    assert request(stack, "GET", "/health", source=STRANGER)[0] == 200


def bytes_in(stack: ApplianceStack) -> float:
    """Object bytes bunker_proxy has received, from its own /metrics."""
    text = request(stack, "GET", "/metrics/bunker_proxy")[2].decode()
    match = re.search(r'^scaibunker_storage_bytes_total\{direction="in"\} (\S+)$', text, re.M)
    return float(match[1]) if match else 0.0


def test_storage_goes_to_bunker_proxy_with_its_own_body_limit(stack):
    status, _, body = request(stack, "POST", STORAGE + "/capabilities", key=stack.admin_key,
                              body=json.dumps({"prefix": "nginx/", "verbs": ["PUT", "GET"]}).encode())
    assert status == 201, body
    token = json.loads(body)["data"]["token"]
    before = bytes_in(stack)
    whole = bytes(range(256)) * (LIMIT_BYTES // 256)
    status, _, body = request(stack, "PUT", f"{STORAGE}/objects/nginx/exact", key=token, body=whole)
    assert status == 201, body
    assert bytes_in(stack) - before == LIMIT_BYTES  # bunker_proxy took it, not the http process
    status, _, body = request(stack, "GET", f"{STORAGE}/objects/nginx/exact", key=token)
    assert status == 200 and body == whole
    # One byte more is refused, declared or not, and nothing of it is stored.
    # nginx answers in the API's envelope, with the code bunker_proxy itself would give.
    status, _, body = request(stack, "PUT", f"{STORAGE}/objects/nginx/over", key=token, body=whole + b"!")
    assert status == 413 and json.loads(body)["error"]["code"] == "STORAGE_OBJECT_TOO_LARGE"
    status, _, body = request(stack, "PUT", f"{STORAGE}/objects/nginx/over-chunked", key=token,
                              body=iter([whole, b"!"]))
    assert status == 413 and json.loads(body)["error"]["code"] == "STORAGE_OBJECT_TOO_LARGE"
    bucket = stack.appliance.passthrough["S3_BUCKET"]
    stored = {o.object_name.rpartition("/nginx/")[2] for o in stack.extra["s3"].list_objects(bucket, recursive=True)}
    assert stored == {"exact"}


def test_grpc_over_tls_reaches_the_grpc_process_and_long_streams_are_not_capped(stack):
    credentials = grpc.ssl_channel_credentials(root_certificates=stack.config.tls_cert.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{stack.config.grpc_tls_port}", credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # A node's stream lives long and sends much in all: 24 messages of 64 KiB on one stream (reflection is a
        # bidirectional stream the grpc process serves to anyone) pass the 1 MiB nginx allows a body by default.
        messages = (reflection_pb2.ServerReflectionRequest(host="x" * 65536, list_services="") for _ in range(24))
        replies = list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(messages, timeout=30))
    assert len(replies) == 24
    assert all("grpc.health.v1.Health" in {s.name for s in r.list_services_response.service} for r in replies)


# --- OPENAI_HOSTNAME: the OpenAI API at /v1/, for SDKs given base_url https://<that host>/v1 ---

class LoopbackBackend(httpcore2.SyncBackend):
    """Connects every host name to 127.0.0.1, as if DNS said so. The URL keeps its host, so the TLS handshake's SNI,
    the certificate check and the Host header all name it: what nginx routes on is what a real client sends."""

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore2.NetworkStream:
        return super().connect_tcp("127.0.0.1", port, timeout, local_address, socket_options)


def loopback_client(context: ssl.SSLContext) -> httpx2.Client:
    """An httpx client for the OpenAI SDK whose connections all go to loopback (see LoopbackBackend)."""
    transport = httpx2.HTTPTransport(verify=context)
    # httpx's transport takes no network backend: its connection pool is swapped for one that has ours.
    transport._pool = httpcore2.ConnectionPool(ssl_context=context, network_backend=LoopbackBackend())
    return httpx2.Client(transport=transport)


@pytest.fixture(scope="module")
def demo_model(stack: ApplianceStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """make run's demo model (appliance/demo.py) in the stack's catalogue; its slug."""
    demo = devstack.start_demo(tmp_path_factory.mktemp("demo"))
    catalogue = tmp_path_factory.mktemp("demo-catalogue") / "catalogue.toml"
    catalogue.write_text(catalogue_toml([{"id": "demo", "provider": "custom", "base_url": demo.url, "model": "echo"}],
                                        [{"slug": "demo/echo", "modality": "chat", "routes": [{"backend": "demo"}]}]))
    scaigrid_cli(stack, "admin", "apply", str(catalogue))
    yield "demo/echo"
    demo.stop()


def test_the_openai_host_serves_the_openai_api_at_v1_to_the_openai_sdk(stack, demo_model):
    with loopback_client(stack.tls_context()) as http_client:
        client = openai.OpenAI(base_url=f"https://{OPENAI_HOST}:{stack.config.https_port}/v1",
                               api_key=stack.admin_key, http_client=http_client, max_retries=0)
        eventually(lambda: demo_model in {model.id for model in client.models.list()}, "the demo model listed")
        stream = client.chat.completions.create(model=demo_model, stream=True,
                                                messages=[{"role": "user", "content": "one two three"}])
        assert [chunk.choices[0].delta.content for chunk in stream if chunk.choices and
                chunk.choices[0].delta.content] == ["one ", "two ", "three"]
        completion = client.chat.completions.create(model=demo_model, messages=[{"role": "user", "content": "hi"}])
        assert completion.choices[0].message.content == "hi" and completion.model == demo_model
        # The gateway's errors come in OpenAI's shape, so the SDK raises what its users catch.
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="no/such-model", messages=[{"role": "user", "content": "hi"}])
        assert missing.value.code == "MODEL_NOT_FOUND"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=client.base_url, api_key="sgk_wrong", http_client=http_client,
                          max_retries=0).models.list()
        # That host has nothing else: the native API and metrics stay on the main host.
        response = http_client.get(f"https://{OPENAI_HOST}:{stack.config.https_port}/metrics")
        assert response.status_code == 404 and response.json()["error"]["code"] == "NOT_FOUND"
        response = http_client.get(f"https://{OPENAI_HOST}:{stack.config.https_port}/oai/v1/models")
        assert response.status_code == 404
    # The main host keeps its native /v1/ and its /oai/v1/.
    status, _, body = request(stack, "GET", "/v1/models", key=stack.admin_key)
    assert (status, json.loads(body)["status"]) == (200, "ok")
    status, _, body = request(stack, "GET", "/oai/v1/models", key=stack.admin_key)
    assert status == 200 and json.loads(body)["object"] == "list"


# --- a long stream, relayed as it is written ---

@pytest.fixture(scope="module")
def scheduled() -> Iterator[ScheduledStream]:
    server = ScheduledStream(STREAM_GAPS_S).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stream_key(stack: ApplianceStack, scheduled: ScheduledStream, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tenant_user key, with STREAM_MODEL in the stack's catalogue, routed to the scheduled backend."""
    catalogue = tmp_path_factory.mktemp("catalogue") / "catalogue.toml"
    catalogue.write_text(catalogue_toml(
        [{"id": "scheduled", "provider": "custom", "base_url": scheduled.url, "model": "scheduled"}],
        [{"slug": STREAM_MODEL, "modality": "chat", "routes": [{"backend": "scheduled"}]}]))
    scaigrid_cli(stack, "admin", "apply", str(catalogue))
    key = scaigrid_cli(stack, "admin", "create-key", "--role", "tenant_user")

    def listed() -> bool:
        status, _, body = request(stack, "GET", "/oai/v1/models", key=key)
        return status == 200 and STREAM_MODEL in {item["id"] for item in json.loads(body)["data"]}

    eventually(listed, "the http process serving the applied catalogue")
    return key


async def tls_closed(sock: Any, what: str) -> None:
    """Waits until an aiohttp client's TLS socket is closed. Closing TLS ends with a shutdown exchange that finishes
    after the session has closed; a test's event loop that ended first would leave the transport to be collected
    open, an unraisable ResourceWarning failing a later test (what setup.cfg once filtered)."""
    await eventually_async(lambda: sock.fileno() == -1, f"{what} closed", timeout_s=10)


# The stream lasts sum(STREAM_GAPS_S) = 90 s: the default 120 s leaves too little for starting the stack when this
# test runs first (alone, or with -k).
@pytest.mark.timeout(sum(STREAM_GAPS_S) + 120)
async def test_a_90_second_stream_with_a_70_second_gap_is_relayed_unbuffered(stack, scheduled, stream_key):
    received_at: dict[int, float] = {}
    lines = []
    async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=sum(STREAM_GAPS_S) + 60)) as session,
                session.post(f"{stack.url}/v1/inference/chat", ssl=stack.tls_context(),
                             headers={"Authorization": f"Bearer {stream_key}"},
                             json={"model": STREAM_MODEL, "messages": [{"role": "user", "content": "hi"}],
                                   "stream": True}) as response):
        assert response.status == 200
        assert response.connection is not None
        sock = response.connection.transport.get_extra_info("socket")
        async for raw in response.content:
            line = raw.decode().strip()
            lines.append(line)
            if token := re.search(r'"content": "tok(\d+) "', line):
                received_at[int(token[1])] = time.monotonic()
    await tls_closed(sock, "the stream's TLS connection")
    # Every token came, in order, and the stream ended as the backend ended it: no error frame, no cut.
    assert list(received_at) == list(range(len(STREAM_GAPS_S) + 1))
    assert lines[-2:] == ["data: [DONE]", ""] and not [line for line in lines if line.startswith("event: error")]
    # Each token reached the client before the backend wrote the next one: nothing held it back on the way.
    assert all(received_at[index] < scheduled.sent_at[index + 1] for index in range(len(STREAM_GAPS_S)))


# --- WebSocket upgrades, relayed to a stand-in for the http process ---

@pytest.fixture(scope="module")
def echo() -> Iterator[EchoSocket]:
    server = EchoSocket().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def nginx_alone(tmp_path_factory: pytest.TempPathFactory, echo: EchoSocket) -> Iterator[Appliance]:
    """nginx on its rendered config, with HTTP_PORT pointing at the echo server; stopped at the end."""
    appliance = rendered(tmp_path_factory.mktemp("nginx-alone"), HTTP_PORT=str(echo.port))
    log_path = appliance.config.log_dir / "nginx.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([NGINX, "-c", str(nginx_conf(appliance))], stdout=log,
                                   stderr=subprocess.STDOUT)

    def listening() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"nginx exited with {process.returncode}:\n{devstack.log_tail(log_path)}")
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", appliance.config.https_port)) == 0

    try:
        eventually(listening, "nginx listening")
        yield appliance
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


@pytest.mark.parametrize("path", ["/v1/realtime", "/oai/v1/realtime"])
async def test_websocket_upgrades_are_relayed(nginx_alone, path):
    context = ssl.create_default_context(cafile=str(nginx_alone.config.tls_cert))
    async with (aiohttp.ClientSession() as session,
                session.ws_connect(f"wss://127.0.0.1:{nginx_alone.config.https_port}{path}", ssl=context) as ws):
        await ws.send_str("hello")
        assert await asyncio.wait_for(ws.receive_str(), 10) == f"{path}: hello"
        sock = ws.get_extra_info("socket")
    await tls_closed(sock, "the websocket's TLS connection")
