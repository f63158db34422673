"""The `scaigrid` command: parses, loads settings, dispatches. Nothing else lives here."""

import asyncio
import dataclasses
import logging
import sys
from pathlib import Path

import click

from scaigrid import __version__
from scaigrid.logs import setup_logging
from scaigrid.modes import mode_module
from scaigrid.modules import load_modules
from scaigrid.settings import MODES, ConfigError, Settings, entries, load_settings

logger = logging.getLogger(__name__)


def _validated(ctx: click.Context, mode: str | None) -> Settings:
    """Settings for `mode` (default SCAIGRID_MODE), with what that mode requires; ConfigError names a lack."""
    settings = load_settings(env_file=ctx.obj["env_file"])
    if mode is not None:
        settings = dataclasses.replace(settings, mode=mode)
    if settings.mode is not None:
        settings.require(*mode_module(settings.mode).REQUIRES)
    # Checked whatever the mode: all processes of a node share one env file, and a typo there is a typo.
    load_modules(settings.modules)
    return settings


@click.group()
@click.option("--env-file", type=click.Path(dir_okay=False, path_type=Path),
              help="env file read under the environment (default /etc/scaigrid/scaigrid.env when present)")
@click.pass_context
def cli(ctx: click.Context, env_file: Path | None) -> None:
    """ScaiGrid node: run a mode, migrate, check configuration or liveness."""
    ctx.obj = {"env_file": env_file}


@cli.command()
@click.option("--mode", type=click.Choice(MODES), help="runtime mode (default: SCAIGRID_MODE)")
@click.pass_context
def run(ctx: click.Context, mode: str | None) -> None:
    """Run one runtime mode until SIGTERM."""
    settings = _validated(ctx, mode)
    if settings.mode is None:
        raise ConfigError(f"SCAIGRID_MODE: required (or --mode), one of {', '.join(MODES)}")
    setup_logging(settings.log_level, settings.mode)
    try:
        status = mode_module(settings.mode).run(settings)
    except Exception:
        # Logged as one JSON line like everything else, so the log pipeline sees why the process died.
        logger.exception("mode %s crashed", settings.mode, extra={"event": "crashed"})
        status = 1
    ctx.exit(status)


@cli.command()
@click.pass_context
def migrate(ctx: click.Context) -> None:
    """Migrate the core, then each enabled module (same as `run --mode migrate`)."""
    ctx.invoke(run, mode="migrate")


@cli.command("check-config")
@click.option("--mode", type=click.Choice(MODES), help="also check what this mode requires")
@click.pass_context
def check_config(ctx: click.Context, mode: str | None) -> None:
    """Print the effective settings, secrets masked; exit 2 if they are invalid."""
    settings = _validated(ctx, mode)
    width = max(len(e.env) for e in entries(settings))
    for entry in entries(settings):
        click.echo(f"{entry.env:<{width}}  {entry.display()}")


@cli.group()
def check() -> None:
    """Liveness checks for scripts and supervisors (exit 0 when healthy)."""


@check.command("worker")
@click.option("--this-host", is_flag=True,
              help="only a worker on this host counts (a container's or pod's probe: another worker's beat must not "
                   "vouch for this one)")
@click.pass_context
def check_worker(ctx: click.Context, this_host: bool) -> None:
    """Exit 0 only if at least one worker's heartbeat is fresh (with --this-host: one of this host's workers)."""
    import socket

    from scaigrid.resources import redis_ctx
    from scaigrid.worker.heartbeat import fresh_heartbeats

    settings = _validated(ctx, None)
    settings.require("redis")

    async def ages() -> dict[str, float]:
        async with redis_ctx(settings) as redis:
            return await fresh_heartbeats(redis)

    try:
        found = asyncio.run(ages())
    except Exception as exc:  # an unreachable Redis means we cannot vouch for any worker
        click.echo(f"worker: unknown, Redis unreachable ({type(exc).__name__})", err=True)
        ctx.exit(1)
    if this_host:  # a worker's id is host:pid (modes/worker.py)
        found = {worker_id: age_s for worker_id, age_s in found.items()
                 if worker_id.rsplit(":", 1)[0] == socket.gethostname()}
    if not found:
        where = f" on {socket.gethostname()}" if this_host else ""
        click.echo(f"worker: no heartbeat{where} in the last {settings.worker.heartbeat_ttl_s} s", err=True)
        ctx.exit(1)
    for worker_id, age_s in sorted(found.items()):
        click.echo(f"worker {worker_id}: heartbeat {age_s:.1f} s ago")


@cli.group()
def job() -> None:
    """The worker's scheduled jobs: list them, or run one now."""


@job.command("list")
@click.pass_context
def job_list(ctx: click.Context) -> None:
    """Every job of the core and the enabled modules, with its schedule."""
    from scaigrid.modes.worker import all_jobs

    jobs = all_jobs(_validated(ctx, None))
    width = max(len(item.name) for item in jobs)
    for item in jobs:
        schedule = f"every {item.every_s} s" if item.every_s is not None else f"cron {item.cron}"
        scope = "one worker per tick" if item.exclusive else "every worker"
        click.echo(f"{item.name:<{width}}  {schedule:<18} timeout {item.timeout_s:g} s, {scope}")


@job.command("run")
@click.argument("name")
@click.pass_context
def job_run(ctx: click.Context, name: str) -> None:
    """Run job NAME once now, under the same lock as the worker's scheduled runs.

    Example: scaigrid job run usage_retention
    """
    from scaigrid.modes.worker import all_jobs, run_once

    settings = _validated(ctx, None)
    settings.require("database", "redis")
    setup_logging(settings.log_level, "job")
    found = {item.name: item for item in all_jobs(settings)}
    if name not in found:
        raise click.ClickException(f"no job {name!r} (jobs: {', '.join(found)})")
    outcome = asyncio.run(run_once(settings, found[name]))
    click.echo(f"{name}: {outcome}")
    ctx.exit(0 if outcome == "ok" else 1)


@cli.group()
def admin() -> None:
    """Administer the node's data: API keys, catalogue, limits (talks to the database directly)."""


def _add_admin_commands() -> None:
    from scaigrid.accounting.commands import COMMANDS as ACCOUNTING
    from scaigrid.auth.commands import COMMANDS as AUTH
    from scaigrid.hybrid.commands import COMMANDS as HYBRID
    from scaigrid.routing.commands import COMMANDS as ROUTING

    for command in (*AUTH, *ROUTING, *ACCOUNTING, *HYBRID):
        admin.add_command(command)


_add_admin_commands()


@cli.command()
def version() -> None:
    """Print the version."""
    click.echo(__version__)


def main() -> None:
    try:
        # Not standalone, so a ConfigError reaches us here and becomes one line instead of a traceback.
        status = cli.main(standalone_mode=False, prog_name="scaigrid")
    except ConfigError as exc:
        click.echo(f"scaigrid: configuration error: {exc}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    sys.exit(status if isinstance(status, int) else 0)
