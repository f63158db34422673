"""What the pipeline asks of a backend's transport (HTTP, or scaiinfer.v1 over gRPC), and what a request needs of it."""

from collections.abc import Mapping
from typing import Any, Protocol

from scaigrid.routing.catalogue import Backend

# What a request may need that not every transport carries; a backend lacking one is passed over for the request.
TOOLS, NON_TEXT, EMBEDDINGS = "tools", "non-text content", "embeddings"
# Where a client's request asks for each need, for the 422 when no backend of the model has it.
NEED_FIELDS = {TOOLS: "tools", NON_TEXT: "messages", EMBEDDINGS: "model"}


def request_needs(payload: dict[str, Any], embeddings: bool) -> frozenset[str]:
    """What of NEED_FIELDS the request needs (the body is already validated by dispatch/schemas.py)."""
    if embeddings:
        return frozenset((EMBEDDINGS,))
    needs = set()
    if payload.get("tools"):
        needs.add(TOOLS)
    if any(isinstance(message.get("content"), list) and any(part.get("type") != "text" for part in message["content"])
           for message in payload["messages"]):
        needs.add(NON_TEXT)
    return frozenset(needs)


class Upstream(Protocol):
    """A backend's streamed answer as OpenAI SSE bytes, whatever its transport."""

    async def read(self) -> bytes:
        """The next bytes; b"" at the end (before [DONE], that is a cut stream)."""

    def close(self) -> None:
        """Lets go of the answer; before its end, the backend sees us go and stops generating."""


class Transport(Protocol):
    """How the pipeline reaches one kind of backend; failures raise dispatch.failures.Failure."""

    lacks: Mapping[str, str]  # the needs it cannot serve, each with why (for the client's 422)

    def available(self, backend: Backend, now_s: float) -> bool:
        """False when the backend cannot be reached now for a reason that is not its breaker's business."""

    async def open(self, backend: Backend, payload: dict[str, Any], request_id: str) -> Upstream:
        """The backend's stream, once it has accepted the request (or at its first read)."""

    async def fetch(self, backend: Backend, payload: dict[str, Any], request_id: str, embeddings: bool) -> bytes:
        """The backend's whole JSON answer."""
