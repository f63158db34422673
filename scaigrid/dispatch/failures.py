"""One failed backend attempt, whatever the transport (HTTP or gRPC): what the breaker, failover and client see."""

from dataclasses import dataclass


@dataclass
class Failure(Exception):
    """One backend attempt that failed; `kind` decides the breaker, failover and the client's error code."""

    kind: str  # connect | timeout | status | rate_limited | shape | refused | cut | upstream
    detail: str  # for the log and the breaker's last_error; may quote the backend
    retry_after_s: float = 0.0
    public: str = ""  # for the client: never the backend's own words (they may name hosts or key prefixes)
