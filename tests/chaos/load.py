"""A steady mixed load through a running appliance's nginx over TLS, and each request's outcome as its client saw it.

`prepare` gives a stack what the load needs: two tenants with two users' keys each, chat models routed to a
FakeBackend (one that behaves, and three that misbehave on purpose), a webhook per tenant to a Receiver, and a
storage capability per tenant. `Traffic` sends, from a thread of its own, non-streamed and streamed chat on both
surfaces from every key, and storage PUTs each followed by a GET of the same object, at a fixed concurrency and rate.

Each request ends as one of three outcomes:
  succeeded          the answer a client wanted (a completion; a stream ending with [DONE]; an object stored or read
                     back with the bytes that were put)
  failed_documented  an error envelope (native or OpenAI shape) whose code the docs list, or a stream's
                     `event: error` frame with such a code, after which the stream ends
  failed_other       anything else, each a defect: a stream that ends without [DONE] and without an error frame, a
                     200 that is not the answer, an error that is not an envelope with a documented code (nor one
                     with INTERNAL_ERROR: documented as "the log has the traceback"), a connection refused or reset,
                     no answer within the client's timeout, an object read back with other bytes
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import json
import os
import random
import re
import secrets
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import aiohttp

from appliance.config import keys as appliance_keys
from appliance.local import child_env
from scaigrid.settings import setting_parsers
from tests.appliance_stack import ApplianceStack
from tests.backends import FakeBackend, backend, catalogue_toml, chat_model
from tests.support.waiting import eventually
from tests.webhook_receiver import Receiver

# --- the world ---

CHAT = "chaos-chat"  # behaves: streams 4 chunks 50 ms apart, so that faults find streams in flight
CUT = "chaos-cut"  # its backend drops the connection mid-answer (streamed or not)
STALL = "chaos-stall"  # its backend stalls past the timeouts: before answering, or after a stream's first chunk
LIMITED = "chaos-429"  # its backend answers 429 with Retry-After
MISBEHAVING = (CUT, STALL, LIMITED)
# chaos-stall's backend gives up on its first byte this soon; its streams that started are ended by
# DISPATCH_STREAM_TIMEOUT_S (STACK_SETTINGS). Both stay far below the client's timeout.
STALL_TIMEOUT_S = 2
CHAT_TIMEOUT_S = 10  # chaos-chat's backend: its answers take well under a second
STORAGE = "/v1/modules/scaibunker/storage"
OBJECT_PREFIX = "chaos/"
EVENTS = ["request.completed", "request.failed"]

# What a stack carrying the load runs with, given to start_stack (appliance.env passes ScaiGrid settings through).
STACK_SETTINGS = {
    # Each of the load's keys sends far more than the default 60 requests a minute; rate limits are not measured here.
    "RATE_LIMIT_KEY_RPM": "100000", "RATE_LIMIT_USER_RPM": "100000", "RATE_LIMIT_TENANT_RPM": "100000",
    "RATE_LIMIT_PARTNER_RPM": "100000",
    # The webhook receiver listens on loopback, as a tenant's receiver never would on an appliance.
    "WEBHOOK_ALLOW_PRIVATE_TARGETS": "true",
    # Usage, and the request.* events emitted with it, reach MariaDB within seconds: an audit waits little.
    "USAGE_FLUSH_INTERVAL_S": "2",
    # A stream that stalls after it started ends with an error frame this soon (the default is 600 s).
    "DISPATCH_STREAM_TIMEOUT_S": "10",
}


@dataclass(frozen=True)
class Caller:
    """One user's API key, and the tenant whose storage capability its storage requests use."""

    tenant: str  # the tenant's slug
    tenant_id: str
    user_id: str
    key: str
    storage_token: str


@dataclass(frozen=True)
class Tenant:
    slug: str
    id: str
    webhook_id: str
    hook: str  # the receiver's path name for this tenant's webhook


@dataclass
class World:
    stack: ApplianceStack
    fake: FakeBackend
    receiver: Receiver
    tenants: list[Tenant]
    callers: list[Caller]
    started_unix: float  # when prepare began: the load's usage rows are all later
    warmup_request_ids: set[str] = field(default_factory=set)  # prepare's own chat requests (they have usage rows)


def catalogue(fake: FakeBackend) -> str:
    """The chaos models, each on a backend of its own so that one's circuit breaker never touches another."""
    prices = {"input_price_per_mtok": "1.00", "output_price_per_mtok": "2.00"}
    backends = [backend(CHAT, fake, "paced-4-50", timeout_s=CHAT_TIMEOUT_S),
                backend(CUT, fake, "chop-2", timeout_s=CHAT_TIMEOUT_S),
                backend(STALL, fake, "stall-1-120", timeout_s=STALL_TIMEOUT_S),
                backend(LIMITED, fake, "ratelimit-7", timeout_s=CHAT_TIMEOUT_S)]
    return catalogue_toml(backends, [chat_model(slug, [(slug, 1, 1)], **prices) for slug in (CHAT, *MISBEHAVING)])


def api(stack: ApplianceStack, method: str, path: str, token: str, body: Any = None,
        timeout_s: float = 20) -> tuple[int, dict[str, Any], dict[str, str]]:
    """One JSON request through nginx: (status, body, headers), errors included."""
    request = urllib.request.Request(stack.url + path, method=method, headers={"Authorization": f"Bearer {token}"})
    if body is not None:
        request.data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=stack.tls_context()) as response:
            status, payload, headers = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        status, payload, headers = error.code, error.read(), dict(error.headers)
    return status, json.loads(payload) if payload else {}, headers


def created(stack: ApplianceStack, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST as the stack's operator, expecting 201: the created item."""
    status, reply, _ = api(stack, "POST", path, stack.admin_key, body)
    assert status == 201, (path, status, reply)
    return dict(reply["data"])


def apply_catalogue(stack: ApplianceStack, text: str) -> None:
    """`scaigrid admin apply` on the stack's env file, as an operator on the appliance runs it."""
    path = stack.var / f"chaos-catalogue-{secrets.token_hex(4)}.toml"
    path.write_text(text)
    result = subprocess.run([str(stack.config.venv / "bin" / "scaigrid"), "--env-file",
                             str(stack.config.scaigrid_env_file), "admin", "apply", str(path)],
                            env=child_env(), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def prepare(stack: ApplianceStack, fake_backend: FakeBackend, receiver: Receiver, *, tenants: int = 2,
            keys_per_tenant: int = 2) -> World:
    """The load's world on a running stack (started with STACK_SETTINGS), made through its API as an operator would;
    returns once every key gets a chat completion through nginx."""
    started_unix = time.time()
    apply_catalogue(stack, catalogue(fake_backend))
    suffix = secrets.token_hex(3)  # prepare may run more than once on a stack
    made_tenants, callers = [], []
    for number in range(tenants):
        slug = f"chaos-{number}-{suffix}"
        tenant_id = created(stack, "/v1/tenants", {"slug": slug, "name": f"Chaos {number}"})["id"]
        hook = slug
        webhook = created(stack, "/v1/webhooks", {"url": receiver.url(hook), "events": EVENTS, "tenant_id": tenant_id})
        receiver.secrets[hook] = webhook["secret"]
        token = created(stack, STORAGE + "/capabilities", {
            "prefix": OBJECT_PREFIX, "verbs": ["PUT", "GET"], "ttl_s": 86400, "tenant_id": tenant_id})["token"]
        made_tenants.append(Tenant(slug, tenant_id, webhook["id"], hook))
        for _ in range(keys_per_tenant):
            user_id = created(stack, "/v1/users", {"email": f"load-{secrets.token_hex(4)}@example.com",
                                                   "role": "tenant_user", "tenant_id": tenant_id})["id"]
            key = created(stack, "/v1/api-keys", {"name": "chaos load", "user_id": user_id})["key"]
            callers.append(Caller(slug, tenant_id, user_id, key, token))
    world = World(stack, fake_backend, receiver, made_tenants, callers, started_unix)
    for caller in callers:  # every http process loads the catalogue and the keys on its own schedule
        eventually(functools.partial(warm_up, world, caller), f"a chat completion for {caller.tenant}'s key", 60)
    return world


def warm_up(world: World, caller: Caller) -> bool:
    """One chat completion with the caller's key; its request id is kept, so that the audit knows its usage row."""
    body = {"model": CHAT, "messages": MESSAGES}
    status, _, headers = api(world.stack, "POST", "/v1/inference/chat", caller.key, body)
    if request_id := headers.get("X-Request-ID"):
        world.warmup_request_ids.add(request_id)
    return status == 200


# --- outcomes ---

SUCCEEDED, DOCUMENTED, OTHER = "succeeded", "failed_documented", "failed_other"
OUTCOMES = (SUCCEEDED, DOCUMENTED, OTHER)
DOCS = Path(__file__).resolve().parents[2] / "docs"
# The codes of the ScaiGrid facts sheet (SCAIGRID_API.md), which docs/api.md names as the list rather than repeats.
API_SHEET_CODES = frozenset({
    "AUTH_TOKEN_MISSING", "AUTH_TOKEN_INVALID", "AUTH_INSUFFICIENT_SCOPE", "AUTHZ_PERMISSION_DENIED",
    "SERVICE_TOKEN_INVALID", "VALIDATION_ERROR", "SLUG_CONFLICT", "MODEL_NOT_FOUND", "MODEL_ACCESS_DENIED",
    "MODEL_UNAVAILABLE", "BACKEND_NOT_FOUND", "BACKEND_ERROR", "BACKEND_TIMEOUT", "BACKEND_RATE_LIMITED",
    "UPSTREAM_SHAPE_MISMATCH", "RATE_LIMITED", "BUDGET_EXCEEDED", "MODULE_NOT_ENABLED", "QUOTA_EXCEEDED",
    "PROVIDER_NOT_FOUND", "PROVIDER_DISCOVERY_ERROR", "PROVIDER_HAS_BACKENDS"})
# Documented, but as "the log has the traceback": an unhandled exception, which is a defect wherever a client meets it.
NOT_AN_ANSWER = frozenset({"INTERNAL_ERROR"})


def documented_codes(docs: Path = DOCS) -> frozenset[str]:
    """Every error code the docs name (a backticked UPPER_SNAKE word that is not a setting), and the facts sheet's."""
    names = {name for path in docs.glob("*.md")
             for name in re.findall(r"`([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)`", path.read_text())}
    settings = set(setting_parsers()) | {key.name for key in appliance_keys()}
    return frozenset((names - settings) | API_SHEET_CODES) - NOT_AN_ANSWER


DOCUMENTED_CODES = documented_codes()


def error_code(body: bytes) -> str | None:
    """The code of a native envelope `{"status":"error","error":{"code"}}` or of OpenAI's `{"error":{"code"}}`."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("code"), str):
        return None
    if "status" in payload and payload["status"] != "error":
        return None
    return str(error["code"])


@dataclass
class Record:
    """One request as its client saw it. Times are time.monotonic() (started_s, ended_s) and time.time() (unix)."""

    kind: str  # chat | chat_stream | native_chat | native_stream | storage_put | storage_get
    tenant: str
    caller: int  # index in World.callers
    model: str | None
    started_s: float
    started_unix: float
    request_id: str | None = None  # the X-Request-ID header (or the envelope's meta.request_id)
    outcome: str = OTHER
    error_code: str | None = None
    status: int | None = None
    ended_s: float = 0.0
    note: str = ""  # what a failed_other was, for the report
    retry_after: str | None = None  # the Retry-After header, as a 429 or 503 gives it
    object_key: str | None = None  # storage: the object, and the sha256 of the bytes put
    sha256: str | None = None

    @property
    def chat(self) -> bool:
        return not self.kind.startswith("storage")

    def failed(self, status: int, body: bytes) -> None:
        """An answer that is not a success: documented when it is an envelope with a documented code."""
        self.status = status
        self.error_code = error_code(body)
        if self.request_id is None:  # nginx's own answers carry its request id in the envelope only
            with contextlib.suppress(ValueError, LookupError, TypeError):
                self.request_id = json.loads(body)["meta"]["request_id"]
        if self.error_code in DOCUMENTED_CODES:
            self.outcome = DOCUMENTED
        else:
            self.outcome, self.note = OTHER, f"HTTP {status}: {self.error_code or body[:120]!r}"


@dataclass(frozen=True)
class Stats:
    attempted: int
    succeeded: int
    failed_documented: int
    failed_other: int
    by_kind: dict[str, dict[str, int]]  # kind -> outcome -> count
    by_model: dict[str, dict[str, int]]  # chat model -> outcome -> count
    codes: dict[str, int]  # error code -> count, over every failure that had one
    other: list[str] = field(default_factory=list)  # the first failed_other, described

    @classmethod
    def of(cls, records: list[Record], examples: int = 20) -> Stats:
        outcomes = Counter(record.outcome for record in records)
        by_kind: dict[str, Counter[str]] = {}
        by_model: dict[str, Counter[str]] = {}
        for record in records:
            by_kind.setdefault(record.kind, Counter())[record.outcome] += 1
            if record.model is not None:
                by_model.setdefault(record.model, Counter())[record.outcome] += 1
        return cls(len(records), outcomes[SUCCEEDED], outcomes[DOCUMENTED], outcomes[OTHER],
                   {kind: dict(counts) for kind, counts in by_kind.items()},
                   {model: dict(counts) for model, counts in by_model.items()},
                   dict(Counter(record.error_code for record in records if record.error_code)),
                   [f"{r.kind} {r.model or ''} {r.request_id or 'no request id'}: {r.note}" for r in records
                    if r.outcome == OTHER][:examples])

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the traffic ---

KINDS = ("chat", "chat_stream", "native_chat", "native_stream", "storage")
PATHS = {"chat": "/oai/v1/chat/completions", "chat_stream": "/oai/v1/chat/completions",
         "native_chat": "/v1/inference/chat", "native_stream": "/v1/inference/chat"}
MESSAGES = [{"role": "user", "content": "hi"}]
MIN_OBJECT_BYTES, MAX_OBJECT_BYTES = 1024, 64 * 1024


class Traffic:
    """A steady mixed load: `concurrency` clients taking turns at `rate_per_s` requests a second in all.

    Each turn is the next kind of KINDS (a storage turn is a PUT, then a GET of the same object) from the next caller;
    a chat turn names chaos-chat, or a misbehaving model with the share `mix` gives it. Every connection is new
    (no keep-alive), so that a connection nginx closed between two requests never passes for a reset.
    """

    def __init__(self, world: World, concurrency: int = 8, *, rate_per_s: float = 20.0,
                 client_timeout_s: float = 45.0, seed: int | None = None) -> None:
        self.world = world
        self.concurrency = concurrency
        self.rate_per_s = rate_per_s
        self.client_timeout_s = client_timeout_s
        self._random = random.Random(seed)
        self._shares: dict[str, float] = {}
        self._turns = itertools.count()
        self._records: list[Record] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="chaos-traffic", daemon=True)
        self._failure: BaseException | None = None

    # --- the caller's side ---

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> list[Record]:
        """Lets the requests in flight finish (each within the client's timeout); returns every record."""
        self._stopping.set()
        self._thread.join(self.client_timeout_s + 30)
        assert not self._thread.is_alive(), "the traffic thread did not stop"
        if self._failure is not None:
            raise RuntimeError("the traffic thread failed") from self._failure
        return self.records()

    def mix(self, shares: Mapping[str, float] | None = None) -> None:
        """From now on, this share of chat requests goes to each misbehaving model (the rest to chaos-chat);
        mix() sends them all to chaos-chat again."""
        shares = dict(shares or {})
        unknown = set(shares) - set(MISBEHAVING)
        if unknown or any(share < 0 for share in shares.values()) or sum(shares.values()) > 1:
            raise ValueError(f"shares of {MISBEHAVING}, each >= 0, at most 1 in all: {shares}")
        self._shares = shares

    @staticmethod
    def mark() -> float:
        """Now, on the records' clock: the start of a window for stats(since=...)."""
        return time.monotonic()

    def records(self, since: float | None = None, until: float | None = None, *,
                overlapping: bool = False) -> list[Record]:
        """The ended requests that started in [since, until); overlapping: also those that started before `since`
        and ended after it (in flight when a fault began, they are the ones it hits first)."""
        with self._lock:
            return [record for record in self._records
                    if (since is None or record.started_s >= since or (overlapping and record.ended_s >= since))
                    and (until is None or record.started_s < until)]

    def stats(self, since: float | None = None, until: float | None = None, *, overlapping: bool = False) -> Stats:
        return Stats.of(self.records(since, until, overlapping=overlapping))

    def last_failure_s(self, since: float | None = None, until: float | None = None) -> float | None:
        """When (records' clock) the last request of the window (overlapping) that did not succeed ended: every
        request the clients started after it succeeded, so recovery as the clients saw it is no later."""
        return max((r.ended_s for r in self.records(since, until, overlapping=True) if r.outcome != SUCCEEDED),
                   default=None)

    # --- the traffic's own thread ---

    async def _main(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.client_timeout_s)
        connector = aiohttp.TCPConnector(ssl=self.world.stack.tls_context(), force_close=True)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                await asyncio.gather(*(self._client(session, number) for number in range(self.concurrency)))
        except BaseException as exc:  # handed to stop(), which the caller waits in
            self._failure = exc
            raise

    async def _client(self, session: aiohttp.ClientSession, number: int) -> None:
        loop = asyncio.get_running_loop()
        interval_s = self.concurrency / self.rate_per_s
        next_s = loop.time() + interval_s * number / self.concurrency  # the clients' turns spread evenly
        while not self._stopping.is_set():
            # The pace asked for: each client starts a turn every interval_s (later when a request took longer).
            await asyncio.sleep(max(0.0, next_s - loop.time()))
            next_s = max(next_s + interval_s, loop.time())
            turn = next(self._turns)
            kind = KINDS[turn % len(KINDS)]
            caller_index = (turn // len(KINDS)) % len(self.world.callers)
            if kind == "storage":
                put = await self._put(session, caller_index)
                if put.outcome == SUCCEEDED:
                    await self._get(session, caller_index, put)
            else:
                await self._chat(session, caller_index, kind)

    def _new(self, kind: str, caller_index: int, model: str | None) -> Record:
        return Record(kind, self.world.callers[caller_index].tenant, caller_index, model, time.monotonic(),
                      time.time())

    def _done(self, record: Record) -> Record:
        record.ended_s = time.monotonic()
        with self._lock:
            self._records.append(record)
        return record

    def _model(self) -> str:
        draw = self._random.random()
        for model, share in self._shares.items():
            if draw < share:
                return model
            draw -= share
        return CHAT

    async def _chat(self, session: aiohttp.ClientSession, caller_index: int, kind: str) -> Record:
        record = self._new(kind, caller_index, self._model())
        stream = kind.endswith("stream")
        body = {"model": record.model, "messages": MESSAGES, "stream": stream}
        headers = {"Authorization": f"Bearer {self.world.callers[caller_index].key}"}
        try:
            async with session.post(self.world.stack.url + PATHS[kind], json=body, headers=headers) as response:
                record.request_id = response.headers.get("X-Request-ID")
                record.status, record.retry_after = response.status, response.headers.get("Retry-After")
                if response.status != 200:
                    record.failed(response.status, await response.read())
                elif stream:
                    await self._read_stream(response, record)
                else:
                    self._check_completion(await response.read(), record, native=kind.startswith("native"))
        except TimeoutError:
            record.outcome, record.note = OTHER, f"no answer within the client's {self.client_timeout_s:g} s"
        except Exception as exc:  # refused, reset, or what no client expects: each a defect
            record.outcome, record.note = OTHER, f"{type(exc).__name__}: {exc}"[:200]
        return self._done(record)

    @staticmethod
    def _check_completion(body: bytes, record: Record, native: bool) -> None:
        try:
            payload = json.loads(body)
            completion = payload["data"] if native and payload["status"] == "ok" else payload
            message = completion["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            record.outcome, record.note = OTHER, f"a 200 that is not a completion: {body[:120]!r}"
            return
        record.outcome = SUCCEEDED if isinstance(message.get("content"), str) else OTHER
        if record.outcome == OTHER:
            record.note = f"a completion without content: {body[:120]!r}"

    async def _read_stream(self, response: aiohttp.ClientResponse, record: Record) -> None:
        """Reads SSE events to the end: success is [DONE] without an error frame before it."""
        chunks, done, name, data = 0, False, None, []
        try:
            async for raw in response.content:
                line = raw.rstrip(b"\r\n")
                if line.startswith(b"event:"):
                    name = line[6:].strip()
                elif line.startswith(b"data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    payload = b"\n".join(data)
                    if name == b"error":
                        record.error_code = error_code(b'{"error":' + payload + b"}") or "unreadable"
                    elif payload == b"[DONE]":
                        done = True
                    else:
                        chunks += 1
                    name, data = None, []
        except TimeoutError:
            broke = f"no end within the client's {self.client_timeout_s:g} s, after {chunks} chunk(s)"
        except Exception as exc:  # the connection broke: a defect unless an error frame came first
            broke = f"{type(exc).__name__} after {chunks} chunk(s)"
        else:
            broke = ""
        if record.error_code is not None:  # an error frame, then the end (with or without [DONE])
            if record.error_code in DOCUMENTED_CODES:
                record.outcome = DOCUMENTED
            else:
                record.outcome, record.note = OTHER, f"stream error frame with code {record.error_code}"
        elif done and not broke:
            record.outcome = SUCCEEDED
        else:
            record.outcome = OTHER
            record.note = broke or f"a 200 stream that ended without [DONE] or an error frame, after {chunks} chunk(s)"

    async def _put(self, session: aiohttp.ClientSession, caller_index: int) -> Record:
        record = self._new("storage_put", caller_index, None)
        data = os.urandom(self._random.randint(MIN_OBJECT_BYTES, MAX_OBJECT_BYTES))
        record.object_key = f"{OBJECT_PREFIX}{secrets.token_hex(8)}.bin"
        headers = {"Authorization": f"Bearer {self.world.callers[caller_index].storage_token}",
                   "Content-Type": "application/octet-stream"}
        try:
            async with session.put(f"{self.world.stack.url}{STORAGE}/objects/{record.object_key}", data=data,
                                   headers=headers) as response:
                record.request_id = response.headers.get("X-Request-ID")
                record.status, record.retry_after = response.status, response.headers.get("Retry-After")
                body = await response.read()
                if response.status in (200, 201):
                    size = json.loads(body).get("data", {}).get("size") if body else None
                    if size == len(data):
                        record.outcome, record.sha256 = SUCCEEDED, hashlib.sha256(data).hexdigest()
                    else:
                        record.outcome, record.note = OTHER, f"PUT of {len(data)} bytes answered size {size}"
                else:
                    record.failed(response.status, body)
        except TimeoutError:
            record.outcome, record.note = OTHER, f"no answer within the client's {self.client_timeout_s:g} s"
        except Exception as exc:  # as in _chat
            record.outcome, record.note = OTHER, f"{type(exc).__name__}: {exc}"[:200]
        return self._done(record)

    async def _get(self, session: aiohttp.ClientSession, caller_index: int, put: Record) -> Record:
        record = self._new("storage_get", caller_index, None)
        record.object_key, record.sha256 = put.object_key, put.sha256
        headers = {"Authorization": f"Bearer {self.world.callers[caller_index].storage_token}"}
        try:
            async with session.get(f"{self.world.stack.url}{STORAGE}/objects/{record.object_key}",
                                   headers=headers) as response:
                record.request_id = response.headers.get("X-Request-ID")
                record.status, record.retry_after = response.status, response.headers.get("Retry-After")
                body = await response.read()
                if response.status == 200:
                    if hashlib.sha256(body).hexdigest() == put.sha256:
                        record.outcome = SUCCEEDED
                    else:
                        record.outcome, record.note = OTHER, f"GET returned {len(body)} other bytes than were PUT"
                elif response.status == 404:
                    record.status, record.error_code = 404, error_code(body)
                    record.outcome, record.note = OTHER, "the object is missing right after its PUT succeeded"
                else:
                    record.failed(response.status, body)
        except TimeoutError:
            record.outcome, record.note = OTHER, f"no answer within the client's {self.client_timeout_s:g} s"
        except Exception as exc:  # refused, reset, or what no client expects: each a defect
            record.outcome, record.note = OTHER, f"{type(exc).__name__}: {exc}"[:200]
        return self._done(record)
