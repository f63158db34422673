"""The six built-in roles and the permissions each carries (SCAIGRID_API.md, "Identity and tenancy")."""

PERMISSIONS = (
    "models:list", "models:use", "models:manage", "routing:view", "routing:manage",
    "accounting:view_own", "accounting:view_tenant", "accounting:view_partner", "accounting:manage_budgets",
    "users:manage", "api_keys:manage", "webhooks:manage", "modules:use", "modules:manage", "admin:access",
)

_TENANT_VIEWER = frozenset({"models:list", "accounting:view_own"})
_TENANT_USER = _TENANT_VIEWER | {"models:use", "api_keys:manage", "modules:use"}
_TENANT_ADMIN = _TENANT_USER | {
    "routing:view", "accounting:view_tenant", "accounting:manage_budgets", "users:manage", "webhooks:manage",
    "modules:manage", "admin:access"}
_PARTNER_VIEWER = _TENANT_VIEWER | {"routing:view", "accounting:view_tenant", "accounting:view_partner"}
# The catalogue (models, backends, routing) is managed by the partner that offers it, or by the platform.
_PARTNER_ADMIN = _TENANT_ADMIN | _PARTNER_VIEWER | {"models:manage", "routing:manage"}

ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "super_admin": frozenset(PERMISSIONS),
    "partner_admin": _PARTNER_ADMIN,
    "partner_viewer": _PARTNER_VIEWER,
    "tenant_admin": _TENANT_ADMIN,
    "tenant_user": _TENANT_USER,
    "tenant_viewer": _TENANT_VIEWER,
}
ROLES = tuple(ROLE_PERMISSIONS)
# Not a permission but what a route needs when any authenticated caller may call it (GET /v1/me): every role holds
# it, so it never appears in a permission list.
AUTHENTICATED = "authenticated"
# A module's own permissions (Module.permissions, e.g. scaibunker:images:manage) are held by every role holding
# this one: whoever may manage modules may manage what they do. mount_module refuses a route needing any other.
MODULE_PERMISSIONS_HOLDER = "modules:manage"

# How far a role reaches: every tenant, the tenants of its partner, or its own tenant.
REACHES = ("tenant", "partner", "platform")  # least to most
ROLE_REACH = {
    "super_admin": "platform",
    "partner_admin": "partner", "partner_viewer": "partner",
    "tenant_admin": "tenant", "tenant_user": "tenant", "tenant_viewer": "tenant",
}
TENANT_ROLES = tuple(role for role in ROLES if ROLE_REACH[role] == "tenant")


def grants_at_most(role: str, ceiling: str) -> bool:
    """True when `role` gives nothing that `ceiling` lacks, in permissions and in reach."""
    return (ROLE_PERMISSIONS[role] <= ROLE_PERMISSIONS[ceiling]
            and REACHES.index(ROLE_REACH[role]) <= REACHES.index(ROLE_REACH[ceiling]))


def role_can(role: str, permission: str) -> bool:
    """A core permission if the role lists it; a module's permission if the role holds modules:manage."""
    if permission == AUTHENTICATED:
        return True
    held = ROLE_PERMISSIONS[role]
    return permission in held if permission in PERMISSIONS else MODULE_PERMISSIONS_HOLDER in held
