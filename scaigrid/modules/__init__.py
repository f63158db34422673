"""Module registry: a module is one object naming its routes, jobs, permissions and migration stream, and how
`GET /v1/modules` describes it."""

import importlib
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from scaigrid.settings import ConfigError
from scaigrid.worker.jobs import Job


@dataclass(frozen=True)
class Permission:
    key: str  # <module>:<what>:<verb>, e.g. scaibunker:images:manage
    display_name: str = ""
    description: str = ""


@dataclass(frozen=True)
class Module:
    id: str
    migrations: str | None = None  # the package of its Alembic revisions (version table alembic_version_mod_<id>)
    routes: Sequence[web.RouteDef] = ()  # mounted under /v1/modules/<id>/
    jobs: Sequence[Job] = ()
    permissions: Sequence[Permission] = ()
    display_name: str = ""  # what GET /v1/modules shows; the id when empty
    version: str = "0.0.0"
    description: str = ""
    dependencies: Sequence[str] = ()  # ids of modules it needs enabled too

    @property
    def permission_keys(self) -> tuple[str, ...]:
        return tuple(p.key for p in self.permissions)

    @property
    def version_table(self) -> str:
        return f"alembic_version_mod_{self.id}"

    @property
    def route_prefix(self) -> str:
        return f"/v1/modules/{self.id}"


def _builtin() -> dict[str, Module]:
    from scaigrid.modules import scaibunker

    return {m.id: m for m in (scaibunker.MODULE,)}


def load_modules(refs: Sequence[str]) -> tuple[Module, ...]:
    """Resolves SCAIGRID_MODULES entries: a built-in id, or `package.module:attribute` for an external module."""
    builtin = _builtin()
    modules = []
    for ref in refs:
        if ":" not in ref:
            if ref not in builtin:
                raise ConfigError(f"SCAIGRID_MODULES: unknown module {ref!r} (built-in: {', '.join(sorted(builtin))})")
            modules.append(builtin[ref])
            continue
        path, _, attr = ref.partition(":")
        try:
            module = getattr(importlib.import_module(path), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"SCAIGRID_MODULES: cannot load {ref!r} ({exc})") from None
        if not isinstance(module, Module):
            raise ConfigError(f"SCAIGRID_MODULES: {ref!r} is not a scaigrid Module")
        modules.append(module)
    ids = [m.id for m in modules]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"SCAIGRID_MODULES: a module is listed twice ({', '.join(ids)})")
    for module in modules:
        if missing := [d for d in module.dependencies if d not in ids]:
            raise ConfigError(f"SCAIGRID_MODULES: {module.id} needs {', '.join(missing)} enabled too")
    return tuple(modules)


def known_modules(enabled: Sequence[Module]) -> tuple[Module, ...]:
    """The enabled modules, then the built-in ones SCAIGRID_MODULES leaves out (GET /v1/modules: `available`)."""
    ids = {m.id for m in enabled}
    return (*enabled, *(m for m in _builtin().values() if m.id not in ids))
