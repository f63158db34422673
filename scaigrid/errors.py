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


def module_not_enabled(module_id: str, by: str) -> ScaigridError:
    return ScaigridError(f"the module {module_id} is disabled for this tenant (by its {by}); its data is kept",
                         "MODULE_NOT_ENABLED", 403)


def module_not_available(module_id: str) -> ScaigridError:
    return ScaigridError(f"the module {module_id} is not enabled on this node (the operator adds it to "
                         "SCAIGRID_MODULES)", "MODULE_NOT_AVAILABLE", 409)


def not_found(message: str = "no such resource") -> ScaigridError:
    return ScaigridError(message, "NOT_FOUND", 404)


def method_not_allowed(message: str) -> ScaigridError:
    return ScaigridError(message, "METHOD_NOT_ALLOWED", 405)


def service_draining() -> ScaigridError:
    # Clients and load balancers retry elsewhere; the process is on its way out.
    return ScaigridError("this server is shutting down; retry on another", "SERVICE_DRAINING", 503, retry_after_s=1)


def validation_error(details: list[FieldError], message: str = "the request body is invalid") -> ScaigridError:
    return ScaigridError(message, "VALIDATION_ERROR", 422, details=details)


def auth_token_missing() -> ScaigridError:
    return ScaigridError("send `Authorization: Bearer <API key or token>`", "AUTH_TOKEN_MISSING", 401)


def auth_token_invalid(message: str = "the token is not valid") -> ScaigridError:
    return ScaigridError(message, "AUTH_TOKEN_INVALID", 401)


def service_token_invalid(message: str = "the service token is not valid") -> ScaigridError:
    return ScaigridError(message, "SERVICE_TOKEN_INVALID", 401)


def not_permitted(message: str) -> ScaigridError:
    return ScaigridError(message, "AUTHZ_PERMISSION_DENIED", 403)


def permission_denied(permission: str) -> ScaigridError:
    return not_permitted(f"this needs the permission {permission}")


def insufficient_scope(message: str) -> ScaigridError:
    return ScaigridError(message, "AUTH_INSUFFICIENT_SCOPE", 403)


def slug_conflict(message: str) -> ScaigridError:
    return ScaigridError(message, "SLUG_CONFLICT", 409)


def model_not_found(slug: str) -> ScaigridError:
    return ScaigridError(f"no model {slug!r}", "MODEL_NOT_FOUND", 404)


def model_access_denied(message: str) -> ScaigridError:
    return ScaigridError(message, "MODEL_ACCESS_DENIED", 403)


def model_unavailable(slug: str, why: str = "all unhealthy or circuit breakers open") -> ScaigridError:
    return ScaigridError(f"no backend of {slug!r} is available ({why})", "MODEL_UNAVAILABLE", 503, retry_after_s=5)


def backend_not_found(backend_id: str) -> ScaigridError:
    return ScaigridError(f"no backend {backend_id!r}", "BACKEND_NOT_FOUND", 404)


def backend_in_use(backend_id: str, model_slugs: list[str]) -> ScaigridError:
    return ScaigridError(f"backend {backend_id!r} is still routed by model(s) {', '.join(model_slugs)}; "
                         "remove it from their routes first", "BACKEND_IN_USE", 409)


def model_has_backends(slug: str, backend_names: list[str]) -> ScaigridError:
    # Named after the documented PROVIDER_HAS_BACKENDS: the mappings go first, so that none goes by accident.
    return ScaigridError(f"model {slug!r} still routes to backend(s) {', '.join(backend_names)}; remove its routes "
                         f'first (PUT /v1/routing/{slug} with {{"routes": []}})', "MODEL_HAS_BACKENDS", 409)


def rate_limited(retry_after_s: int, message: str) -> ScaigridError:
    return ScaigridError(message, "RATE_LIMITED", 429, retry_after_s=retry_after_s)


def budget_exceeded(message: str) -> ScaigridError:
    return ScaigridError(message, "BUDGET_EXCEEDED", 429)


def limits_unavailable() -> ScaigridError:
    # Only with RATE_LIMIT_ON_REDIS_FAILURE=refuse; the default serves unlimited instead.
    return ScaigridError("rate limits cannot be checked right now (Redis unreachable); retry shortly",
                         "LIMITS_UNAVAILABLE", 503, retry_after_s=5)


def database_unavailable() -> ScaigridError:
    return ScaigridError("the database cannot be reached right now; retry shortly", "DATABASE_UNAVAILABLE", 503,
                         retry_after_s=5)


def backend_error(message: str) -> ScaigridError:
    return ScaigridError(message, "BACKEND_ERROR", 502)


