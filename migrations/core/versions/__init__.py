"""The core stream's Alembic revisions (version table alembic_version); Alembic skips this file."""
