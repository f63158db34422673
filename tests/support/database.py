"""The database `scaigrid migrate` makes, made once per session and copied into each test's empty database.

Migrating takes a subprocess and seconds; copying the template is one client call: its tables' DDL as
`mariadb-dump --no-data` prints it (foreign keys included, unlike CREATE TABLE ... LIKE), then each table's rows
(the alembic_version* tables and the default partner and tenant). tests/test_migrate.py checks that a copy is what
migrate itself makes.
"""

import os
import re
import secrets
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.engine import make_url

from appliance import devstack


@dataclass(frozen=True)
class Template:
    """A migrated database (never used by a test itself) and its tables' DDL."""

    mariadb: devstack.MariaDB
    name: str
    ddl: str
    tables: tuple[str, ...]

    def copy_into(self, database_url: str) -> None:
        """Fills the empty database of database_url with the template's tables and rows."""
        target = ident(str(make_url(database_url).database))
        self.mariadb.execute(
            "SET FOREIGN_KEY_CHECKS = 0", f"USE {target}", self.ddl,
            *(f"INSERT INTO {target}.{ident(table)} SELECT * FROM {ident(self.name)}.{ident(table)}"
              for table in self.tables))


def dump_ddl(mariadb: devstack.MariaDB, database: str) -> str:
    """The CREATE TABLE statements of `database`, as mariadb-dump prints them."""
    result = subprocess.run(
        ["mariadb-dump", "--no-defaults", "--protocol=TCP", "--host=127.0.0.1", f"--port={mariadb.port}",
         "--user=root", "--no-data", "--compact", "--skip-comments", database],
        env={**os.environ, "MYSQL_PWD": mariadb.root_password}, capture_output=True, text=True, timeout=60,
        check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def template_from(mariadb: devstack.MariaDB, migrate: Callable[[str], None]) -> Template:
    """Creates a database, lets `migrate(url)` bring it to head, and returns it as a template."""
    name = "tpl_" + secrets.token_hex(6)
    migrate(mariadb.create_database(name, name, secrets.token_hex(12)))
    ddl = dump_ddl(mariadb, name)
    return Template(mariadb, name, ddl, tuple(re.findall(r"^CREATE TABLE `([^`]+)`", ddl, re.MULTILINE)))


def ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"

