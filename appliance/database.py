"""MariaDB as root: the statements that give ScaiGrid its database and user, and the client that runs them."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

SQL_TIMEOUT_S = 30.0


class ServiceError(RuntimeError):
    """A local service failed to start, or a command against it failed (MariaDB here; the dev stack's servers too)."""


def run_mariadb_client(
    connection: Sequence[str], password: str | None, statements: Sequence[str], timeout_s: float
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("MYSQL_PWD", None)
    if password is not None:
        # The environment, not argv, so the password does not show up in `ps`.
        env["MYSQL_PWD"] = password
    sql = "".join(statement.strip().rstrip(";") + ";\n" for statement in statements)
    try:
        return subprocess.run(
            ["mariadb", "--no-defaults", "--batch", *connection],
            input=sql,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ServiceError(f"mariadb client did not finish within {timeout_s}s") from exc
    except OSError as exc:
        raise ServiceError(f"cannot run the mariadb client: {exc}") from exc


def create_database_statement(name: str) -> str:
    """The database as ScaiGrid needs it: utf8mb4 throughout."""
    return f"CREATE DATABASE IF NOT EXISTS {sql_ident(name)} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"


def database_statements(name: str, user: str, password: str) -> list[str]:
    """SQL creating a utf8mb4 database and a user owning it from loopback (idempotent; resets the password)."""
    return [
        create_database_statement(name),
        *_user_statements(user, password, "127.0.0.1", name),
        *_user_statements(user, password, "localhost", name),
    ]


def run_sql_as_root(socket_path: Path, statements: Sequence[str]) -> None:
    """Runs SQL as MariaDB's root through its unix socket (Debian's root logs in by socket, with no password)."""
    result = run_mariadb_client([f"--socket={socket_path}", "--user=root"], None, statements, SQL_TIMEOUT_S)
    if result.returncode != 0:
        raise ServiceError(f"MariaDB at {socket_path} rejected SQL: {result.stderr.strip()}")


def _user_statements(user: str, password: str, host: str, database: str) -> list[str]:
    account = f"{sql_str(user)}@{sql_str(host)}"
    # In GRANT, '_' and '%' in a database name are wildcards; escape them to grant exactly this database.
    grant_target = database.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%")
    return [
        f"CREATE USER IF NOT EXISTS {account} IDENTIFIED BY {sql_str(password)}",
        # CREATE ... IF NOT EXISTS keeps an old password, which the caller's (a secret file, a URL) would not match.
        f"ALTER USER {account} IDENTIFIED BY {sql_str(password)}",
        f"GRANT ALL PRIVILEGES ON {sql_ident(grant_target)}.* TO {account}",
    ]


def sql_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def sql_str(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
