"""Partners, tenants and users in the database: the membership authentication needs, slugs, creation."""

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, Table, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from scaigrid import errors
from scaigrid.auth.principal import Principal
from scaigrid.auth.roles import REACHES, grants_at_most
from scaigrid.db.tables import new_id, partners, tenants, users
from scaigrid.errors import FieldError

SLUG_PATTERN = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?")  # fullmatch: re.match with $ takes "x\n"
SLUG_MAX = 64


@dataclass(frozen=True)
class Membership:
    """A user with the status and limits of their tenant and partner: what authentication needs, in one query."""

    user_id: str
    role: str
    user_status: str
    user_rpm: int | None
    tenant_id: str
    tenant_status: str
    tenant_rpm: int | None
    partner_id: str
    partner_status: str
    partner_rpm: int | None

    def refusal(self) -> str | None:
        """Why no credential of this user works right now, or None."""
        for what, status in (("user", self.user_status), ("tenant", self.tenant_status),
                             ("partner", self.partner_status)):
            if status != "active":
                return f"the {what} is {status}"
        return None


MEMBERSHIP_COLUMNS = (
    users.c.id.label("user_id"), users.c.role.label("user_role"), users.c.status.label("user_status"),
    users.c.rpm_limit.label("user_rpm"),
    tenants.c.id.label("tenant_id"), tenants.c.status.label("tenant_status"), tenants.c.rpm_limit.label("tenant_rpm"),
    partners.c.id.label("partner_id"), partners.c.status.label("partner_status"),
    partners.c.rpm_limit.label("partner_rpm"),
)
MEMBERSHIP_JOIN = users.join(tenants, tenants.c.id == users.c.tenant_id).join(
    partners, partners.c.id == tenants.c.partner_id)


def membership_of(row: Any) -> Membership:
    return Membership(
        user_id=row.user_id, role=row.user_role, user_status=row.user_status, user_rpm=row.user_rpm,
        tenant_id=row.tenant_id, tenant_status=row.tenant_status, tenant_rpm=row.tenant_rpm,
        partner_id=row.partner_id, partner_status=row.partner_status, partner_rpm=row.partner_rpm)


async def load_membership(conn: AsyncConnection, where: ColumnElement[bool]) -> Membership | None:
    row = (await conn.execute(select(*MEMBERSHIP_COLUMNS).select_from(MEMBERSHIP_JOIN).where(where))).first()
    return None if row is None else membership_of(row)


def slugify(text: str) -> str:
    """A slug derived from a name: lower case, runs of anything else become one dash."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:SLUG_MAX].strip("-")
    return slug or "x"


async def free_slug(conn: AsyncConnection, table: Table, wanted: str) -> str:
    """`wanted`, or `wanted-2`, `wanted-3`...: for records ScaiKey creates, where nobody could resolve a clash."""
    base = slugify(wanted)
    slug, n = base, 1
    while await conn.scalar(select(table.c.id).where(table.c.slug == slug)) is not None:
        n += 1
        suffix = f"-{n}"
        slug = base[:SLUG_MAX - len(suffix)] + suffix
    return slug


async def insert_unique(conn: AsyncConnection, table: Table, values: dict[str, Any]) -> None:
    """Inserts a partner, tenant or user; a clash on a unique column becomes SLUG_CONFLICT naming it."""
    try:
        await conn.execute(insert(table).values(**values))
    except IntegrityError as exc:
        text = str(exc.orig)
        if "Duplicate entry" not in text:
            raise  # a missing parent, say: a bug of the caller, not a clash
        raise _conflict(table, values, text) from None


def _conflict(table: Table, values: dict[str, Any], text: str) -> errors.ScaigridError:
    if "scaikey_id" in text:
        return errors.slug_conflict(f"scaikey_id {values.get('scaikey_id')!r} is already linked to another record")
    if table is users:
        return errors.slug_conflict(f"a user with the email {values.get('email')!r} exists in this tenant")
    return errors.slug_conflict(f"the slug {values.get('slug')!r} is taken")


async def create_partner(conn: AsyncConnection, *, slug: str, name: str, scaikey_id: str | None = None) -> str:
    partner_id = new_id("prt")
    await insert_unique(conn, partners, {"id": partner_id, "slug": slug, "name": name, "scaikey_id": scaikey_id})
    return partner_id


async def create_tenant(conn: AsyncConnection, *, partner_id: str, slug: str, name: str,
                        scaikey_id: str | None = None) -> str:
    tenant_id = new_id("ten")
    await insert_unique(conn, tenants, {"id": tenant_id, "partner_id": partner_id, "slug": slug, "name": name,
                                        "scaikey_id": scaikey_id})
    return tenant_id


async def create_user(conn: AsyncConnection, *, tenant_id: str, email: str, role: str,
                      display_name: str | None = None, scaikey_id: str | None = None) -> str:
    user_id = new_id("usr")
    await insert_unique(conn, users, {"id": user_id, "tenant_id": tenant_id, "email": email, "role": role,
                                      "display_name": display_name, "scaikey_id": scaikey_id})
    return user_id


async def target_tenant(conn: AsyncConnection, principal: Principal, tenant_id: str | None) -> tuple[str, str]:
    """The tenant a caller creates something for, as (tenant id, its partner id): `tenant_id`, or by default the
    caller's own. 422 when a caller without a tenant (a service) names none; 404 when it is out of reach."""
    if tenant_id is None:
        if not principal.tenant_id:
            raise errors.validation_error(
                [FieldError("tenant_id", "required: a service caller has no tenant of its own")])
        tenant_id = principal.tenant_id
    partner_id = await conn.scalar(select(tenants.c.partner_id).where(tenants.c.id == tenant_id))
    if partner_id is None or not principal.reaches(tenant_id, partner_id):
        raise errors.not_found(f"no tenant {tenant_id!r}")  # one out of reach is not revealed
    return tenant_id, partner_id


def require_rank(actor: Principal, target_role: str, what: str = "this user's role") -> None:
    """Acting on a person (changing, keying, budgeting, limiting or suspending them, or giving them a role) needs
    reach, checked by the caller, and rank: the target's role grants nothing the actor's lacks. 403 otherwise.
    Equal rank is allowed: a tenant admin manages other tenant admins of its tenant."""
    if not grants_at_most(target_role, actor.role):
        raise errors.not_permitted(f"{what} ({target_role}) outranks yours ({actor.role})")


def require_above(actor: Principal, level: str) -> None:
    """A tenant's or partner's own record (status, name, rate limit) is changed only from above: a tenant with
    partner or platform reach, a partner with platform reach; its own admins may not lift what was set on them."""
    if REACHES.index(actor.reach) <= REACHES.index(level):
        needed = REACHES[REACHES.index(level) + 1]
        raise errors.not_permitted(f"a {level} is changed only from above: this needs {needed} reach or more")


def visible_to(principal: Principal, query: Select[Any], tenant_column: ColumnElement[str],
               partner_column: ColumnElement[str]) -> Select[Any]:
    """Restricts a listing to what the caller may see: the same rule as `Principal.reaches`."""
    if principal.reach == "platform":
        return query
    if principal.reach == "partner":
        return query.where(partner_column == principal.partner_id)
    return query.where(tenant_column == principal.tenant_id)
