"""`scaigrid admin hybrid-token` mints an enrolment token on the managed side, for `scaigrid-appliance link enroll`;
`scaigrid admin hybrid-forget` takes back what the link mirrored onto a node that left, for `link unenroll`."""

import asyncio

import click
from sqlalchemy.ext.asyncio import AsyncEngine

from scaigrid.commands import AdminError, settings_of, with_database
from scaigrid.hybrid import enrollment, mirror
from scaigrid.resources import database_ctx, redis_ctx


@click.command("hybrid-token")
@click.option("--name", help="what the token is for, e.g. the site it enrols (shown in listings)")
@click.option("--ttl-s", type=click.IntRange(min=1), help="validity in seconds (default and maximum: "
              "HYBRID_ENROLLMENT_TOKEN_TTL_S)")
@click.pass_context
def hybrid_token(ctx: click.Context, name: str | None, ttl_s: int | None) -> None:
    """Mint a single-use enrolment token and print it (only the token, on stdout; it is not shown again).

    Example: scaigrid admin hybrid-token --name site-berlin --ttl-s 900
    """
    settings = settings_of(ctx, "database")
    if settings.hybrid.role != "managed":
        raise AdminError("HYBRID_ROLE is not `managed`: this server enrols no nodes")
    max_ttl_s = settings.hybrid.enrollment_token_ttl_s
    if ttl_s is not None and ttl_s > max_ttl_s:
        raise AdminError(f"--ttl-s: at most {max_ttl_s} (HYBRID_ENROLLMENT_TOKEN_TTL_S)")

    async def work(engine: AsyncEngine) -> str:
        async with engine.begin() as conn:
            minted = await enrollment.mint_token(conn, name, max_ttl_s if ttl_s is None else ttl_s)
        return str(minted["token"])

    click.echo(with_database(settings, work))


@click.command("hybrid-forget")
@click.pass_context
def hybrid_forget(ctx: click.Context) -> None:
    """Take back what the hybrid link mirrored here: managed keys revoked, managed users, tenants and partners
    disabled, managed models removed (their `managed-` backends disabled), the applied config snapshot dropped.

    For a node that left its managed side (`scaigrid-appliance link unenroll` runs it); on a node still linked, the
    next snapshot brings it all back. Usage waiting in the outbox is kept. Safe to run again.

    Example: scaigrid admin hybrid-forget
    """
    settings = settings_of(ctx, "database", "redis")
    if settings.hybrid.role == "managed":
        raise AdminError("HYBRID_ROLE is `managed`: a managed side mirrors nothing")

    async def work() -> mirror.Forgotten:
        async with database_ctx(settings) as engine, redis_ctx(settings) as redis:
            return await mirror.forget(engine, redis)

    done = asyncio.run(work())
    applied = (f"config snapshot {done.version} of node {done.node_id}" if done.node_id is not None
               else "no config snapshot was applied")
    off = done.switched_off
    click.echo(f"forgot the managed mirror ({applied}): revoked {off['api_key']} key(s); disabled {off['user']} "
               f"user(s), {off['tenant']} tenant(s), {off['partner']} partner(s); deleted {done.models_deleted} "
               f"managed model(s); disabled {done.backends_disabled} managed backend(s)")
    if done.outbox_left:
        click.echo(f"{done.outbox_left} usage record(s) stay in the outbox: sent if this appliance enrols again "
                   "(stored there for the tenants allowed on the new node)")


COMMANDS = [hybrid_token, hybrid_forget]
