"""ScaiBunker's Alembic revisions (version table alembic_version_mod_scaibunker); Alembic skips this file."""
