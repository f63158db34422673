"""`scaigrid admin set-limits`: per key, user, tenant or partner requests per minute."""

import asyncio

import click
from sqlalchemy import ColumnElement

from scaigrid.accounting import limits
from scaigrid.auth import keys
from scaigrid.auth.authenticator import TOPIC_IDENTITY
from scaigrid.commands import AdminError, announce, settings_of
from scaigrid.db.tables import api_keys, partners, tenants, users
from scaigrid.resources import database_ctx


def _rpm(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
    """--rpm, checked by click so that the message names the option."""
    if value == "default":
        return None
    if not value.isdigit() or not 1 <= int(value) <= limits.RPM_MAX:
        raise click.BadParameter(f"a whole number 1-{limits.RPM_MAX}, or `default`")
    return int(value)


def _target(key_ref: str | None, user_id: str | None, tenant_slug: str | None, partner_slug: str | None
            ) -> tuple[str, ColumnElement[bool], str]:
    """(level, condition, how to name it in messages) for the one option given."""
    given = [name for name, value in (("--key", key_ref), ("--user", user_id), ("--tenant", tenant_slug),
                                      ("--partner", partner_slug)) if value]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --key, --user, --tenant, --partner")
    if key_ref:
        if keys.looks_like_key(key_ref):  # the key itself: found by its hash, and never echoed
            return "key", api_keys.c.key_hash == keys.hash_key(key_ref), f"key {key_ref[:12]}…"
        return "key", api_keys.c.id == key_ref, f"key {key_ref}"
    if user_id:
        return "user", users.c.id == user_id, f"user {user_id}"
    if tenant_slug:
        return "tenant", tenants.c.slug == tenant_slug, f"tenant {tenant_slug}"
    assert partner_slug is not None  # exactly one was given
    return "partner", partners.c.slug == partner_slug, f"partner {partner_slug}"


@click.command("set-limits")
@click.option("--key", "key_ref", metavar="KEY_OR_ID", help="an API key (sgk_...) or its id (key_...)")
@click.option("--user", "user_id", metavar="ID", help="a user id")
@click.option("--tenant", "tenant_slug", metavar="SLUG", help="a tenant slug")
@click.option("--partner", "partner_slug", metavar="SLUG", help="a partner slug")
@click.option("--rpm", required=True, metavar="N|default", callback=_rpm,
              help="requests per minute, or `default` for the RATE_LIMIT_<LEVEL>_RPM setting")
@click.pass_context
def set_limits(ctx: click.Context, key_ref: str | None, user_id: str | None, tenant_slug: str | None,
               partner_slug: str | None, rpm: int | None) -> None:
    """Set the rate limit of one API key, user, tenant or partner (the most restrictive level wins)."""
    level, where, name = _target(key_ref, user_id, tenant_slug, partner_slug)
    settings = settings_of(ctx, "database")

    async def work() -> None:
        async with database_ctx(settings) as engine, engine.begin() as conn:
            holder = await limits.find_holder(conn, level, where)
            if holder is None:
                raise AdminError(f"no {name}")
            await limits.set_rpm(conn, holder, rpm)

    asyncio.run(work())
    announced = announce(settings, TOPIC_IDENTITY)
    effective = rpm or limits.default_rpm(settings, level)
    click.echo(f"{name}: {effective} requests per minute" + (" (the default)" if rpm is None else ""))
    if not announced:
        click.echo("Redis not reachable: running http processes apply the change within "
                   f"API_KEY_CACHE_TTL_S ({settings.auth.api_key_cache_ttl_s:g} s)", err=True)


COMMANDS = [set_limits]
