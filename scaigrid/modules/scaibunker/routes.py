"""Object routes under /v1/modules/scaibunker/storage/, the same in the http process and in bunker_proxy.

Callers present a storage capability (`Authorization: Bearer <capability>`), never an API key: the handlers are
public to the gateway and authorise themselves in `_authorised`. Objects live in S3 under tenants/<tenant id>/, so
a capability reaches its own tenant's keys only. Bodies stream through in both directions: an upload goes through
a bounded pipe to minio's multipart put_object running in a thread, a download is read from S3 in chunks by a
thread and written as it comes; neither holds a whole object in memory. Those threads are storage's own pool
(`transfers.Transfers`), never the loop's default executor, which aiohttp's DNS resolver shares with the rest of the
process.
"""

import asyncio
import base64
import binascii
import contextlib
import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, BinaryIO, cast
from urllib.parse import unquote

import urllib3
from aiohttp import web
from minio import Minio
from prometheus_client import Counter

from scaigrid import errors
from scaigrid.access import public
from scaigrid.appkeys import DB, S3, SETTINGS, TRANSFERS
from scaigrid.clock import iso
from scaigrid.envelope import ok
from scaigrid.errors import FieldError
from scaigrid.modules.scaibunker import capabilities
from scaigrid.modules.scaibunker.capabilities import Capability
from scaigrid.modules.scaibunker.tables import storage_audit
from scaigrid.modules.scaibunker.transfers import (
    DOWNLOAD_DEPTH,
    Pipe,
    Pump,
    Transfer,
    close_response,
    s3_errors,
)

logger = logging.getLogger(__name__)

OBJECTS_PATH = "/storage/objects"
CHUNK_BYTES = 1024 * 1024  # what an upload hands from the event loop to the S3 thread at a time
# Any character, newlines included, so that every key reaches the handler and its validation (not a bare 404).
OBJECT_PATH = OBJECTS_PATH + r"/{key:[\s\S]+}"
DEFAULT_LIST = 100
MAX_LIST = 1000
NAMESPACE = "tenants/{tenant_id}/"
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")

REQUESTS = Counter("scaibunker_storage_requests_total", "storage proxy requests", ["verb", "status"])
BYTES = Counter("scaibunker_storage_bytes_total", "object bytes through the storage proxy", ["direction"])


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _counted(verb: str) -> Callable[[Handler], Handler]:
    """Counts every answer of an object route, errors included, by verb and status."""
    def wrap(handler: Handler) -> Handler:
        async def counted(request: web.Request) -> web.StreamResponse:
            try:
                response = await handler(request)
            except errors.ScaigridError as exc:
                REQUESTS.labels(verb, str(exc.status)).inc()
                raise
            REQUESTS.labels(verb, str(response.status)).inc()
            return response

        return counted

    return wrap


# --- authorisation: the one place a capability is checked ---

def _bearer(request: web.Request) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise errors.auth_token_missing()
    return token.strip()


def _raw_key(request: web.Request) -> str:
    """The key as sent, decoded exactly once from the raw path: whatever is still encoded after that is refused."""
    raw = request.rel_url.raw_path.partition(OBJECTS_PATH + "/")[2]
    try:
        key = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise errors.storage_key_invalid("the key is not valid UTF-8") from None
    problem = capabilities.key_problem(key)
    if problem:
        raise errors.storage_key_invalid(problem)
    return key


def _capability(request: web.Request) -> Capability:
    """The request's capability, verified (401 otherwise): the one place a token is read."""
    return capabilities.verify(request.app[SETTINGS].storage.capability_secret, _bearer(request))


def _authorised(request: web.Request, verb: str, key: str) -> Capability:
    """The request's capability, granting `verb` on `key`; 401/403 otherwise."""
    capability = _capability(request)
    capability.allows(verb, key)
    return capability


def _s3_name(capability: Capability, key: str) -> str:
    return NAMESPACE.format(tenant_id=capability.tenant_id) + key


def _s3(request: web.Request) -> tuple[Minio, str]:
    if S3 not in request.app:
        raise errors.storage_not_configured("this node has no object store (S3_ENDPOINT_URL is not set)")
    return request.app[S3], request.app[SETTINGS].s3.bucket


def _transfer(request: web.Request) -> contextlib.AbstractContextManager[Transfer]:
    """A slot of the storage pool for this request (503 STORAGE_BUSY when none is free)."""
    return request.app[TRANSFERS].transfer()


async def _audit(request: web.Request, action: str, name: str, size_bytes: int | None, capability: Capability
                 ) -> None:
    """A log line always; in the http process also a row of the audit table (bunker_proxy has no database)."""
    logger.info("%s %s", action, name, extra={"event": f"storage_{action}", "object_key": name,
                                              "size_bytes": size_bytes, "capability_id": capability.id,
                                              "tenant_id": capability.tenant_id})
    if DB in request.app:
        async with request.app[DB].begin() as conn:
            await conn.execute(storage_audit.insert().values(
                id="aud_" + secrets.token_hex(16), action=action, object_key=name, size_bytes=size_bytes,
                capability_id=capability.id))