def backend_timeout(message: str) -> ScaigridError:
    return ScaigridError(message, "BACKEND_TIMEOUT", 504)


def backend_rate_limited(retry_after_s: int, message: str) -> ScaigridError:
    return ScaigridError(message, "BACKEND_RATE_LIMITED", 429, retry_after_s=retry_after_s)


def upstream_shape_mismatch(message: str) -> ScaigridError:
    return ScaigridError(message, "UPSTREAM_SHAPE_MISMATCH", 502)


# --- ScaiBunker storage proxy ---

def capability_invalid(message: str = "the storage capability is not valid") -> ScaigridError:
    return ScaigridError(message, "CAPABILITY_INVALID", 401)


def capability_expired() -> ScaigridError:
    return ScaigridError("the storage capability has expired; mint a new one", "CAPABILITY_EXPIRED", 401)


def capability_denied(message: str) -> ScaigridError:
    return ScaigridError(message, "CAPABILITY_DENIED", 403)


def storage_key_invalid(message: str) -> ScaigridError:
    return ScaigridError(message, "STORAGE_KEY_INVALID", 400)


def storage_object_not_found() -> ScaigridError:
    return ScaigridError("no such object", "STORAGE_OBJECT_NOT_FOUND", 404)


def storage_object_too_large(limit_bytes: int) -> ScaigridError:
    return ScaigridError(f"the object exceeds the limit of {limit_bytes} bytes; nothing was stored",
                         "STORAGE_OBJECT_TOO_LARGE", 413)


def request_too_large(limit_bytes: int) -> ScaigridError:
    """The code nginx answers with too (its @request_too_large), so a client sees one error whoever refused."""
    return ScaigridError(f"the request body exceeds the limit of {limit_bytes} bytes", "REQUEST_TOO_LARGE", 413)


def storage_range_not_satisfiable() -> ScaigridError:
    return ScaigridError("the requested range lies outside the object", "STORAGE_RANGE_NOT_SATISFIABLE", 416)


def storage_unavailable() -> ScaigridError:
    return ScaigridError("the object store cannot be reached; retry shortly", "STORAGE_UNAVAILABLE", 503,
                         retry_after_s=5)


def storage_busy() -> ScaigridError:
    return ScaigridError("this node is moving as many objects as it may (STORAGE_MAX_TRANSFERS); retry shortly",
                         "STORAGE_BUSY", 503, retry_after_s=2)


def storage_client_stalled(stall_s: float) -> ScaigridError:
    return ScaigridError(f"the upload sent nothing for {stall_s:g} s (STORAGE_CLIENT_STALL_S); nothing was stored",
                         "STORAGE_CLIENT_STALLED", 408)


def storage_backend_error(message: str) -> ScaigridError:
    return ScaigridError(message, "STORAGE_BACKEND_ERROR", 502)


def storage_not_configured(message: str) -> ScaigridError:
    return ScaigridError(message, "STORAGE_NOT_CONFIGURED", 503)


# --- hybrid enrolment ---

def hybrid_not_managed() -> ScaigridError:
    # 404: on a server that is not the managed side, these routes do not exist in any useful sense.
    return ScaigridError("this ScaiGrid is not a hybrid managed side (HYBRID_ROLE=managed); it enrols no nodes",
                         "HYBRID_NOT_MANAGED", 404)


def enrollment_token_invalid() -> ScaigridError:
    return ScaigridError("the enrolment token is not valid; ask the managed side's admin for a new one",
                         "ENROLLMENT_TOKEN_INVALID", 401)


def enrollment_token_expired() -> ScaigridError:
    return ScaigridError("the enrolment token has expired; ask the managed side's admin for a new one",
                         "ENROLLMENT_TOKEN_EXPIRED", 401)


def enrollment_token_used() -> ScaigridError:
    return ScaigridError("the enrolment token was already used (each enrols one node); mint a new one",
                         "ENROLLMENT_TOKEN_USED", 409)


def node_credential_invalid() -> ScaigridError:
    return ScaigridError("the node credential is not valid (wrong, replaced by a rotation, or the node was revoked)",
                         "NODE_CREDENTIAL_INVALID", 401)


def hybrid_version_skew(problem: str) -> ScaigridError:
    # 409: the two versions conflict; upgrading one side (the message says which) resolves it.
    return ScaigridError(problem, "HYBRID_VERSION_SKEW", 409)


def link_lost(message: str) -> ScaigridError:
    # 503: the node may link again (to this replica or another) within seconds; the caller looks it up again.
    return ScaigridError(message, "LINK_LOST", 503)
