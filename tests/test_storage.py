"""ScaiBunker storage proxy: capabilities minted by the http process, objects streamed through it and bunker_proxy."""

import asyncio
import contextlib
import hashlib
import http.client
import http.server
import io
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from jose import jwt
from minio import Minio
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from appliance import devstack
from scaigrid.auth import service_tokens
from scaigrid.clock import utc_now
from scaigrid.modules.scaibunker import capabilities
from scaigrid.modules.scaibunker.tables import capabilities as capability_rows
from scaigrid.modules.scaibunker.tables import metadata as module_metadata
from scaigrid.modules.scaibunker.tables import storage_audit
from scaigrid.settings import Secret
from tests.backends import shared_env
from tests.identity import call, tenant
from tests.support.env import create_key, s3_client
from tests.support.http import http_get, http_ok
from tests.support.processes import REPO, ModeProcess, command_env, scaigrid
from tests.support.waiting import eventually_async

MiB = 1024 * 1024
LIMIT_BYTES = 12 * MiB  # STORAGE_MAX_OBJECT_BYTES of this module's node
PART_BYTES = 5 * MiB  # STORAGE_PART_SIZE_BYTES: objects over it go to S3 in multipart uploads
STORAGE = "/v1/modules/scaibunker/storage"
ALL_VERBS = ["GET", "PUT", "HEAD", "DELETE", "LIST"]


@contextmanager
def mode_process(mode: str, env: dict[str, str], port: str, log_path: Path) -> Iterator[ModeProcess]:
    """A mode subprocess for any fixture scope, returned once /health/ready answers 200; killed at the end."""
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "scaigrid", "run", "--mode", mode],
                                   env=command_env(env), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    running = ModeProcess(mode, process, log_path)
    try:
        running.wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/health/ready"), what="readiness")
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def proxy_env(env: dict[str, str]) -> dict[str, str]:
    """bunker_proxy's settings: no database, no Redis."""
    return {name: value for name, value in env.items() if name not in ("DATABASE_URL", "REDIS_URL")}


@dataclass
class Storage:
    env: dict[str, str]
    proxy: ModeProcess
    admin_key: str
    s3: Minio

    @property
    def bases(self) -> dict[str, str]:
        return {"http": f"http://127.0.0.1:{self.env['HTTP_PORT']}",
                "proxy": f"http://127.0.0.1:{self.env['BUNKER_PROXY_PORT']}"}

    def token(self, prefix: str, verbs: list[str] = ALL_VERBS, key: str | None = None, **body: Any) -> str:
        reply = call(self.bases["http"], "POST", STORAGE + "/capabilities", key or self.admin_key,
                     {"prefix": prefix, "verbs": verbs, **body})
        assert reply.status == 201, reply.body
        return str(reply.data["token"])

    def stored(self, prefix: str) -> list[str]:
        """Object names in the bucket under that S3 prefix, as S3 itself lists them."""
        return [o.object_name for o in self.s3.list_objects(self.env["S3_BUCKET"], prefix=prefix, recursive=True)]


@pytest.fixture(scope="module")
def storage(mariadb: devstack.MariaDB, redis_server: devstack.Redis, s3_server: devstack.S3Server,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Storage]:
    logs = tmp_path_factory.mktemp("storage")
    with shared_env(mariadb, redis_server, s3_server) as base_env:
        env = {**base_env, "STORAGE_CAPABILITY_SECRET": secrets.token_hex(32),
               "STORAGE_MAX_OBJECT_BYTES": str(LIMIT_BYTES), "STORAGE_PART_SIZE_BYTES": str(PART_BYTES)}
        with (mode_process("http", env, env["HTTP_PORT"], logs / "http.log"),
              mode_process("bunker_proxy", proxy_env(env), env["BUNKER_PROXY_PORT"], logs / "proxy.log") as proxy):
            yield Storage(env, proxy, create_key(env, "super_admin"), s3_client(s3_server))


def tenant_id_of(storage: Storage, token: str) -> str:
    return capabilities.verify(Secret(storage.env["STORAGE_CAPABILITY_SECRET"]), token).tenant_id