# --- uploads ---

def _object_type(request: web.Request) -> str:
    """The type the object is stored with: the client's, unless it names a form encoding of the request itself
    (curl's default), which says nothing about the bytes and makes some S3 servers (moto) parse them away."""
    content_type = request.headers.get("Content-Type", "")
    if not content_type or content_type.startswith(FORM_TYPES):
        return "application/octet-stream"
    return content_type


@public
@_counted("PUT")
async def put_object(request: web.Request) -> web.Response:
    key = _raw_key(request)
    capability = _authorised(request, "PUT", key)
    limit = min(capability.max_bytes, request.app[SETTINGS].storage.max_object_bytes)
    length = request.content_length  # None for a chunked body
    if length is not None and length > limit:
        raise errors.storage_object_too_large(limit)  # before a byte is read, let alone sent to S3
    s3, bucket = _s3(request)
    name = _s3_name(capability, key)
    with _transfer(request) as transfer:
        etag, received = await _upload(request, transfer, s3, bucket, name, limit)
    BYTES.labels("in").inc(received)
    await _audit(request, "put", name, received, capability)
    return ok({"key": key, "size": received, "etag": etag}, status=201)


async def _upload(request: web.Request, transfer: Transfer, s3: Minio, bucket: str, name: str, limit: int
                  ) -> tuple[str | None, int]:
    """Streams the body into S3 as `name`: its etag and size, or nothing stored at all."""
    settings = request.app[SETTINGS].storage
    length = request.content_length
    pipe = Pipe(asyncio.get_running_loop(), depth=max(2, settings.part_size_bytes // CHUNK_BYTES))
    upload = transfer.run(
        s3.put_object, bucket, name, cast(BinaryIO, pipe), -1 if length is None else length,
        content_type=_object_type(request),
        part_size=settings.part_size_bytes,
        # One part at a time: minio's parallel pool keeps its threads when an upload is aborted, and the pipe
        # already overlaps reading the next part with sending this one.
        num_parallel_uploads=1)
    received = 0
    block = bytearray()
    stall_s = settings.client_stall_s
    try:
        while True:
            # A client that stops sending must not hold its slot of the pool (and S3's multipart upload) forever.
            try:
                async with asyncio.timeout(stall_s):
                    chunk = await request.content.read(CHUNK_BYTES)
            except TimeoutError:
                raise errors.storage_client_stalled(stall_s) from None
            if not chunk:
                break
            received += len(chunk)
            if received > limit:
                raise errors.storage_object_too_large(limit)
            block += chunk
            if len(block) >= CHUNK_BYTES:
                await pipe.put(bytes(block), upload)
                block.clear()
        if block:
            await pipe.put(bytes(block), upload)
        await pipe.put(None, upload)
        with s3_errors():
            result = await upload
    except BaseException as exc:  # too large, client gone, S3 failed, or cancelled: nothing may be stored
        pipe.fail(exc if isinstance(exc, Exception) else ConnectionAbortedError("the upload was cut"))
        await asyncio.wait((upload,))  # minio has aborted its multipart upload once this returns
        upload.exception()  # retrieved: `exc` already says why (or is the S3 failure itself)
        raise
    return result.etag, received


# --- downloads ---

def _range(request: web.Request) -> str | None:
    """A single `bytes=` range to pass on to S3; anything else is ignored, as RFC 9110 allows."""
    value = request.headers.get("Range", "").strip()
    if not value.startswith("bytes=") or "," in value:
        return None
    first, dash, last = value[len("bytes="):].partition("-")
    if not dash or not (first or last) or not all(part.isascii() and part.isdigit() for part in (first, last) if part):
        return None
    if first and last and int(last) < int(first):
        return None
    return value


async def _object_size(transfer: Transfer, s3: Minio, bucket: str, name: str) -> int | None:
    with s3_errors():
        stat = await transfer.run(s3.stat_object, bucket, name)
    return stat.size


@public
@_counted("GET")
async def get_object(request: web.Request) -> web.StreamResponse:
    key = _raw_key(request)
    capability = _authorised(request, "GET", key)
    s3, bucket = _s3(request)
    with _transfer(request) as transfer:
        return await _download(request, transfer, s3, bucket, _s3_name(capability, key))


async def _download(request: web.Request, transfer: Transfer, s3: Minio, bucket: str, name: str
                    ) -> web.StreamResponse:
    byte_range = _range(request)
    try:
        with s3_errors():
            source = await transfer.run(
                s3.get_object, bucket, name, request_headers={"Range": byte_range} if byte_range else None)
    except errors.ScaigridError as exc:
        if exc.status == 416:  # say how large the object is, so the client can ask again
            size = await _object_size(transfer, s3, bucket, name)
            raise errors.ScaigridError(exc.message, exc.code, 416, details=[
                FieldError("Range", f"the object has {size} bytes")]) from None
        raise
    sent = 0
    pump: Pump | None = None
    try:
        response = web.StreamResponse(status=source.status)
        for header in ("Content-Length", "Content-Range", "Content-Type", "ETag", "Last-Modified"):
            if header in source.headers:
                response.headers[header] = source.headers[header]
        response.headers["Accept-Ranges"] = "bytes"
        await response.prepare(request)
        pump = Pump(source, transfer, DOWNLOAD_DEPTH)
        try:
            async for chunk in pump.chunks():
                # A client that stops reading must not hold its slot of the pool forever (TimeoutError is an OSError).
                async with asyncio.timeout(request.app[SETTINGS].storage.client_stall_s):
                    await response.write(chunk)
                sent += len(chunk)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            # Headers are gone: the only honest signal left is a cut connection short of Content-Length.
            logger.warning("download of %s cut after %d bytes: %s", name, sent, exc,
                           extra={"event": "storage_download_cut", "object_key": name})
            response.force_close()
            return response
        finally:
            await pump.close()
        await response.write_eof()
    finally:
        BYTES.labels("out").inc(sent)
        if pump is None:  # otherwise its thread closes `source`
            close_response(source)
    return response


@public
@_counted("HEAD")
async def head_object(request: web.Request) -> web.StreamResponse:
    key = _raw_key(request)
    capability = _authorised(request, "HEAD", key)
    s3, bucket = _s3(request)
    with _transfer(request) as transfer, s3_errors():
        stat = await transfer.run(s3.stat_object, bucket, _s3_name(capability, key))
    response = web.StreamResponse()
    response.content_length = stat.size
    response.content_type = stat.content_type or "application/octet-stream"
    response.headers["Accept-Ranges"] = "bytes"
    if stat.etag:
        response.headers["ETag"] = f'"{stat.etag}"'
    if stat.last_modified:
        response.last_modified = stat.last_modified
    await response.prepare(request)
    await response.write_eof()
    return response


@public
@_counted("DELETE")
async def delete_object(request: web.Request) -> web.Response:
    key = _raw_key(request)
    capability = _authorised(request, "DELETE", key)
    s3, bucket = _s3(request)
    name = _s3_name(capability, key)
    with _transfer(request) as transfer, s3_errors():
        # S3 deletes silently whatever is missing; the caller learns it from a 404 instead.
        await transfer.run(s3.stat_object, bucket, name)
        await transfer.run(s3.remove_object, bucket, name)
    await _audit(request, "delete", name, None, capability)
    return web.Response(status=204)


# --- listing ---

def _list_query(request: web.Request, capability: Capability) -> tuple[str, int, str | None]:
    """?prefix= (default: the capability's), ?limit= (1-1000), ?cursor= (from the previous page)."""
    problems = []
    prefix = request.query.get("prefix", capability.prefix)
    bare = prefix[:-1] if prefix.endswith("/") else prefix
    if bare and (problem := capabilities.key_problem(bare)):
        problems.append(FieldError("prefix", problem))
    raw_limit = request.query.get("limit", str(DEFAULT_LIST))
    limit = int(raw_limit) if raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 4 else 0
    if not 1 <= limit <= MAX_LIST:
        problems.append(FieldError("limit", f"a whole number 1-{MAX_LIST}"))
    after = None
    if cursor := request.query.get("cursor"):
        try:
            after = base64.urlsafe_b64decode(cursor.encode()).decode()
        except (ValueError, binascii.Error, UnicodeDecodeError):
            after = None
        if after is None or capabilities.key_problem(after) or not after.startswith(prefix):
            problems.append(FieldError("cursor", "not a cursor from a previous page"))
    if problems:
        raise errors.validation_error(problems, "invalid query parameters")
    return prefix, limit, after


@public
@_counted("LIST")
async def list_objects(request: web.Request) -> web.Response:
    capability = _capability(request)
    prefix, limit, after = _list_query(request, capability)
    capability.allows("LIST", prefix)
    s3, bucket = _s3(request)
    namespace = NAMESPACE.format(tenant_id=capability.tenant_id)

    def first_page() -> list[Any]:
        listing = s3.list_objects(bucket, prefix=namespace + prefix, recursive=True,
                                  start_after=namespace + after if after else None)
        return list(itertools.islice(listing, limit + 1))

    with _transfer(request) as transfer, s3_errors():
        found = await transfer.run(first_page)
    more = len(found) > limit
    items = [{"key": item.object_name[len(namespace):], "size": item.size, "etag": item.etag,
              "last_modified": iso(item.last_modified)} for item in found[:limit]]
    cursor = base64.urlsafe_b64encode(items[-1]["key"].encode()).decode() if more else None
    return ok({"items": items, "pagination": {"has_more": more, "next_cursor": cursor}})


ROUTES = [
    web.put(OBJECT_PATH, put_object),
    web.get(OBJECT_PATH, get_object, allow_head=False),
    web.head(OBJECT_PATH, head_object),
    web.delete(OBJECT_PATH, delete_object),
    web.get(OBJECTS_PATH, list_objects, allow_head=False),
]
