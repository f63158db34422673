"""Every route declares who may call it; the gateway middleware enforces it (undeclared routes fail closed)."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

F = TypeVar("F", bound=Callable[..., Any])
_ATTR = "__scaigrid_access__"


@dataclass(frozen=True)
class Access:
    permission: str | None  # None: public, no authentication
    metered: bool = False  # inference: budgets are checked before it runs


def requires(permission: str, *, metered: bool = False) -> Callable[[F], F]:
    """Marks a handler as needing an authenticated caller holding `permission`."""
    def mark(handler: F) -> F:
        setattr(handler, _ATTR, Access(permission, metered))
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
