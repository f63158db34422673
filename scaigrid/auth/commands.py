"""`scaigrid admin create-key`, `service-token` and `generate-key`: how an operator bootstraps a node."""

import click
from cryptography.fernet import Fernet
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from scaigrid.auth import service_tokens
from scaigrid.auth.keys import create_api_key
from scaigrid.auth.roles import ROLES
from scaigrid.auth.tenancy import create_user
from scaigrid.commands import AdminError, settings_of, with_database
from scaigrid.db.defaults import DEFAULT_SLUG
from scaigrid.db.tables import tenants, users


@click.command("create-key")
@click.option("--role", type=click.Choice(ROLES), required=True, help="what the key may do")
@click.option("--tenant", "tenant_slug", default=DEFAULT_SLUG, show_default=True, help="tenant slug")
@click.option("--name", default="created by scaigrid admin create-key", help="label shown in key listings")
@click.pass_context
def create_key(ctx: click.Context, role: str, tenant_slug: str, name: str) -> None:
    """Create an API key and print it (only the key, on stdout; it is not shown again)."""
    settings = settings_of(ctx, "database")

    async def work(engine: AsyncEngine) -> str:
        async with engine.begin() as conn:
            tenant_id = await conn.scalar(select(tenants.c.id).where(tenants.c.slug == tenant_slug))
            if tenant_id is None:
                raise AdminError(f"no tenant with slug {tenant_slug!r} (has `scaigrid migrate` run?)")
            # Keys made here belong to one operator user per role and tenant, created on first use.
            email = f"{role}@{tenant_slug}.local"
            user_id = await conn.scalar(
                select(users.c.id).where(users.c.tenant_id == tenant_id, users.c.email == email))
            if user_id is None:
                user_id = await create_user(conn, tenant_id=tenant_id, email=email, role=role,
                                            display_name=f"operator ({role})")
            _, key = await create_api_key(conn, tenant_id=tenant_id, user_id=user_id, name=name, role=role)
            return key

    click.echo(with_database(settings, work))


@click.command("service-token")
@click.option("--name", required=True, help="the internal caller, e.g. scaiinfer-node-eu-01 (shown in logs)")
@click.option("--scope", type=click.Choice(service_tokens.SCOPES), required=True,
              help="what it may call: operator (platform administration over HTTP, never inference), scaiinfer-node "
                   "(heartbeats only), hybrid-relay, hybrid-link (internal to the hybrid link)")
@click.option("--ttl-s", type=click.IntRange(min=1), default=86400, show_default=True, help="lifetime in seconds")
@click.pass_context
def service_token(ctx: click.Context, name: str, scope: str, ttl_s: int) -> None:
    """Print a service token for an internal caller (ScaiInfer node, operator's tooling), signed with
    SERVICE_TOKEN_SECRET."""
    secret = settings_of(ctx).auth.service_token_secret
    if secret is None:
        raise AdminError("SERVICE_TOKEN_SECRET is not set: this node accepts no service tokens")
    try:
        click.echo(service_tokens.mint(secret, name, ttl_s, scope=scope))
    except ValueError as exc:
        raise AdminError(f"--name: {exc}") from None


@click.command("generate-key")
def generate_key() -> None:
    """Print a new random SCAIGRID_ENCRYPTION_KEY."""
    click.echo(Fernet.generate_key().decode())


COMMANDS = [create_key, service_token, generate_key]
