"""Alembic migrations: one environment, one stream for the core and one per module."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent
CORE_VERSIONS = ROOT / "core" / "versions"
MODULE_VERSIONS = ROOT / "modules"
