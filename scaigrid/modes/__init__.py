"""Runtime modes: each is one module here with `REQUIRES` (dependencies it needs configured) and `run(settings)`."""

import importlib
from types import ModuleType

from scaigrid.settings import MODES


def mode_module(name: str) -> ModuleType:
    if name not in MODES:
        raise ValueError(f"unknown mode {name!r}")
    return importlib.import_module(f"scaigrid.modes.{name}")
