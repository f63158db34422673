"""Domain errors: raised anywhere, translated to the wire at one boundary (HTTP middleware, gRPC interceptor)."""

from dataclasses import dataclass, field


@dataclass
class FieldError:
    field: str
    message: str


@dataclass
class ScaigridError(Exception):
    """An error with a documented code; `status` is the HTTP status it maps to."""

    message: str
    code: str = "INTERNAL_ERROR"
    status: int = 500
    retry_after_s: int | None = None
    details: list[FieldError] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def not_found(message: str = "no such resource") -> ScaigridError:
    return ScaigridError(message, "NOT_FOUND", 404)


def method_not_allowed(message: str) -> ScaigridError:
    return ScaigridError(message, "METHOD_NOT_ALLOWED", 405)


def service_draining() -> ScaigridError:
    # Clients and load balancers retry elsewhere; the process is on its way out.
    return ScaigridError("this server is shutting down; retry on another", "SERVICE_DRAINING", 503, retry_after_s=1)
