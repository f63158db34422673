"""The grpc mode's one server interceptor: who may call each method, and domain errors to gRPC status codes.

Every servicer method declares its callers next to its definition, as HTTP routes do: `@accepts(scope, ...)` (a
service token of one of those scopes) or `@node_credential` (the hybrid link: a node holds no service token, since
the secret that signs them stays on the managed side, so its servicer checks the node credential itself). A method
declaring neither is refused (PERMISSION_DENIED), so a new one is closed until someone says who may call it.
Health checks and reflection are exempt: load balancers and probes hold no token, and reflection only describes
the protocol, which is public in the repository.

Servicers just raise `ScaigridError`; the code it maps to follows its HTTP status, and the trailing metadata
`scaigrid-error-code` carries the documented error code. Every kind of RPC is wrapped: unary and streaming
requests alike, unary and streaming answers alike.
"""

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

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
# Codes whose HTTP status says less than a gRPC code can: a version skew is a conflict, but no retry fixes it
# until one side is upgraded, which is what FAILED_PRECONDITION tells a gRPC client.
CODE_STATUS_CODES = {"HYBRID_VERSION_SKEW": grpc.StatusCode.FAILED_PRECONDITION}


F = TypeVar("F", bound=Callable[..., Any])
_ATTR = "__scaigrid_rpc_access__"


@dataclass(frozen=True)
class RpcAccess:
    scopes: tuple[str, ...] = ()  # service-token scopes accepted
    node_credential: bool = False  # the servicer authenticates a hybrid node's credential itself


def accepts(*scopes: str) -> Callable[[F], F]:
    """Declares a servicer method callable with a service token of one of `scopes`."""
    if not scopes or not set(scopes) <= set(service_tokens.SCOPES):
        raise ValueError(f"scopes are among {', '.join(service_tokens.SCOPES)}")

    def mark(method: F) -> F:
        setattr(method, _ATTR, RpcAccess(scopes=scopes))
        return method

    return mark


def node_credential(method: F) -> F:
    """Declares a servicer method that authenticates a hybrid node's credential itself (no service token)."""
    setattr(method, _ATTR, RpcAccess(node_credential=True))
    return method


def rpc_access(behaviour: Callable[..., Any]) -> RpcAccess | None:
    """The declaration of a method handler's behaviour (the bound servicer method grpc calls)."""
    return getattr(behaviour, _ATTR, None)


def status_code(error: ScaigridError) -> Any:
    return CODE_STATUS_CODES.get(error.code) or STATUS_CODES.get(error.status, grpc.StatusCode.INTERNAL)


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

    def _admit(self, method: str, access: RpcAccess | None, context: Any) -> None:
        """Refuses the call unless its method's declaration lets this caller in; sets CALLER for service tokens."""
        if access is None:
            logger.error("RPC %s declares no access rule; refused", method, extra={"event": "undeclared_rpc"})
            raise errors.not_permitted("this method declares no access rule, so it is refused")
        if access.node_credential:
            return
        caller = self._authenticate(context)
        if caller.scope not in access.scopes:
            raise errors.insufficient_scope(f"a service token of scope {caller.scope} cannot call this method "
                                            f"(scopes accepted: {', '.join(access.scopes)})")
        CALLER.set(caller)

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
        method = handler_call_details.method
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        behaviour = handler.unary_unary or handler.stream_unary or handler.unary_stream or handler.stream_stream
        access = rpc_access(behaviour)

        def admit(context: Any) -> None:
            self._admit(method, access, context)

        codec = {"request_deserializer": handler.request_deserializer,
                 "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._answered(handler.unary_unary, admit), **codec)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._answered(handler.stream_unary, admit), **codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._streamed(handler.unary_stream, admit), **codec)
        return grpc.stream_stream_rpc_method_handler(self._streamed(handler.stream_stream, admit), **codec)

    def _answered(self, behaviour: Callable[[Any, Any], Awaitable[Any]],
                  admit: Callable[[Any], None]) -> Callable[[Any, Any], Awaitable[Any]]:
        """Wraps an RPC with one answer; `request` is the request, or an iterator of them."""
        async def answered(request: Any, context: Any) -> Any:
            try:
                admit(context)
                return await behaviour(request, context)
            except grpc.aio.AbortError:
                raise  # the behaviour ended the call itself
            except Exception as exc:
                await self._abort(context, exc)
        return answered

    def _streamed(self, behaviour: Callable[[Any, Any], AsyncGenerator[Any, None]],
                  admit: Callable[[Any], None]) -> Callable[[Any, Any], AsyncIterator[Any]]:
        """Wraps an RPC with a stream of answers (its behaviour an async generator)."""
        async def streamed(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                admit(context)
                # aclosing: when the call ends while an answer is being sent, the behaviour's cleanup runs now,
                # not whenever the collector finalises it.
                async with contextlib.aclosing(behaviour(request, context)) as answers:
                    async for answer in answers:
                        yield answer
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self._abort(context, exc)
        return streamed
