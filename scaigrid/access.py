"""Every route declares who may call it; the gateway middleware enforces it (undeclared routes fail closed)."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from scaigrid.auth.roles import REACHES
from scaigrid.auth.service_tokens import SCOPES

F = TypeVar("F", bound=Callable[..., Any])
_ATTR = "__scaigrid_access__"


@dataclass(frozen=True)
class Access:
    permission: str | None  # None: public, no authentication
    metered: bool = False  # inference: budgets are checked before it runs
    reach: str = "tenant"  # the least reach a caller needs (tenant, partner or platform), besides the permission
    scopes: tuple[str, ...] = ()  # service-token scopes accepted; () = no service token
    query: tuple[str, ...] = ()  # the query parameters the handler reads; any other is refused, never ignored


def requires(permission: str, *, metered: bool = False, reach: str = "tenant", scopes: tuple[str, ...] = (),
             query: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Marks a handler as needing an authenticated caller holding `permission` (roles.AUTHENTICATED: every role),
    reaching at least `reach`; a service token is accepted only with one of `scopes`; a query parameter not in
    `query` is a 422, since a filter silently ignored answers with unfiltered data."""
    if reach not in REACHES:
        raise ValueError(f"reach is one of {', '.join(REACHES)}")
    if not set(scopes) <= set(SCOPES):
        raise ValueError(f"scopes are among {', '.join(SCOPES)}")
    if metered and scopes:
        # Every caller that can run inference is limited and accounted to a tenant: a service has none.
        raise ValueError("a metered route accepts no service token")

    def mark(handler: F) -> F:
        setattr(handler, _ATTR, Access(permission, metered, reach, scopes, query))
        return handler

    return mark


def public(handler: F) -> F:
    """Marks a handler as open to anyone (health, metrics, signed webhooks that authenticate themselves)."""
    setattr(handler, _ATTR, Access(None))
    return handler


def access_of(handler: Callable[..., Any]) -> Access | None:
    return getattr(handler, _ATTR, None)


def route_access(request: web.Request) -> Access | None:
    return access_of(request.match_info.handler)
