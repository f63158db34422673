"""The grpc mode's one server interceptor: service-token authentication, and domain errors to gRPC status codes.

Servicers just raise `ScaigridError`; the code it maps to follows its HTTP status, and the trailing metadata
`scaigrid-error-code` carries the documented error code. Health checks and reflection are exempt from
authentication: load balancers and probes hold no token, and reflection only describes the protocol, which is
public in the repository. It wraps unary RPCs only (all the grpc mode serves): `require_unary` refuses, at
start-up, a service that has another kind.
"""

import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import grpc

from scaigrid import errors
from scaigrid.auth import service_tokens
from scaigrid.errors import ScaigridError
from scaigrid.settings import Secret

logger = logging.getLogger(__name__)

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                   "/grpc.reflection.v1.ServerReflection/")
ERROR_CODE_KEY = "scaigrid-error-code"
# The authenticated caller of the RPC being served, for servicers that authorise by it.
CALLER: ContextVar[service_tokens.ServiceIdentity] = ContextVar("grpc_caller")
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED, 501: grpc.StatusCode.UNIMPLEMENTED, 503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def require_unary(service: Any) -> None:
    """Raises unless every method of the service (a ServiceDescriptor) is unary: call it for each service served."""
    streaming = [method.name for method in service.methods if method.client_streaming or method.server_streaming]
    if streaming:
        raise RuntimeError(f"{service.full_name} has streaming methods ({', '.join(streaming)}), which "
                           "ServiceInterceptor does not wrap: authentication would not apply to them")


def status_code(error: ScaigridError) -> Any:
    return STATUS_CODES.get(error.status, grpc.StatusCode.INTERNAL)


def _details(error: ScaigridError) -> str:
    if not error.details:
        return error.message
    return f"{error.message} ({'; '.join(f'{d.field}: {d.message}' for d in error.details)})"


class ServiceInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no type hints
    def __init__(self, secret: Secret | None) -> None:
        self._secret = secret

    def _authenticate(self, context: Any) -> service_tokens.ServiceIdentity:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                scheme, _, token = str(value).partition(" ")
                if scheme.lower() != "bearer" or not token:
                    break
                return service_tokens.verify(self._secret, token.strip())
        raise errors.service_token_invalid("send the metadata `authorization: Bearer <service token>`")

    async def _abort(self, context: Any, exc: Exception) -> None:
        """Ends the call with the status of `exc`; anything but a domain error is logged and answered INTERNAL,
        so that no exception text (hosts, SQL) reaches the caller."""
        if isinstance(exc, ScaigridError):
            error = exc
        else:
            logger.error("RPC failed", exc_info=exc, extra={"event": "rpc_failed"})
            error = ScaigridError("internal error; the grpc mode's log has the details")
        context.set_trailing_metadata(((ERROR_CODE_KEY, error.code),))
        await context.abort(status_code(error), _details(error))

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(EXEMPT_PREFIXES):
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._unary(handler.unary_unary), request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def _unary(self, behaviour: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
        async def unary(request: Any, context: Any) -> Any:
            try:
                CALLER.set(self._authenticate(context))
                return await behaviour(request, context)
            except grpc.aio.AbortError:
                raise  # the behaviour ended the call itself
            except Exception as exc:
                await self._abort(context, exc)
        return unary
