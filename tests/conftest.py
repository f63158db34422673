"""Layered fixtures: session-wide real services, a fresh database/Redis/bucket per test, and mode subprocesses."""

import gc
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as sync_redis

from appliance import devstack
from scaigrid.settings import Settings, load_settings
from tests.appliance_stack import ApplianceStack
from tests.support.database import Template, template_from
from tests.support.env import Node, create_key, node_env, s3_client
from tests.support.processes import ModeProcess, scaigrid, start_http, start_mode_process

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


@pytest.fixture
def env(database_url: str, redis_url: str, s3_server: devstack.S3Server, s3_bucket: str) -> dict[str, str]:
    """Complete settings for a node on this test's database, Redis and bucket, with free ports."""
    return node_env(database_url, redis_url, s3_server, s3_bucket)


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return load_settings(env, env_file=None)


@pytest.fixture
def start_mode(tmp_path: Path) -> Iterator[Callable[..., ModeProcess]]:
    """Starts modes as subprocesses; any still running at the end of the test are killed."""
    started: list[ModeProcess] = []

    def start(mode: str, env: dict[str, str]) -> ModeProcess:
        started.append(start_mode_process(mode, env, tmp_path / f"{mode}-{len(started)}.log"))
        return started[-1]

    yield start
    for proc in started:
        if proc.process.poll() is None:
            proc.process.kill()
            proc.process.wait()


# --- a running node: migrated database, an http process, an operator's key ---

@pytest.fixture(scope="session")
def database_template(mariadb: devstack.MariaDB, redis_server: devstack.Redis, s3_server: devstack.S3Server
                      ) -> Iterator[Template]:
    """A database `scaigrid migrate` brought to head, once per session (per xdist worker), for migrated_env to copy."""
    def migrate(database_url: str) -> None:
        result = scaigrid("migrate", env=node_env(database_url, redis_server.url, s3_server, "unused"))
        assert result.returncode == 0, result.stdout + result.stderr

    template = template_from(mariadb, migrate)
    yield template
    mariadb.drop_database(template.name)


@pytest.fixture
def migrated_env(env: dict[str, str], database_template: Template) -> dict[str, str]:
    """`env` on a database at head, as `scaigrid migrate` leaves it (default partner and tenant exist): a copy of the
    session's migrated template. Tests of migrate itself use `env`, whose database is empty."""
    database_template.copy_into(env["DATABASE_URL"])
    return env


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
