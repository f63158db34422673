"""deploy/compose/compose.yaml for real: docker-compose against podman's Docker API brings the stack up (migrate
first), OpenAI-SDK traffic goes through nginx under OPENAI_HOSTNAME, and a rolling upgrade to a new image (migrate,
then the http replicas one at a time) loses no request."""

import contextlib
import secrets
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import openai
import pytest
from cryptography.fernet import Fernet

from appliance import devstack
from tests.support import containers
from tests.support.waiting import eventually
from tests.test_nginx import loopback_client

pytestmark = pytest.mark.timeout(900)

COMPOSE_DIR = containers.REPO / "deploy" / "compose"
OPENAI_HOST = "api.openai.test"
MODEL = "compose/echo"
# The fake model backend inside the compose network (bench's zero-delay OpenAI-compatible server, from the image's
# own Python and aiohttp): the containers reach nothing outside their network, the test nothing beyond 127.0.0.1.
LLM_PORT = 9000
LLM_SERVICE = f"""
services:
  llm:
    image: ${{LLM_IMAGE}}
    entrypoint: ["python3", "-c"]
    command: ["from aiohttp import web; from bench.mock_upstream import make_app, BACKLOG; \
web.run_app(make_app(), host='0.0.0.0', port={LLM_PORT}, backlog=BACKLOG, print=None)"]
    environment:
      PYTHONPATH: /opt/test
    volumes:
      - {containers.REPO / "bench"}:/opt/test/bench:ro
    healthcheck:
      test: ["CMD-SHELL", "python3 -c \\"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{LLM_PORT}/v1/models')\\""]
      interval: 5s
  migrate:
    depends_on:
      llm:
        condition: service_healthy
"""
CATALOGUE = f"""
[[backends]]
id = "llm"
provider = "custom"
base_url = "http://llm:{LLM_PORT}/v1"
model = "echo"

[[models]]
slug = "{MODEL}"
display_name = "Echo"
modality = "chat"
context_window = 8192
max_output_tokens = 1024
status = "active"
routes = [{{ backend = "llm", weight = 1, priority = 1 }}]
"""
UP_TIMEOUT_S = 420
STOP_GRACE_S = 45
TRAFFIC_CLIENTS = 4


@dataclass
class Stack:
    """A running compose project and how to drive it."""

    project: str
    directory: Path
    docker_host: str
    nginx_port: int
    values: dict[str, str]

    def compose(self, *args: str, timeout_s: float = UP_TIMEOUT_S) -> str:
        argv = ["docker-compose", "--project-name", self.project, "--project-directory", str(COMPOSE_DIR),
                "--env-file", str(self.directory / ".env"), "--file", str(COMPOSE_DIR / "compose.yaml"),
                "--file", str(self.directory / "compose.test.yaml"), *args]
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "DOCKER_HOST": self.docker_host,
               "COMPOSE_HTTP_TIMEOUT": "300"}
        return containers.run(argv, timeout_s=timeout_s, env=env)

    def write_env(self, **changes: str) -> None:
        """The stack's .env (0600: it holds the stack's secrets), with `changes` applied."""
        self.values.update(changes)
        path = self.directory / ".env"
        path.touch(mode=0o600)
        path.write_text("".join(f"{key}={value}\n" for key, value in self.values.items()))

    def containers_of(self, service: str) -> list[str]:
        listed = containers.podman("ps", "--filter", f"label=com.docker.compose.project={self.project}",
                                   "--filter", f"label=com.docker.compose.service={service}", "--format",
                                   "{{.Names}}")
        return sorted(listed.split())

    def admin(self, *args: str, volume: str | None = None) -> str:
        """`scaigrid ARGS` in a one-off container of the migrate service (the image and settings of the stack)."""
        mounts = ["-v", volume] if volume else []
        return self.compose("run", "--rm", "--no-deps", "-T", *mounts, "migrate", "scaigrid", *args,
                            timeout_s=120)


