"""The broken module's Alembic revisions; Alembic skips this file."""
