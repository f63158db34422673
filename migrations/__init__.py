"""Alembic migrations: one environment, one stream for the core and one per module.

Each stream's revisions are a package of their own (migrations.core.versions, migrations.modules.<id>.versions), so
the wheel carries them as modules and a Module declares its stream by package name.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent
