"""A real webhook receiver for the tests: an aiohttp server in its own thread that checks signatures as a user would.

Each webhook gets its own path (`url(name)`); `secrets[name]` is the secret the receiver checks its
X-ScaiGrid-Signature with (401 when it does not match, or none is known). `behaviours[name]` decides the answer:
  ok (default)   200
  fail           500
  hang           no answer until `release` is set (then 200)
  slow-MS        200 after MS milliseconds
"""

import asyncio
import hashlib
import hmac
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.support.waiting import eventually
from tests.threaded_server import ThreadedServer


@dataclass
class Arrival:
    name: str
    headers: dict[str, str]
    event: dict[str, Any]
    signature_valid: bool
    at_s: float  # time.monotonic() on arrival

    @property
    def event_id(self) -> str:
        return str(self.event["event_id"])


class Receiver(ThreadedServer):
    name = "webhook-receiver"

    def __init__(self) -> None:
        super().__init__()
        self.secrets: dict[str, str] = {}
        self.behaviours: dict[str, str] = {}
        self.arrivals: list[Arrival] = []
        self.release = threading.Event()
        self._lock = threading.Lock()

    def url(self, name: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/hooks/{name}"

    def releasing(self) -> None:
        self.release.set()

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/hooks/{name}", self._receive)]

    async def _receive(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        raw = await request.read()
        secret = self.secrets.get(name)
        expected = "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest() if secret else ""
        valid = bool(secret) and hmac.compare_digest(expected, request.headers.get("X-ScaiGrid-Signature", ""))
        with self._lock:
            self.arrivals.append(Arrival(name, dict(request.headers), json.loads(raw), valid, time.monotonic()))
        if not valid:
            return web.json_response({"error": "bad signature"}, status=401)
        behaviour = self.behaviours.get(name, "ok")
        if behaviour == "fail":
            return web.json_response({"error": "receiver down"}, status=500)
        if behaviour == "hang":
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait)
        if match := re.fullmatch(r"slow-(\d+)", behaviour):
            await asyncio.sleep(int(match[1]) / 1000)  # a slow receiver is the behaviour asked for
        return web.json_response({"received": True})

    def arrived(self, name: str) -> list[Arrival]:
        with self._lock:
            return [arrival for arrival in self.arrivals if arrival.name == name]

    def wait_for(self, condition: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
        eventually(condition, what, timeout_s, context=lambda: f"arrived: {self.arrivals}")
