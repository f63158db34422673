"""http mode: the API on HTTP_PORT (/v1/, /oai/v1/, /health, /metrics), draining on SIGTERM."""

import uvloop

from scaigrid.api.app import create_app
from scaigrid.api.base import serve
from scaigrid.settings import Requirement, Settings

REQUIRES: tuple[Requirement, ...] = ("database", "redis", "encryption")


def run(settings: Settings) -> int:
    server = settings.server
    # uvloop: the gateway's hot path is mostly event-loop and socket work, which uvloop does in C.
    return uvloop.run(serve(create_app(settings), server.bind_host, server.http_port, server.http_drain_grace_s))
