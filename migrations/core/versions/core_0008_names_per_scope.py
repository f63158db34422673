"""Names unique per owner: a model's slug and a backend's id are unique within a tenant (or the platform), not
across the node, so one tenant's names neither block nor reveal another's.

Models keep their ids and get a unique key on (owner_scope, slug), owner_scope being COALESCE(tenant_id, ''):
MariaDB never finds two NULLs equal in a unique key, so tenant_id itself would let the platform hold a slug twice.
A backend's primary key becomes its name qualified by its owner (scaigrid.routing.catalogue.backend_key):
"<name>" for a platform backend, as before, and "<name>@<tenant id>" for a tenant's, so routes, breakers, metrics
and usage records keep naming one backend each. Tenant backends are re-keyed here; usage recorded before keeps the
bare name.

Revision ID: core_0008
Revises: core_0007
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "core_0008"
down_revision = "core_0007"
branch_labels = None
depends_on = None

KEY_LENGTH = 128  # a name (64) + "@" + a tenant id (40), with room
NAME_LENGTH = 64


def _routes_foreign_key() -> str:
    """The name MariaDB gave model_routes' foreign key to backends (core_0002 left it unnamed)."""
    for key in sa.inspect(op.get_bind()).get_foreign_keys("model_routes"):
        if key["referred_table"] == "backends":
            return str(key["name"])
    raise RuntimeError("model_routes has no foreign key to backends")


def _slug_index() -> str:
    """The name of core_0002's unique index on models.slug alone."""
    inspector = sa.inspect(op.get_bind())
    for index in inspector.get_indexes("models"):
        if index["unique"] and index["column_names"] == ["slug"]:
            return str(index["name"])
    for constraint in inspector.get_unique_constraints("models"):
        if constraint["column_names"] == ["slug"]:
            return str(constraint["name"])
    raise RuntimeError("models has no unique index on slug")


def _key_columns(length: int) -> None:
    op.alter_column("backends", "id", type_=sa.String(length), existing_nullable=False)
    op.alter_column("model_routes", "backend_id", type_=sa.String(length), existing_nullable=False)
    op.alter_column("usage_records", "backend_id", type_=sa.String(length), existing_nullable=True)


def upgrade() -> None:
    # MariaDB-specific: a STORED generated column in a unique key.
    op.add_column("models", sa.Column("owner_scope", sa.String(40), sa.Computed("COALESCE(tenant_id, '')",
                                                                                persisted=True)))
    op.create_unique_constraint("uq_models_owner_slug", "models", ["owner_scope", "slug"])
    op.drop_index(_slug_index(), table_name="models")

    op.drop_constraint(_routes_foreign_key(), "model_routes", type_="foreignkey")
    _key_columns(KEY_LENGTH)
    # Every reference first (routes, and the link's record of the backends it mirrored), then the keys themselves.
    op.execute("UPDATE model_routes r JOIN backends b ON b.id = r.backend_id "
               "SET r.backend_id = CONCAT(b.id, '@', b.tenant_id) WHERE b.tenant_id IS NOT NULL")
    op.execute("UPDATE hybrid_mirrored m JOIN backends b ON b.id = m.row_id AND m.kind = 'backend' "
               "SET m.row_id = CONCAT(b.id, '@', b.tenant_id) WHERE b.tenant_id IS NOT NULL")
    op.execute("UPDATE backends SET id = CONCAT(id, '@', tenant_id) WHERE tenant_id IS NOT NULL")
    op.create_foreign_key(None, "model_routes", "backends", ["backend_id"], ["id"])


def _refuse_clashes(what: str, query: str) -> None:
    clash = op.get_bind().execute(sa.text(query)).first()
    if clash is not None:
        raise RuntimeError(f"cannot downgrade: {what} {clash[0]!r} exists for more than one owner, and before "
                           "core_0008 it had to be unique on the node; rename or delete all but one first")


def downgrade() -> None:
    _refuse_clashes("model slug", "SELECT slug FROM models GROUP BY slug HAVING COUNT(*) > 1")
    _refuse_clashes("backend id", "SELECT SUBSTRING_INDEX(id, '@', 1) AS name FROM backends GROUP BY name "
                                  "HAVING COUNT(*) > 1")
    op.drop_constraint(_routes_foreign_key(), "model_routes", type_="foreignkey")
    for table, column in (("model_routes", "backend_id"), ("backends", "id"), ("usage_records", "backend_id")):
        op.execute(f"UPDATE {table} SET {column} = SUBSTRING_INDEX({column}, '@', 1)")  # noqa: S608  # fixed names
    op.execute("UPDATE hybrid_mirrored SET row_id = SUBSTRING_INDEX(row_id, '@', 1) WHERE kind = 'backend'")
    _key_columns(NAME_LENGTH)
    op.create_foreign_key(None, "model_routes", "backends", ["backend_id"], ["id"])

    op.create_index("slug", "models", ["slug"], unique=True)
    op.drop_constraint("uq_models_owner_slug", "models", type_="unique")
    op.drop_column("models", "owner_scope")
