"""Two ScaiGrids in hybrid for end-to-end tests: a managed side of two replicas (two appliance stacks on one database
and one Redis, each with its own nginx, grpc and http) and a node (a third stack, with its own database and Redis)
enrolled with `scaigrid-appliance link enroll` to replica A, its link going through A's nginx over TLS."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import openai
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from appliance import devstack
from tests.appliance_stack import ApplianceStack, start_stack
from tests.backends import GATEWAY_SETTINGS, FakeBackend
from tests.support.waiting import eventually

# Short cadences, so that a link loss, a config change or a usage record shows within a second or two.
MANAGED_SETTINGS = {**GATEWAY_SETTINGS, "HYBRID_ROLE": "managed", "HYBRID_HEARTBEAT_INTERVAL_S": "1",
                    "HYBRID_CONFIG_REFRESH_S": "0.5", "USAGE_FLUSH_INTERVAL_S": "1"}
NODE_SETTINGS = {**GATEWAY_SETTINGS, "HYBRID_BACKOFF_MAX_S": "1", "USAGE_FLUSH_INTERVAL_S": "1"}
# The behaviour (tests/backends.py) each side's FakeBackend model has.
STREAM_BEHAVIOUR = "paced-5-20"
STREAM_TEXT = "tok0 tok1 tok2 tok3 tok4 "
LINK_TIMEOUT_S = 60.0


class Refused(AssertionError):
    """An API call answered other than the test expected."""


def api(stack: ApplianceStack, method: str, path: str, key: str, body: Any = None,
        expect: int | None = None) -> tuple[int, Any]:
    """(status, decoded JSON) of one call through the stack's nginx; with `expect`, anything else is a failure."""
    request = urllib.request.Request(stack.url + path, method=method, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=20, context=stack.tls_context()) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    answer = json.loads(raw) if raw else None
    if expect is not None and status != expect:
        raise Refused(f"{method} {path}: {status} {answer}")
    return status, answer


def data(stack: ApplianceStack, method: str, path: str, key: str, body: Any = None, expect: int = 200) -> Any:
    return api(stack, method, path, key, body, expect)[1]["data"]


# eventually() as these tests wait: within the link's bound, gently (every poll goes through nginx), with errors
# counting as "not yet" (a program restarting, a change not yet seen by every process).
link_eventually = functools.partial(eventually, timeout_s=LINK_TIMEOUT_S, interval_s=0.2, ignoring=(
    OSError, urllib.error.URLError, ValueError, Refused, openai.APIError))


def client(stack: ApplianceStack, key: str) -> openai.OpenAI:
    """The openai SDK on the stack's /oai/v1 through nginx, trusting its certificate; no retries."""
    return openai.OpenAI(base_url=stack.url + "/oai/v1", api_key=key, max_retries=0, timeout=30,
                         http_client=openai.DefaultHttpxClient(verify=stack.tls_context()))


def stream_text(stack: ApplianceStack, key: str, model: str) -> str:
    with client(stack, key) as sdk:
        chunks = list(sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                  stream=True))
    assert {chunk.model for chunk in chunks} == {model}
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def detailed_health(stack: ApplianceStack) -> dict[str, Any]:
    """The http program's /health/detailed; Refused while nginx answers for it (the program restarting)."""
    status, body = api(stack, "GET", "/health/detailed", stack.admin_key)
    if status not in (200, 503) or "link" not in body:
        raise Refused(f"/health/detailed: {status} {body}")
    return dict(body)


def link_state(node: ApplianceStack) -> dict[str, Any]:
    return dict(detailed_health(node)["link"])


def program_pid(stack: ApplianceStack, name: str) -> int:
    [info] = [info for info in stack.supervisor.processes() if info.name == name]
    return info.pid if info.state == "RUNNING" else 0


def kill_program(stack: ApplianceStack, name: str) -> int:
    """kill -9 of a program's process, as a crash would; supervisord restarts it. Returns the dead pid."""
    pid = program_pid(stack, name)
    assert pid, f"{name} is not running"
    os.kill(pid, signal.SIGKILL)
    return pid