def logs(name: str) -> str:
    result = subprocess.run(["podman", "logs", name], capture_output=True, text=True, check=False)
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    image = containers.build_image()
    services = containers.services_image()
    directory = tmp_path_factory.mktemp("compose")
    nginx_port, grpc_port = devstack.free_ports(2)
    project = "sg" + secrets.token_hex(4)
    (directory / "compose.test.yaml").write_text(LLM_SERVICE)
    with containers.api_service(directory) as docker_host:
        stack = Stack(project, directory, docker_host, nginx_port, {})
        stack.write_env(
            ENV_FILE=str(directory / ".env"), SCAIGRID_IMAGE=image, LLM_IMAGE=image, SERVICES_IMAGE=services,
            LISTEN_ADDRESS="127.0.0.1",
            NGINX_PUBLISHED_PORT=str(nginx_port), GRPC_PUBLISHED_PORT=str(grpc_port), HTTP_REPLICAS="2",
            OPENAI_HOSTNAME=OPENAI_HOST, MARIADB_DATABASE="scaigrid", MARIADB_USER="scaigrid",
            MARIADB_PASSWORD=secrets.token_hex(16), REDIS_PASSWORD=secrets.token_hex(16),
            S3_ACCESS_KEY_ID="compose", S3_SECRET_ACCESS_KEY=secrets.token_hex(16), S3_BUCKET="scaigrid",
            SCAIGRID_ENCRYPTION_KEY=Fernet.generate_key().decode(), JWT_SIGNING_SECRET=secrets.token_hex(32),
            STORAGE_CAPABILITY_SECRET=secrets.token_hex(32), APP_ENV="test", APP_LOG_LEVEL="info",
            # The model backend is a container on the project's (private) network.
            BACKEND_ALLOW_PRIVATE_TARGETS="true",
            # The test's traffic is one key at a few hundred requests a minute.
            RATE_LIMIT_KEY_RPM="1000000", RATE_LIMIT_USER_RPM="1000000", RATE_LIMIT_TENANT_RPM="1000000",
            RATE_LIMIT_PARTNER_RPM="1000000")
        try:
            with containers.healthchecks_driven(f"com.docker.compose.project={project}"):
                stack.compose("up", "--detach")
                yield stack
        finally:
            with contextlib.suppress(containers.ContainerError, subprocess.TimeoutExpired):
                stack.compose("down", "--volumes", "--timeout", "10", timeout_s=180)
            with contextlib.suppress(Exception):
                (directory / "podman.sock").unlink()
    shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Traffic:
    """OpenAI-SDK clients sending chats through nginx in threads until stopped; what they sent and what failed."""

    client: openai.OpenAI
    sent: int = 0
    failed: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def one(self, stream: bool) -> None:
        if stream:
            chunks = self.client.chat.completions.create(model=MODEL, stream=True,
                                                         messages=[{"role": "user", "content": "hi"}])
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            reply = self.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
            text = reply.choices[0].message.content or ""
        assert text.strip(), "an empty answer"

    def loop(self, index: int) -> None:
        count = 0
        while not self.stop.is_set():
            count += 1
            try:
                self.one(stream=(count + index) % 2 == 0)
                outcome = None
            except Exception as exc:  # every failure counts, whatever its kind
                outcome = f"{type(exc).__name__}: {exc}"[:300]
            with self.lock:
                self.sent += 1
                if outcome:
                    self.failed.append(outcome)

    @contextlib.contextmanager
    def flowing(self, clients: int) -> Iterator["Traffic"]:
        threads = [threading.Thread(target=self.loop, args=(i,), daemon=True) for i in range(clients)]
        for thread in threads:
            thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(timeout=60)


@pytest.fixture(scope="module")
def api_key(stack: Stack) -> str:
    catalogue = stack.directory / "catalogue.toml"
    catalogue.write_text(CATALOGUE)
    catalogue.chmod(0o644)  # read by the image's user; it holds no secret
    stack.admin("admin", "apply", "/catalogue.toml", volume=f"{catalogue}:/catalogue.toml:ro")
    return stack.admin("admin", "create-key", "--role", "tenant_admin").strip().splitlines()[-1]


@pytest.fixture
def sdk(stack: Stack, api_key: str) -> Iterator[openai.OpenAI]:
    # Plain HTTP to nginx's published port; the made-up OPENAI_HOSTNAME is connected to 127.0.0.1 (and sent as the
    # Host header nginx routes on), as DNS would for a real one.
    with loopback_client(ssl.create_default_context()) as http_client:
        yield openai.OpenAI(base_url=f"http://{OPENAI_HOST}:{stack.nginx_port}/v1", api_key=api_key,
                            http_client=http_client, max_retries=0, timeout=60)


