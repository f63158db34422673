"""Layered fixtures: session-wide real services, a fresh database/Redis/bucket per test, and mode subprocesses."""

import gc
import json
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import redis as sync_redis
from cryptography.fernet import Fernet
from minio import Minio

from appliance import devstack
from appliance.local import child_env
from scaigrid.settings import Settings, load_settings
from tests.appliance_stack import ApplianceStack

REPO = Path(__file__).resolve().parents[1]
PORT_SETTINGS = ("HTTP_PORT", "GRPC_PORT", "BUNKER_PROXY_PORT", "GRPC_METRICS_PORT", "WORKER_METRICS_PORT",
                 "LINK_METRICS_PORT")


# --- session: one real server of each kind ---

@pytest.fixture(scope="session")
def services_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Short path: MariaDB's unix socket path must stay under 108 bytes.
    return tmp_path_factory.mktemp("svc")


@pytest.fixture(scope="session")
def mariadb(services_dir: Path) -> Iterator[devstack.MariaDB]:
    server = devstack.start_mariadb(services_dir / "mariadb")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(services_dir: Path) -> Iterator[devstack.Redis]:
    server = devstack.start_redis(services_dir / "redis")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(services_dir: Path) -> Iterator[devstack.S3Server]:
    server = devstack.start_s3(services_dir / "s3")
    yield server
    server.stop()


# --- function: isolated state on those servers ---

@pytest.fixture
def database_url(mariadb: devstack.MariaDB) -> Iterator[str]:
    """A fresh, empty database (and its own user) for this test."""
    name = "t_" + secrets.token_hex(6)
    yield mariadb.create_database(name, name, secrets.token_hex(12))
    mariadb.drop_database(name)


@pytest.fixture
def redis_url(redis_server: devstack.Redis) -> str:
    """The session Redis, emptied for this test."""
    with sync_redis.Redis(port=redis_server.port) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
def s3_bucket(s3_server: devstack.S3Server) -> str:
    bucket = "t-" + secrets.token_hex(6)
    s3_client(s3_server).make_bucket(bucket)
    return bucket


def s3_client(server: devstack.S3Server) -> Minio:
    return Minio(f"127.0.0.1:{server.port}", access_key=server.access_key_id,
                 secret_key=server.secret_access_key, secure=False)


@pytest.fixture
def env(database_url: str, redis_url: str, s3_server: devstack.S3Server, s3_bucket: str) -> dict[str, str]:
    """Complete settings for a node on this test's database, Redis and bucket, with free ports."""
    return node_env(database_url, redis_url, s3_server, s3_bucket)


def node_env(database_url: str, redis_url: str, s3_server: devstack.S3Server, s3_bucket: str) -> dict[str, str]:
    """Complete settings for a node on that database, Redis and bucket, with free ports (for any fixture scope)."""
    return {
        "APP_ENV": "test",
        "APP_LOG_LEVEL": "debug",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "S3_ENDPOINT_URL": s3_server.endpoint_url,
        "S3_ACCESS_KEY_ID": s3_server.access_key_id,
        "S3_SECRET_ACCESS_KEY": s3_server.secret_access_key,
        "S3_BUCKET": s3_bucket,
        **dict(zip(PORT_SETTINGS, map(str, devstack.free_ports(len(PORT_SETTINGS))), strict=True)),
        "JWT_SIGNING_SECRET": secrets.token_hex(32),
        "SCAIGRID_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "SERVICE_TOKEN_SECRET": secrets.token_hex(32),
    }


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return load_settings(env, env_file=None)


# --- subprocesses: the `scaigrid` command as an operator runs it ---

