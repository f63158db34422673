"""The authenticated caller, as every handler sees it."""

from dataclasses import dataclass

from scaigrid import errors
from scaigrid.auth.roles import ROLE_REACH, role_can
from scaigrid.auth.service_tokens import OPERATOR


@dataclass(frozen=True)
class RateLimits:
    """Requests per minute allowed at each level, defaults already applied."""

    key: int
    user: int
    tenant: int
    partner: int


@dataclass(frozen=True)
class Principal:
    kind: str  # api_key | jwt | service | tunnel (a hybrid caller assertion) | dev
    role: str
    partner_id: str
    tenant_id: str
    user_id: str | None
    limits: RateLimits
    api_key_id: str | None = None
    name: str = ""  # for logs: key prefix, JWT subject or service name
    scope: str | None = None  # a service token's scope (service_tokens.SCOPES); None for people

    @property
    def administers(self) -> bool:
        """People act by their role; of the services only the operator scope does (the others each serve one gRPC
        method or header, and the gateway refuses them on every route before this is asked)."""
        return self.scope in (None, OPERATOR)

    def can(self, permission: str) -> bool:
        return self.administers and role_can(self.role, permission)

    def require(self, permission: str) -> None:
        if not self.can(permission):
            raise errors.permission_denied(permission)

    @property
    def reach(self) -> str:
        """platform, partner or tenant: which tenants this caller may act on at all."""
        return ROLE_REACH[self.role] if self.administers else "tenant"  # a service's tenant "" is no tenant

    def reaches(self, tenant_id: str | None, partner_id: str | None) -> bool:
        """May this caller act on an object of that tenant (partner)? tenant_id None = a platform-wide object."""
        if self.reach == "platform":
            return True
        if tenant_id is None:
            return False
        if self.reach == "partner":
            return partner_id == self.partner_id
        return tenant_id == self.tenant_id