@contextmanager
def frozen(stack: ApplianceStack, name: str) -> Iterator[None]:
    """SIGSTOP to a program's whole process group, SIGCONT after: its connections stay open but go silent, as
    behind a firewall that drops packets (a closed port would at least answer with a reset)."""
    pid = program_pid(stack, name)
    assert pid, f"{name} is not running"  # getpgid(0) would be our own group
    group = os.getpgid(pid)
    os.killpg(group, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(group, signal.SIGCONT)


def restarted(stack: ApplianceStack, name: str, old_pid: int) -> bool:
    return program_pid(stack, name) not in (0, old_pid)


def run_sql(mariadb: devstack.MariaDB, database: str, statement: str, **params: Any) -> Sequence[Any]:
    """One statement on a stack's database, as root (committed); its rows as mappings."""
    async def execute() -> Sequence[Any]:
        engine = create_async_engine(mariadb.admin_url(database))
        try:
            async with engine.begin() as conn:
                result = await conn.execute(text(statement), params)
                return result.mappings().all() if result.returns_rows else []
        finally:
            await engine.dispose()

    return asyncio.run(execute())


class Tenant(NamedTuple):
    id: str
    key: str  # its tenant_user's API key


@dataclass
class Hybrid:
    a: ApplianceStack  # the managed replica the node enrolled with, and whose nginx carries its link
    b: ApplianceStack  # the other managed replica: same database and Redis, its own programs
    node: ApplianceStack
    node_id: str
    managed_fake: FakeBackend
    node_fake: FakeBackend
    mariadb: devstack.MariaDB

    def managed_sql(self, statement: str, **params: Any) -> Sequence[Any]:
        return run_sql(self.mariadb, self.a.config.database_name, statement, **params)

    def node_sql(self, statement: str, **params: Any) -> Sequence[Any]:
        return run_sql(self.mariadb, self.node.config.database_name, statement, **params)

    def wait_linked(self, what: str = "the node's link connected") -> None:
        link_eventually(lambda: link_state(self.node)["connected"] is True, what)

    def managed_tenant(self, slug: str) -> Tenant:
        """A tenant on the managed side with a tenant_user and its key, made by the managed admin."""
        admin = self.a.admin_key
        tenant = data(self.a, "POST", "/v1/tenants", admin, {"slug": slug, "name": slug.title()}, expect=201)
        user = data(self.a, "POST", "/v1/users", admin, {"email": f"user@{slug}.example", "tenant_id": tenant["id"]},
                    expect=201)
        key = data(self.a, "POST", "/v1/api-keys", admin, {"name": f"{slug} app", "user_id": user["id"]},
                   expect=201)
        return Tenant(tenant["id"], key["key"])

    def allow_tenants(self, *tenant_ids: str) -> None:
        """The managed admin lets these tenants (only these) use the node."""
        data(self.a, "PUT", f"/v1/hybrid/nodes/{self.node_id}/tenants", self.a.admin_key,
             {"tenant_ids": list(tenant_ids)})


def _shared_secrets(source: ApplianceStack, var: Path) -> None:
    """Replica B gets A's secrets before its first boot: the same database password, token and encryption keys
    (backend keys are stored encrypted; B's http mints the relay tokens A's grpc checks)."""
    target = var / "etc" / "secrets"
    target.mkdir(parents=True, mode=0o700)
    for path in source.config.secrets_dir.iterdir():
        shutil.copy2(path, target / path.name)


def _catalogue(stack: ApplianceStack, fake: FakeBackend, backend_id: str, slug: str) -> None:
    admin = stack.admin_key
    data(stack, "POST", "/v1/backends", admin, {"id": backend_id, "provider": "custom", "base_url": fake.url,
                                               "model": STREAM_BEHAVIOUR}, expect=201)
    data(stack, "POST", "/v1/models", admin, {"slug": slug, "modality": "chat", "routes": [{"backend": backend_id}]},
         expect=201)


def enroll(managed: ApplianceStack, node: ApplianceStack, link_target: str | None = None) -> str:
    """`scaigrid-appliance link enroll` on the node, to the managed stack's URL and gRPC TLS port (or link_target, a
    relay to it); the node id."""
    token = data(managed, "POST", "/v1/hybrid/enrollment-tokens", managed.admin_key, {"name": "site-a"},
                 expect=201)["token"]
    target = link_target or f"127.0.0.1:{managed.config.grpc_tls_port}"
    result = node.cli("link", "enroll", "--url", managed.url, "--token", token, "--ca-file",
                      str(managed.config.tls_cert), "--link-target", target)
    assert result.returncode == 0, result.stdout + result.stderr
    return str(json.loads(node.config.link_file.read_text())["node_id"])


@contextmanager
def hybrid_stacks(base: Path, mariadb: devstack.MariaDB, s3: devstack.S3Server) -> Iterator[Hybrid]:
    """Starts the three stacks (A and the node together, then B while the node enrols), waits for the link, and gives
    each side a FakeBackend model: `site/chat` on the node, `cloud/chat` on the managed side."""
    with ExitStack() as cleanup:
        managed_redis = devstack.start_redis(base / "managed-redis")
        cleanup.callback(managed_redis.stop)
        node_redis = devstack.start_redis(base / "node-redis")
        cleanup.callback(node_redis.stop)
        managed_fake, node_fake = FakeBackend().start(), FakeBackend().start()
        cleanup.callback(managed_fake.stop)
        cleanup.callback(node_fake.stop)

        with ThreadPoolExecutor(max_workers=2) as pool:
            starting = [pool.submit(start_stack, base / "a", mariadb, managed_redis, s3, **MANAGED_SETTINGS),
                        pool.submit(start_stack, base / "node", mariadb, node_redis, s3, **NODE_SETTINGS)]
        for future in starting:  # every stack that started is stopped at the end, even if the other failed
            if future.exception() is None:
                cleanup.callback(future.result().stop)
        a, node = (future.result() for future in starting)
        _shared_secrets(a, base / "b")
        with ThreadPoolExecutor(max_workers=1) as pool:  # B starts while the node enrols (and restarts)
            starting_b = pool.submit(start_stack, base / "b", mariadb, managed_redis, s3,
                                     DATABASE_NAME=a.config.database_name, DATABASE_USER=a.config.database_user,
                                     S3_BUCKET=a.appliance.passthrough["S3_BUCKET"], **MANAGED_SETTINGS)
            try:
                node_id = enroll(a, node)
            finally:
                if starting_b.exception() is None:
                    cleanup.callback(starting_b.result().stop)
        hybrid = Hybrid(a, starting_b.result(), node, node_id, managed_fake, node_fake, mariadb)
        hybrid.wait_linked("the node's link after enrolment")
        _catalogue(node, node_fake, "site-fake", "site/chat")
        _catalogue(a, managed_fake, "cloud-fake", "cloud/chat")
        yield hybrid
