"""What the request path hands to accounting, and what it gets back from admission."""

from dataclasses import dataclass
from decimal import Decimal


@dataclass(frozen=True)
class RateState:
    """The most restrictive rate-limit level after this request: sent as X-Scaigrid-Ratelimit-* headers."""

    limit: int
    remaining: int
    reset_unix: int


@dataclass(frozen=True)
class UsageRecord:
    """One inference call, as stored in usage_records (cost exact, from the frontend model's prices; backend_cost from
    the backend's cost_*_per_mtok)."""

    request_id: str
    created_at_unix: float
    partner_id: str
    tenant_id: str
    user_id: str | None
    api_key_id: str | None
    model: str
    backend_id: str | None
    protocol: str  # native | oai
    status: str  # ok | error
    tokens_in: int
    tokens_out: int
    latency_ms: int
    cost: Decimal
    error_code: str | None = None  # the code a failed request answered with (request.failed events)
    backend_cost: Decimal = Decimal(0)  # what the upstream charges for the call
    # Not stored: a request the managed side sent down the hybrid link. It is accounted there, under the same request
    # id and the managed side's prices, so the node's usage outbox leaves it out.
    tunnelled: bool = False
