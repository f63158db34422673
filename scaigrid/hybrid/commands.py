"""`scaigrid admin hybrid-token`: mints an enrolment token on the managed side, for `scaigrid-appliance link enroll`."""

import click
from sqlalchemy.ext.asyncio import AsyncEngine

from scaigrid.commands import AdminError, settings_of, with_database
from scaigrid.hybrid import enrollment


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


COMMANDS = [hybrid_token]