def served_through_nginx(stack: Stack) -> bool:
    try:
        return httpx2.get(f"http://127.0.0.1:{stack.nginx_port}/health/ready", timeout=5).status_code == 200
    except httpx2.HTTPError:
        return False


def test_the_stack_comes_up_migrated_healthy_and_serves_the_openai_host(stack: Stack, sdk: openai.OpenAI) -> None:
    migrate = stack.compose("ps", "--all", "--quiet", "migrate")
    assert migrate.strip(), "no migrate container"
    for service in ("mariadb", "redis", "s3", "http", "grpc", "worker", "bunker_proxy", "nginx"):
        names = stack.containers_of(service)
        assert len(names) == (2 if service == "http" else 1), (service, names)
        for name in names:
            eventually(lambda n=name: containers.health(n), f"{name} healthy", timeout_s=120, interval_s=1,
                       context=lambda n=name: logs(n)[-2000:])
    eventually(lambda: served_through_nginx(stack), "/health/ready through nginx", timeout_s=60, interval_s=0.5)
    reply = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    chunks = list(sdk.chat.completions.create(model=MODEL, stream=True, messages=[{"role": "user", "content": "x"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    # Only nginx and gRPC are published, and only on loopback.
    published = containers.podman("ps", "--filter", f"label=com.docker.compose.project={stack.project}",
                                  "--format", "{{.Ports}}")
    assert all(line.startswith("127.0.0.1:") for line in published.split() if "->" in line), published


@pytest.mark.timeout(900)
def test_a_rolling_upgrade_of_the_http_replicas_loses_no_request(stack: Stack, sdk: openai.OpenAI) -> None:
    eventually(lambda: served_through_nginx(stack), "/health/ready through nginx", timeout_s=120, interval_s=0.5)
    old = stack.containers_of("http")
    assert len(old) == 2
    new_image = containers.relabelled(stack.values["SCAIGRID_IMAGE"], f"{containers.IMAGE}-next",
                                      {"org.scaigrid.test.release": secrets.token_hex(4)})
    new_id = containers.image_id(new_image)
    traffic = Traffic(sdk)
    started_s = time.monotonic()
    with traffic.flowing(TRAFFIC_CLIENTS):
        eventually(lambda: traffic.sent >= 20, "traffic flowing", timeout_s=60, interval_s=0.2)
        # 1. The new image's migrations, before any replica runs it.
        stack.write_env(SCAIGRID_IMAGE=new_image)
        stack.compose("run", "--rm", "--no-deps", "-T", "migrate", timeout_s=300)
        # 2. One http replica at a time: start a new one, wait until nginx sends it requests, then stop an old one
        #    (SIGTERM: it drains; nginx passes what it refuses to the others).
        for replaced in old:
            before = set(stack.containers_of("http"))
            stack.compose("up", "--detach", "--no-deps", "--no-recreate", "--scale", "http=3", "http")
            (added,) = set(stack.containers_of("http")) - before
            eventually(lambda a=added: containers.health(a), f"{added} healthy", timeout_s=120, interval_s=1,
                       context=lambda a=added: logs(a)[-2000:])
            eventually(lambda a=added: "/oai/v1/chat/completions" in logs(a), f"nginx sends {added} requests",
                       timeout_s=60, interval_s=0.5)
            containers.podman("stop", "--time", str(STOP_GRACE_S), replaced, timeout_s=STOP_GRACE_S + 30)
            containers.podman("rm", replaced)
        # 3. The other modes: recreated on the new image (one replica each; not on the request path of this traffic).
        stack.compose("up", "--detach", "--no-deps", "grpc", "worker", "bunker_proxy")
        sent_at_end = traffic.sent
        eventually(lambda: traffic.sent >= sent_at_end + 20, "traffic after the upgrade", timeout_s=60,
                   interval_s=0.2)
    elapsed_s = time.monotonic() - started_s
    print(f"\nrolling upgrade: {traffic.sent} requests sent, {len(traffic.failed)} failed, {elapsed_s:.0f} s")
    assert traffic.failed == [], traffic.failed[:5]
    now = stack.containers_of("http")
    assert len(now) == 2 and not set(now) & set(old)
    for name in now + stack.containers_of("grpc") + stack.containers_of("worker"):
        assert containers.podman("inspect", "--format", "{{.Image}}", name).strip() in new_id