def command_env(env: dict[str, str]) -> dict[str, str]:
    """The test's settings on top of a minimal environment (no stray SCAIGRID_* or DATABASE_URL from the host)."""
    # Warnings are errors in the processes under test too, as in pytest itself.
    return {**child_env(), "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "error", **env}


def scaigrid(*args: str, env: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """Runs `python -m scaigrid ARGS` to completion."""
    return subprocess.run([sys.executable, "-m", "scaigrid", *args], env=command_env(env), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout_s, check=False)


@dataclass
class ModeProcess:
    """A `scaigrid run --mode MODE` subprocess whose stdout (JSON log lines) goes to a file."""

    mode: str
    process: subprocess.Popen[bytes]
    log_path: Path
    signalled: bool = field(default=False)

    def log_lines(self) -> list[dict[str, object]]:
        lines = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                lines.append({"raw": raw})
        return lines

    def wait_for(self, condition: Callable[[], bool], timeout_s: float = 30, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.mode} exited with {self.process.returncode} before {what}:\n{self.tail()}")
            try:
                if condition():
                    return
            except (OSError, urllib.error.URLError, grpc.RpcError):  # not up yet
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.mode}: {what} not reached in {timeout_s} s:\n{self.tail()}")

    def send(self, sig: int = signal.SIGTERM) -> None:
        self.signalled = True
        self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        """Sends `sig` (once: a second SIGTERM means "stop now") and returns the exit status."""
        if self.process.poll() is None and not self.signalled:
            self.send(sig)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"{self.mode} did not exit within {timeout_s} s of {sig}:\n{self.tail()}") from None

    def tail(self) -> str:
        return devstack.log_tail(self.log_path)


@pytest.fixture
def start_mode(tmp_path: Path) -> Iterator[Callable[..., ModeProcess]]:
    """Starts modes as subprocesses; any still running at the end of the test are killed."""
    started: list[ModeProcess] = []

    def start(mode: str, env: dict[str, str]) -> ModeProcess:
        log_path = tmp_path / f"{mode}-{len(started)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "scaigrid", "run", "--mode", mode],
                                       env=command_env(env), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        started.append(ModeProcess(mode, process, log_path))
        return started[-1]

    yield start
    for proc in started:
        if proc.process.poll() is None:
            proc.process.kill()
            proc.process.wait()


def http_get(url: str, timeout_s: float = 5) -> tuple[int, dict[str, str], bytes]:
    """GET returning (status, headers, body) for any status, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def http_ok(url: str) -> bool:
    return http_get(url, timeout_s=2)[0] == 200


# --- a running node: migrated database, an http process, an operator's key ---

@pytest.fixture
def migrated_env(env: dict[str, str]) -> dict[str, str]:
    """`env` on a database that `scaigrid migrate` has brought to head (default partner and tenant exist)."""
    result = scaigrid("migrate", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return env


def create_key(env: dict[str, str], role: str, tenant: str = "default") -> str:
    """An API key made the way an operator makes one: `scaigrid admin create-key`."""
    result = scaigrid("admin", "create-key", "--role", role, "--tenant", tenant, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@dataclass
class Node:
    """One http process of a migrated node, and a super_admin key for it."""

    env: dict[str, str]
    process: ModeProcess
    admin_key: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['HTTP_PORT']}"

    def key(self, role: str, tenant: str = "default") -> str:
        return create_key(self.env, role, tenant)


def start_http(start_mode: Callable[..., ModeProcess], env: dict[str, str]) -> ModeProcess:
    """An http mode process, returned once /health/ready says ready."""
    process = start_mode("http", env)
    process.wait_for(lambda: http_ok(f"http://127.0.0.1:{env['HTTP_PORT']}/health/ready"), what="readiness")
    return process


@pytest.fixture
def node(migrated_env: dict[str, str], start_mode: Callable[..., ModeProcess]) -> Node:
    return Node(migrated_env, start_http(start_mode, migrated_env), create_key(migrated_env, "super_admin"))


# --- the appliance: supervisord, nginx and every program, as `make run` starts them ---

@pytest.fixture(scope="module")
def appliance_stack(tmp_path_factory: pytest.TempPathFactory, mariadb: devstack.MariaDB,
                    redis_server: devstack.Redis, s3_server: devstack.S3Server) -> Iterator["ApplianceStack"]:
    """One running stack per test module (starting one takes ~10 s); tests that break it start their own."""
    from tests.appliance_stack import start_stack

    stack = start_stack(tmp_path_factory.mktemp("appl"), mariadb, redis_server, s3_server)
    yield stack
    stack.stop()


@pytest.fixture(autouse=True)
def collect_garbage_after_test() -> Iterator[None]:
    """Collects garbage at each test's end, so a leaked socket or transport fails the test that leaked it
    (pytest turns the ResourceWarning into an error) rather than whichever test the collector next runs in."""
    yield
    gc.collect()
