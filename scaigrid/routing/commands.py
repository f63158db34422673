"""`scaigrid admin apply FILE.toml`: the catalogue, declaratively (format: docs/api.md, "Catalogue")."""

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from sqlalchemy.ext.asyncio import AsyncEngine

from scaigrid.commands import AdminError, announce, settings_of, with_database
from scaigrid.errors import ScaigridError
from scaigrid.routing import schema, store
from scaigrid.routing.catalogue import TOPIC_CATALOGUE
from scaigrid.settings import Settings

Spec = TypeVar("Spec", schema.BackendSpec, schema.ModelSpec)


class _Refused(Exception):
    """Problems found while writing: raised inside the transaction so that nothing of it is kept."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} problem(s)")
        self.problems = problems


def _lines(item: str, error: ScaigridError) -> list[str]:
    if not error.details:
        return [f"{item}: {error.message}"]
    return [f"{item}: {d.field}: {d.message}" if d.field else f"{item}: {d.message}" for d in error.details]


def _parse_all(document: dict[str, Any], table: str, kind: str, key: str, parse: Callable[[Any], Spec],
               problems: list[str]) -> list[tuple[str, Spec]]:
    """Every item of one [[table]], each named "<kind> <id>" for the lines it earns."""
    items = document.get(table, [])
    if not isinstance(items, list):
        problems.append(f"{table}: write each item as a [[{table}]] table")
        return []
    parsed: list[tuple[str, Spec]] = []
    for index, item in enumerate(items):
        ident = item.get(key) if isinstance(item, dict) else None
        name = f"{kind} {ident}" if isinstance(ident, str) and ident else f"{table}[{index}]"
        try:
            spec = parse(item)
        except ScaigridError as exc:
            problems.extend(_lines(name, exc))
            continue
        # Ids are unique per owner: the same id for two tenants (or a tenant and the platform) is two items.
        if any(name == seen and spec.tenant == other.tenant for seen, other in parsed):
            problems.append(f"{name}: {key}: defined twice in the file")
            continue
        parsed.append((name, spec))
    return parsed


async def _write(engine: AsyncEngine, settings: Settings, backends: list[tuple[str, schema.BackendSpec]],
                 models: list[tuple[str, schema.ModelSpec]]) -> list[str]:
    """Upserts everything in one transaction (backends first, so routes find them); any problem rolls all back."""
    outcomes, problems = [], []
    async with engine.begin() as conn:
        for name, backend in backends:
            try:
                outcomes.append(f"{name}: {await store.upsert_backend(conn, settings, None, backend)}")
            except ScaigridError as exc:
                problems.extend(_lines(name, exc))
        for name, model in models:
            try:
                outcomes.append(f"{name}: {await store.upsert_model(conn, None, model)}")
            except ScaigridError as exc:
                problems.extend(_lines(name, exc))
        if problems:
            raise _Refused(problems)
    return outcomes


def _announce(settings: Settings) -> None:
    """Tells running http processes to reload the catalogue (they also reload whenever they (re)start)."""
    if settings.redis.url is None:
        click.echo("note: REDIS_URL is not set, so running http processes load the new catalogue on their next "
                   "start", err=True)
    elif not announce(settings, TOPIC_CATALOGUE):
        click.echo("warning: written, but running http processes were not told (Redis unreachable); they reload "
                   "when their Redis subscription is back or on their next start", err=True)


@click.command("apply")
@click.argument("path", metavar="FILE.toml", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_context
def apply(ctx: click.Context, path: Path) -> None:
    """Create or update the [[backends]] and [[models]] of FILE.toml: all or nothing, idempotent."""
    settings = settings_of(ctx, "database")
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise AdminError(f"{path}: not valid TOML: {exc}") from None
    problems = [f"{path}: unknown table {name!r} (expected [[backends]] and [[models]])"
                for name in document if name not in ("backends", "models")]
    backends = _parse_all(document, "backends", "backend", "id", schema.parse_backend, problems)
    models = _parse_all(document, "models", "model", "slug", schema.parse_model, problems)
    if any(spec.api_key is not None for _, spec in backends):
        settings.require("encryption")
    outcomes: list[str] = []
    if not problems:
        try:
            outcomes = with_database(settings, lambda engine: _write(engine, settings, backends, models))
        except _Refused as refused:
            problems = refused.problems
    if problems:
        for line in problems:
            click.echo(line, err=True)
        click.echo(f"{path}: {len(problems)} problem(s); nothing was written", err=True)
        ctx.exit(1)
    for line in outcomes:
        click.echo(line)
    if any(not line.endswith(": unchanged") for line in outcomes):
        _announce(settings)


COMMANDS = [apply]
