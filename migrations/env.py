"""Alembic environment shared by every stream; the caller passes the connection and the stream's version table."""

from alembic import context

config = context.config
connection = config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise SystemExit("run migrations with `scaigrid migrate`; it holds the migrate lock and picks each stream")

context.configure(
    connection=connection,
    version_table=config.attributes["version_table"],
    # MariaDB commits DDL implicitly; a transaction per revision keeps each version stamp next to its DDL.
    transaction_per_migration=True,
)
with context.begin_transaction():
    context.run_migrations()