def raw_request(base: str, method: str, path: str, token: str | None = None, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with the path sent exactly as given (no client-side normalisation or re-encoding)."""
    host, _, port = base.removeprefix("http://").partition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        connection.request(method, path, body=body, headers=all_headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def error_code(body: bytes) -> str:
    return str(json.loads(body)["error"]["code"])


TARGETS = pytest.mark.parametrize("target", ["http", "proxy"])


# --- minting ---

def test_minting_needs_the_module_permission(storage):
    base = storage.bases["http"]
    body = {"prefix": "images/", "verbs": ["GET"], "ttl_s": 60, "max_bytes": MiB}
    assert call(base, "POST", STORAGE + "/capabilities", None, body).status == 401
    user = call(base, "POST", STORAGE + "/capabilities", create_key(storage.env, "tenant_user"), body)
    assert (user.status, user.code) == (403, "AUTHZ_PERMISSION_DENIED")
    # tenant_admin holds modules:manage, and with it every permission a module declares.
    reply = call(base, "POST", STORAGE + "/capabilities", create_key(storage.env, "tenant_admin"), body)
    assert reply.status == 201, reply.body
    data = reply.data
    assert (data["prefix"], data["verbs"], data["max_bytes"]) == ("images/", ["GET"], MiB)
    assert data["id"].startswith("cap_") and data["expires_at"].endswith("Z") and data["token"].count(".") == 2
    # The proxy mints nothing: it has no database to record capabilities in.
    status, _, _ = raw_request(storage.bases["proxy"], "POST", STORAGE + "/capabilities", storage.admin_key,
                               json.dumps(body).encode())
    assert status in (404, 405)


def test_minting_validates_the_body(storage):
    reply = call(storage.bases["http"], "POST", STORAGE + "/capabilities", storage.admin_key, {
        "prefix": "a/../b/", "verbs": ["GET", "FLY"], "ttl_s": 86401, "max_bytes": LIMIT_BYTES + 1, "colour": 1})
    assert (reply.status, reply.code) == (422, "VALIDATION_ERROR")
    details = {d["field"]: d["message"] for d in reply.body["error"]["details"]}
    assert set(details) == {"prefix", "verbs", "ttl_s", "max_bytes", "colour"}
    assert (details["ttl_s"], details["max_bytes"], details["colour"]) == (
        "a whole number of seconds, 1-86400", f"a whole number of bytes, 1-{LIMIT_BYTES}", "unknown field")
    for body, field in [({"prefix": "images", "verbs": ["GET"]}, "prefix"),
                        ({"prefix": "images/", "verbs": []}, "verbs"),
                        ({"prefix": "images/", "verbs": ["GET", "GET"]}, "verbs"),
                        ({"prefix": "images/", "verbs": ["GET"], "ttl_s": 0}, "ttl_s"),
                        ({"prefix": "images/", "verbs": ["GET"], "ttl_s": True}, "ttl_s"),
                        ({"prefix": "%2e%2e/", "verbs": ["GET"]}, "prefix"),
                        ({"verbs": ["GET"]}, "prefix")]:
        reply = call(storage.bases["http"], "POST", STORAGE + "/capabilities", storage.admin_key, body)
        assert reply.status == 422 and [d["field"] for d in reply.body["error"]["details"]] == [field], body


# --- objects ---

@TARGETS
async def test_put_get_head_list_delete_round_trip(storage, target):
    base, prefix = storage.bases[target], f"rt-{target}/"
    token = storage.token(prefix)
    auth = {"Authorization": f"Bearer {token}"}
    big = secrets.token_bytes(7 * MiB)  # over the part size: a multipart upload
    objects = {f"{prefix}a.bin": b"alpha", f"{prefix}dir/b.bin": b"", f"{prefix}dir/c.bin": big}
    async with aiohttp.ClientSession() as session:
        for key, data in objects.items():
            async with session.put(f"{base}{STORAGE}/objects/{key}", data=io.BytesIO(data),
                                   headers={**auth, "Content-Type": "application/x-test"}) as response:
                assert response.status == 201, await response.text()
                assert (await response.json())["data"]["size"] == len(data)
        for key, data in objects.items():
            async with session.get(f"{base}{STORAGE}/objects/{key}", headers=auth) as response:
                assert response.status == 200
                assert await response.read() == data
                assert response.headers["Content-Type"] == "application/x-test"
        async with session.head(f"{base}{STORAGE}/objects/{prefix}dir/c.bin", headers=auth) as response:
            assert response.status == 200
            assert int(response.headers["Content-Length"]) == len(big) and response.headers["ETag"]

        keys, cursor = [], None
        while True:
            params = {"prefix": prefix, "limit": "2", **({"cursor": cursor} if cursor else {})}
            async with session.get(f"{base}{STORAGE}/objects", params=params, headers=auth) as response:
                assert response.status == 200, await response.text()
                page = (await response.json())["data"]
            keys += [item["key"] for item in page["items"]]
            assert len(page["items"]) <= 2
            if not page["pagination"]["has_more"]:
                break
            cursor = page["pagination"]["next_cursor"]
        assert keys == sorted(objects)  # relative to the tenant's namespace, as the caller named them

        async with session.delete(f"{base}{STORAGE}/objects/{prefix}a.bin", headers=auth) as response:
            assert response.status == 204
        for method in ("GET", "DELETE"):
            async with session.request(method, f"{base}{STORAGE}/objects/{prefix}a.bin", headers=auth) as response:
                assert response.status == 404
                assert (await response.json())["error"]["code"] == "STORAGE_OBJECT_NOT_FOUND"
        async with session.head(f"{base}{STORAGE}/objects/{prefix}a.bin", headers=auth) as response:
            assert response.status == 404


def test_an_upload_sent_as_a_form_is_stored_as_bytes(storage):
    # curl --data-binary says application/x-www-form-urlencoded; the bytes must still be what is stored.
    token = storage.token("form/")
    data = secrets.token_bytes(4096)
    status, _, body = raw_request(storage.bases["proxy"], "PUT", f"{STORAGE}/objects/form/blob", token, data,
                                  {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 201, body
    status, headers, body = raw_request(storage.bases["proxy"], "GET", f"{STORAGE}/objects/form/blob", token)
    assert status == 200 and body == data
    assert headers["content-type"] == "application/octet-stream"


@TARGETS
async def test_range_requests(storage, target):
    base, prefix = storage.bases[target], f"range-{target}/"
    auth = {"Authorization": f"Bearer {storage.token(prefix)}"}
    data = bytes(range(256)) * 4096  # 1 MiB
    url = f"{base}{STORAGE}/objects/{prefix}r.bin"
    async with aiohttp.ClientSession() as session:
        async with session.put(url, data=io.BytesIO(data), headers=auth) as response:
            assert response.status == 201
        for header, expected, content_range in [
                ("bytes=0-9", data[:10], f"bytes 0-9/{len(data)}"),
                ("bytes=1000-", data[1000:], f"bytes 1000-{len(data) - 1}/{len(data)}"),
                ("bytes=-5", data[-5:], f"bytes {len(data) - 5}-{len(data) - 1}/{len(data)}")]:
            async with session.get(url, headers={**auth, "Range": header}) as response:
                assert response.status == 206, header
                assert response.headers["Content-Range"] == content_range
                assert await response.read() == expected
        async with session.get(url, headers={**auth, "Range": f"bytes={len(data)}-"}) as response:
            assert response.status == 416
            body = await response.json()
            assert body["error"]["code"] == "STORAGE_RANGE_NOT_SATISFIABLE"
            assert str(len(data)) in body["error"]["details"][0]["message"]
        async with session.get(url, headers={**auth, "Range": "bytes=0-1,5-6"}) as response:
            assert response.status == 200 and await response.read() == data  # multiple ranges: the whole object


@TARGETS
def test_refused_capabilities(storage, target):
    base, prefix = storage.bases[target], f"refuse-{target}/"
    secret = Secret(storage.env["STORAGE_CAPABILITY_SECRET"])
    reader = storage.token(prefix, ["GET", "HEAD"])
    tenant_id = tenant_id_of(storage, reader)
    path = f"{STORAGE}/objects/{prefix}x"

    def expired() -> str:
        past = capabilities.Capability("cap_x", tenant_id, prefix, frozenset(ALL_VERBS), MiB, int(time.time()) - 5)
        return capabilities.mint(secret, past)

    header, payload, signature = reader.split(".")
    claims = jwt.get_unverified_claims(reader)
    widened = jwt.encode({**claims, "pfx": ""}, "another-secret", algorithm="HS256")
    other_purpose = jwt.encode({**claims, "aud": "something-else"}, secret.reveal(), algorithm="HS256")
    unsigned = jwt.encode({**claims, "pfx": ""}, "", algorithm="HS256").rsplit(".", 1)[0] + "."
    tampered_payload = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1]
    cases = [
        (None, "GET", 401, "AUTH_TOKEN_MISSING"),
        (expired(), "GET", 401, "CAPABILITY_EXPIRED"),
        (f"{header}.{tampered_payload}.{signature}", "GET", 401, "CAPABILITY_INVALID"),
        (widened, "GET", 401, "CAPABILITY_INVALID"),
        (other_purpose, "GET", 401, "CAPABILITY_INVALID"),
        (unsigned, "GET", 401, "CAPABILITY_INVALID"),
        (storage.admin_key, "GET", 401, "CAPABILITY_INVALID"),  # an API key is not a capability
        (reader, "PUT", 403, "CAPABILITY_DENIED"),  # verb not granted
        (reader, "DELETE", 403, "CAPABILITY_DENIED"),
    ]
    for token, method, status, code in cases:
        got, _, body = raw_request(base, method, path, token, b"x" if method == "PUT" else None)
        assert (got, error_code(body)) == (status, code), (token, method)
    # Keys outside the prefix, and listings outside it, are refused even with every verb.
    writer = storage.token(prefix)
    for method, outside in [("PUT", f"{STORAGE}/objects/refuse-other/x"), ("GET", f"{STORAGE}/objects/{prefix[:-1]}x"),
                            ("GET", f"{STORAGE}/objects?prefix=refuse-other/")]:
        got, _, body = raw_request(base, method, outside, writer, b"x" if method == "PUT" else None)
        assert (got, error_code(body)) == (403, "CAPABILITY_DENIED"), outside
    got, _, body = raw_request(base, "GET", f"{STORAGE}/objects", reader)
    assert (got, error_code(body)) == (403, "CAPABILITY_DENIED")  # LIST not granted


TRAVERSALS = [
    "{p}../escape", "{p}a/../../escape", "{p}./x", "{p}a//b", "{p}a/", "{p}%2e%2e/escape", "{p}%2E%2E%2Fescape",
    "{p}a%2f..%2f..%2fescape", "{p}%252e%252e/escape", "{p}a%255c..", "{p}a%5C..%5Cescape", "{p}a\\..\\escape",
    "{p}a%00b", "{p}a%0Ab", "{p}a%7Fb", "{p}a%ff", "{p}%2e",
]


@TARGETS
def test_traversal_variants_are_refused(storage, target):
    base, prefix = storage.bases[target], f"trav-{target}/"
    token = storage.token(prefix)
    for template in TRAVERSALS:
        path = f"{STORAGE}/objects/" + template.format(p=prefix)
        for method in ("PUT", "GET"):
            status, _, body = raw_request(base, method, path, token, b"evil" if method == "PUT" else None)
            assert (status, error_code(body)) == (400, "STORAGE_KEY_INVALID"), (path, method, body)
    assert storage.stored("tenants/") == [n for n in storage.stored("tenants/") if "escape" not in n]


@TARGETS
async def test_bodies_over_the_limit_store_nothing(storage, target):
    base, prefix = storage.bases[target], f"limit-{target}/"
    small = storage.token(prefix, max_bytes=MiB)
    namespace = f"tenants/{tenant_id_of(storage, small)}/{prefix}"
    # Content-Length over the capability's limit: refused before the body is read.
    status, _, body = raw_request(base, "PUT", f"{STORAGE}/objects/{prefix}declared", small, bytes(MiB + 1))
    assert (status, error_code(body)) == (413, "STORAGE_OBJECT_TOO_LARGE")

    async def chunks(total_bytes: int) -> AsyncIterator[bytes]:
        for _ in range(total_bytes // MiB):
            yield bytes(MiB)

    # Chunked bodies over the capability's limit, and (past two multipart parts) over the global limit.
    whole = storage.token(prefix)
    async with aiohttp.ClientSession() as session:
        for token, key, total in [(small, "chunked-small", 3 * MiB), (whole, "chunked-big", LIMIT_BYTES + 4 * MiB)]:
            try:
                async with session.put(f"{base}{STORAGE}/objects/{prefix}{key}", data=chunks(total),
                                       headers={"Authorization": f"Bearer {token}"}) as response:
                    assert response.status == 413
                    assert (await response.json())["error"]["code"] == "STORAGE_OBJECT_TOO_LARGE"
            except aiohttp.ClientError:
                pass  # the server may close the connection while the client still sends: refused either way
    assert storage.stored(namespace) == []
    # Exactly at the limit is fine.
    status, _, _ = raw_request(base, "PUT", f"{STORAGE}/objects/{prefix}exact", small, bytes(MiB))
    assert status == 201 and storage.stored(namespace) == [namespace + "exact"]


def test_tenants_are_isolated(storage):
    base = storage.bases["http"]
    other = tenant(base, storage.admin_key, "bunker-" + secrets.token_hex(3))
    own_admin = create_key(storage.env, "tenant_admin")
    mine = storage.token("shared/", key=own_admin)
    theirs = storage.token("shared/", tenant_id=other["id"])
    # A tenant admin cannot mint for a tenant it does not reach (404: its existence is not revealed).
    reply = call(base, "POST", STORAGE + "/capabilities", own_admin,
                 {"prefix": "shared/", "verbs": ["GET"], "tenant_id": other["id"]})
    assert (reply.status, reply.code) == (404, "NOT_FOUND")
    # A service caller has no tenant of its own: it must name one.
    service = service_tokens.mint(Secret(storage.env["SERVICE_TOKEN_SECRET"]), "sandbox-runner", 600,
                                  scope=service_tokens.OPERATOR)
    reply = call(base, "POST", STORAGE + "/capabilities", service, {"prefix": "shared/", "verbs": ["GET"]})
    assert (reply.status, [d["field"] for d in reply.body["error"]["details"]]) == (422, ["tenant_id"])
    reply = call(base, "POST", STORAGE + "/capabilities", service,
                 {"prefix": "shared/", "verbs": ["GET"], "tenant_id": other["id"]})
    assert (reply.status, reply.data["tenant_id"]) == (201, other["id"])
    proxy = storage.bases["proxy"]
    assert raw_request(proxy, "PUT", f"{STORAGE}/objects/shared/doc", mine, b"mine")[0] == 201
    assert raw_request(proxy, "PUT", f"{STORAGE}/objects/shared/doc", theirs, b"theirs")[0] == 201
    assert raw_request(proxy, "GET", f"{STORAGE}/objects/shared/doc", mine)[2] == b"mine"
    assert raw_request(proxy, "GET", f"{STORAGE}/objects/shared/doc", theirs)[2] == b"theirs"
    assert raw_request(proxy, "PUT", f"{STORAGE}/objects/shared/only-mine", mine, b"m")[0] == 201
    assert raw_request(base, "GET", f"{STORAGE}/objects/shared/only-mine", theirs)[0] == 404
    listed = json.loads(raw_request(proxy, "GET", f"{STORAGE}/objects", theirs)[2])["data"]["items"]
    assert [item["key"] for item in listed] == ["shared/doc"]
    assert storage.stored(f"tenants/{other['id']}/") == [f"tenants/{other['id']}/shared/doc"]


async def test_writes_are_audited_and_expired_capabilities_purged(storage):
    token = storage.token("audit/")
    assert raw_request(storage.bases["http"], "PUT", f"{STORAGE}/objects/audit/one", token, b"12345")[0] == 201
    assert raw_request(storage.bases["http"], "DELETE", f"{STORAGE}/objects/audit/one", token)[0] == 204
    assert raw_request(storage.bases["proxy"], "PUT", f"{STORAGE}/objects/audit/two", token, b"12")[0] == 201
    short = call(storage.bases["http"], "POST", STORAGE + "/capabilities", storage.admin_key,
                 {"prefix": "audit/", "verbs": ["GET"], "ttl_s": 1}).data
    engine = create_async_engine(storage.env["DATABASE_URL"])
    try:
        async with engine.connect() as conn:
            audit = (await conn.execute(select(storage_audit.c.action, storage_audit.c.object_key,
                                               storage_audit.c.size_bytes).where(
                storage_audit.c.object_key.like("%/audit/one")).order_by(storage_audit.c.action.desc()))).all()
            assert [(a, s) for a, _, s in audit] == [("put", 5), ("delete", None)]
            expires_at = await conn.scalar(select(capability_rows.c.expires_at).where(
                capability_rows.c.id == short["id"]))
            assert expires_at is not None
        # The proxy has no database: its writes are in its log.
        puts = [line for line in storage.proxy.log_lines() if line.get("event") == "storage_put"]
        assert any(str(line.get("object_key", "")).endswith("/audit/two") and line["size_bytes"] == 2 for line in puts)

        # Its one-second TTL has to run out: the purge compares expires_at with the clock, as here.
        await eventually_async(lambda: utc_now() > expires_at, "the short capability expired", interval_s=0.1)
        result = scaigrid("job", "run", "scaibunker_capabilities_purge", env=storage.env)
        assert result.returncode == 0, result.stdout + result.stderr
        async with engine.connect() as conn:
            left = set((await conn.execute(select(capability_rows.c.id))).scalars())
            assert short["id"] not in left and left  # unexpired ones stay

            # The module's tables in code and the module's revisions must not drift apart.
            from alembic.autogenerate import compare_metadata
            from alembic.migration import MigrationContext

            diff = await conn.run_sync(lambda c: compare_metadata(MigrationContext.configure(c), module_metadata))
        assert [d for d in diff if d[0] != "remove_table" and d[0] != "remove_index"] == []
        assert not [d for d in diff if d[0] == "remove_table" and d[1].name.startswith("mod_scaibunker")]
    finally:
        await engine.dispose()


def test_proxy_metrics(storage):
    token = storage.token("metrics/")
    assert raw_request(storage.bases["proxy"], "PUT", f"{STORAGE}/objects/metrics/m", token, b"abc")[0] == 201
    assert raw_request(storage.bases["proxy"], "GET", f"{STORAGE}/objects/metrics/missing", token)[0] == 404
    _, _, body = http_get(storage.bases["proxy"] + "/metrics")
    text = body.decode()
    assert 'scaibunker_storage_requests_total{status="201",verb="PUT"}' in text
    assert 'scaibunker_storage_requests_total{status="404",verb="GET"}' in text
    assert 'scaibunker_storage_bytes_total{direction="in"}' in text


# --- S3 outage and memory ---

def test_proxy_is_not_ready_while_s3_is_down(storage, start_mode, tmp_path):
    own_s3 = devstack.start_s3(tmp_path / "s3", devstack.free_ports(1)[0])
    try:
        bucket = "outage"
        s3_client(own_s3).make_bucket(bucket)
        port = str(devstack.free_ports(1)[0])
        env = {**proxy_env(storage.env), "S3_ENDPOINT_URL": own_s3.endpoint_url, "S3_BUCKET": bucket,
               "BUNKER_PROXY_PORT": port}
        proxy = start_mode("bunker_proxy", env)
        base = f"http://127.0.0.1:{port}"
        proxy.wait_for(lambda: http_ok(base + "/health/ready"), what="ready")
        token = storage.token("outage/")
        assert raw_request(base, "PUT", f"{STORAGE}/objects/outage/x", token, b"x")[0] == 201
        # S3 answering with an error of its own (here: the bucket is gone) is a 502.
        s3_client(own_s3).remove_object(bucket, f"tenants/{tenant_id_of(storage, token)}/outage/x")
        s3_client(own_s3).remove_bucket(bucket)
        status, _, body = raw_request(base, "GET", f"{STORAGE}/objects/outage/x", token)
        assert (status, error_code(body)) == (502, "STORAGE_BACKEND_ERROR")
    finally:
        own_s3.stop()
    status, _, body = http_get(base + "/health/ready", timeout_s=10)
    assert status == 503 and json.loads(body)["checks"]["s3"].startswith("error")
    status, headers, body = raw_request(base, "GET", f"{STORAGE}/objects/outage/x", token)
    assert (status, error_code(body)) == (503, "STORAGE_UNAVAILABLE") and headers["retry-after"]
    assert proxy.stop() == 0


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


async def test_large_transfers_keep_proxy_memory_flat(storage, start_mode):
    """1 GiB up and down through a fresh proxy: its peak RSS grows by far less than the object."""
    port = str(devstack.free_ports(1)[0])
    env = {**proxy_env(storage.env), "BUNKER_PROXY_PORT": port, "STORAGE_MAX_OBJECT_BYTES": str(2048 * MiB)}
    proxy = start_mode("bunker_proxy", env)
    base = f"http://127.0.0.1:{port}"
    proxy.wait_for(lambda: http_ok(base + "/health/ready"), what="ready")
    # The node mints at most its own STORAGE_MAX_OBJECT_BYTES (12 MiB); this proxy allows 2 GiB, and so does the
    # capability, signed with the shared secret as the http process would sign it.
    tenant_id = tenant_id_of(storage, storage.token("large/"))
    token = capabilities.mint(Secret(storage.env["STORAGE_CAPABILITY_SECRET"]), capabilities.Capability(
        "cap_large", tenant_id, "large/", frozenset(ALL_VERBS), 2048 * MiB, int(time.time()) + 600))
    url = f"{base}{STORAGE}/objects/large/blob"
    auth = {"Authorization": f"Bearer {token}"}
    size = 1024 * MiB
    block = os.urandom(MiB)
    # Warm up (imports, first S3 connection), then take the baseline.
    assert raw_request(base, "PUT", f"{STORAGE}/objects/large/warm", token, block)[0] == 201
    baseline_kib = rss_kib(proxy.process.pid, "VmRSS")

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // MiB):
            yield block

    upload_digest = hashlib.sha256()
    for _ in range(size // MiB):
        upload_digest.update(block)
    download_digest = hashlib.sha256()
    timeout = aiohttp.ClientTimeout(total=100)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.put(url, data=body(), headers=auth) as response:
            assert response.status == 201, await response.text()
        async with session.get(url, headers=auth) as response:
            assert response.status == 200
            async for chunk in response.content.iter_chunked(MiB):
                download_digest.update(chunk)
        async with session.delete(url, headers=auth) as response:
            assert response.status == 204
    assert download_digest.digest() == upload_digest.digest()
    growth_mib = (rss_kib(proxy.process.pid, "VmHWM") - baseline_kib) / 1024
    assert growth_mib < 64, f"peak RSS grew by {growth_mib:.0f} MiB for a {size // MiB} MiB object"
    assert proxy.stop() == 0


# --- the storage thread pool (STORAGE_MAX_TRANSFERS) ---

def own_capability(storage: Storage, prefix: str, max_bytes: int) -> str:
    """A capability past the node's own STORAGE_MAX_OBJECT_BYTES, signed with the shared secret as the node would."""
    tenant_id = tenant_id_of(storage, storage.token(prefix))
    return capabilities.mint(Secret(storage.env["STORAGE_CAPABILITY_SECRET"]), capabilities.Capability(
        "cap_" + secrets.token_hex(4), tenant_id, prefix, frozenset(ALL_VERBS), max_bytes, int(time.time()) + 600))


async def test_a_full_pool_answers_busy_instead_of_queueing(storage, start_mode):
    port = str(devstack.free_ports(1)[0])
    proxy = start_mode("bunker_proxy", {**proxy_env(storage.env), "BUNKER_PROXY_PORT": port,
                                        "STORAGE_MAX_TRANSFERS": "1", "STORAGE_MAX_OBJECT_BYTES": str(64 * MiB)})
    base = f"http://127.0.0.1:{port}"
    proxy.wait_for(lambda: http_ok(base + "/health/ready"), what="ready")
    auth = {"Authorization": f"Bearer {own_capability(storage, 'busy/', 64 * MiB)}"}
    url = f"{base}{STORAGE}/objects/busy/"
    first = bytes(32 * MiB)  # far more than the sockets buffer: sent only once the proxy's handler reads it
    in_handler, finish = asyncio.Event(), asyncio.Event()

    async def held_body() -> AsyncIterator[bytes]:
        yield first
        in_handler.set()
        await finish.wait()
        yield b"end"

    async with aiohttp.ClientSession() as session:
        async def upload() -> tuple[int, Any]:
            async with session.put(url + "held", data=held_body(), headers=auth) as response:
                return response.status, await response.json()

        held = asyncio.create_task(upload())
        await asyncio.wait_for(in_handler.wait(), 30)
        for method, key in [("GET", "held"), ("HEAD", "other"), ("PUT", "other")]:
            async with session.request(method, url + key, headers=auth, data=b"x" if method == "PUT" else None
                                       ) as response:
                assert response.status == 503, method
                assert response.headers["Retry-After"] == "2"
                if method != "HEAD":
                    assert (await response.json())["error"]["code"] == "STORAGE_BUSY"
        finish.set()
        status, body = await held
        assert status == 201 and body["data"]["size"] == len(first) + 3
        async with session.head(url + "held", headers=auth) as response:  # the slot is free again
            assert response.status == 200 and int(response.headers["Content-Length"]) == len(first) + 3
    assert proxy.stop() == 0


async def test_a_stalled_upload_is_cut_and_frees_its_slot(storage, start_mode):
    port = str(devstack.free_ports(1)[0])
    proxy = start_mode("bunker_proxy", {**proxy_env(storage.env), "BUNKER_PROXY_PORT": port,
                                        "STORAGE_MAX_TRANSFERS": "1", "STORAGE_CLIENT_STALL_S": "2"})
    base = f"http://127.0.0.1:{port}"
    proxy.wait_for(lambda: http_ok(base + "/health/ready"), what="ready")
    auth = {"Authorization": f"Bearer {own_capability(storage, 'stall/', 64 * MiB)}"}
    url = f"{base}{STORAGE}/objects/stall/"
    in_handler, never = asyncio.Event(), asyncio.Event()

    async def stalling_body() -> AsyncIterator[bytes]:
        yield bytes(8 * MiB)  # far more than the sockets buffer: sent only once the proxy's handler reads it
        in_handler.set()
        await never.wait()  # the client keeps its connection and sends nothing more
        yield b"never"

    async with aiohttp.ClientSession() as session:
        async def upload() -> int:
            async with session.put(url + "stalled", data=stalling_body(), headers=auth) as response:
                return response.status

        stalled = asyncio.create_task(upload())
        await asyncio.wait_for(in_handler.wait(), 30)

        async def head_status() -> int:
            async with session.head(url + "stalled", headers=auth) as response:
                return response.status

        assert await head_status() == 503  # the stalled upload holds the only slot

        async def slot_free() -> bool:
            return await head_status() != 503

        await eventually_async(slot_free, "the stalled upload's slot freed", timeout_s=30, interval_s=0.2)
        assert await head_status() == 404  # nothing of the stalled upload was stored
        never.set()
        with contextlib.suppress(aiohttp.ClientError):
            assert await stalled == 408
    assert any(line.get("status") == 408 for line in proxy.log_lines())
    assert proxy.stop() == 0


class StallingS3(http.server.BaseHTTPRequestHandler):
    """An S3 that answers a download with its headers and first 9 MiB, then sends nothing until released."""

    protocol_version = "HTTP/1.1"
    release = threading.Event()

    def do_GET(self) -> None:
        if "location" in self.path:  # minio asks the bucket's region first
            self.reply(200, b'<LocationConstraint xmlns="http://s3.amazonaws.com/doc/2006-03-01/"/>')
            return
        self.send_response(200)
        self.send_header("Content-Length", str(64 * MiB))
        self.end_headers()
        self.wfile.write(bytes(9 * MiB))  # the proxy's first 8 MiB chunk, and part of the second
        self.wfile.flush()
        self.release.wait(60)
        self.close_connection = True

    def do_HEAD(self) -> None:
        bucket_only = "/" not in self.path.strip("/")
        self.send_response(200 if bucket_only else 404)  # readiness finds the bucket; no object exists
        self.send_header("Content-Length", "0")
        self.end_headers()

    def reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def stalling_s3() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", devstack.free_ports(1)[0]), StallingS3)
    server.daemon_threads = True
    StallingS3.release.clear()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        StallingS3.release.set()
        server.shutdown()
        server.server_close()


async def test_a_download_stalled_in_s3_frees_its_thread_when_the_client_leaves(storage, start_mode):
    # minio would wait minutes for the stalled body (its read timeout), holding the one thread all along.
    with stalling_s3() as s3_url:
        port = str(devstack.free_ports(1)[0])
        proxy = start_mode("bunker_proxy", {**proxy_env(storage.env), "BUNKER_PROXY_PORT": port,
                                            "S3_ENDPOINT_URL": s3_url, "STORAGE_MAX_TRANSFERS": "1"})
        base = f"http://127.0.0.1:{port}"
        proxy.wait_for(lambda: http_ok(base + "/health/ready"), what="ready")
        auth = {"Authorization": f"Bearer {storage.token('stall/')}"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(f"{base}{STORAGE}/objects/stall/blob", headers=auth) as response:
                # The first chunk arrives; the proxy's thread then waits in its read of the second, which stalls.
                # Leaving with the body unread closes the connection.
                assert response.status == 200 and len(await response.content.readexactly(8 * MiB)) == 8 * MiB
            async def served() -> int | None:
                async with session.head(f"{base}{STORAGE}/objects/stall/other", headers=auth) as response:
                    return None if response.status == 503 else response.status

            # Served while S3 still stalls (it does for 60 s): the thread is free, and the proxy was never blocked.
            assert await eventually_async(served, "the stalled download's thread freed", 20, interval_s=0.1) == 404
        assert proxy.stop() == 0
