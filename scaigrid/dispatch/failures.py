"""One failed backend attempt, whatever the transport (HTTP or gRPC): what the breaker, failover and client see."""

from dataclasses import dataclass
from typing import Literal

# connect (no connection, or a refused target), timeout, status (a failing answer), rate_limited (429: the backend
# cools down), shape (not the OpenAI shape), refused (the request's own fault: no failover, no breaker failure),
# cut (a stream broke off), upstream (an error frame in the backend's stream).
FailureKind = Literal["connect", "timeout", "status", "rate_limited", "shape", "refused", "cut", "upstream"]


@dataclass
class Failure(Exception):
    """One backend attempt that failed; `kind` decides the breaker, failover and the client's error code."""

    kind: FailureKind
    detail: str  # for the log and the breaker's last_error; may quote the backend
    retry_after_s: float = 0.0
    public: str = ""  # for the client: never the backend's own words (they may name hosts or key prefixes)
