"""What backup, restore, upgrade and the support bundle share: their errors, the database reached as its own user,
and the archives (written 0600 and renamed into place once complete, read back only once verified whole)."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from appliance.config import Appliance, read_secrets
from appliance.database import create_database_statement
from appliance.files import private_dir, private_file
from appliance.maintenance.client_commands import client_command

Say = Callable[[str], None]

FORMAT = "scaigrid-appliance-backup/1"
MANIFEST = "manifest.json"
DUMP = "database.sql"
CONFIG_MEMBER = "config/appliance.env"
# Everything a backup may hold besides its manifest; any other name marks a foreign or tampered archive.
MEMBER_NAME = re.compile(r"database\.sql|config/appliance\.env|config/(secrets|tls)/[A-Za-z0-9][A-Za-z0-9._-]*")
CHUNK_BYTES = 1 << 20


class MaintenanceFailed(Exception):
    """A maintenance step failed; the message says which, why, and where the appliance stands."""


class Refused(MaintenanceFailed):
    """Bad input or state, found before anything was stopped or changed (exit 1)."""


class Unhealthy(MaintenanceFailed):
    """Exit 4: a restore's health gate failed, or an upgrade failed and was rolled back (the message says why, and
    whether the version rolled back to passed its own health gate)."""


@dataclass(frozen=True)
class Database:
    """The appliance's database, reached as its own user; the password goes through the environment, never argv."""

    host: str
    port: int
    name: str
    user: str
    password: str = field(repr=False)

    @classmethod
    def of(cls, appliance: Appliance, password: str | None = None) -> Database:
        c = appliance.config
        return cls(c.database_host, c.database_port, c.database_name, c.database_user,
                   read_secrets(appliance)["database-password"] if password is None else password)

    def run(self, program: str, *args: str, **streams: Any) -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, "MYSQL_PWD": self.password}  # argv would show the password in `ps`
        argv = [program, "--no-defaults", "--protocol=TCP", f"--host={self.host}", f"--port={self.port}",
                f"--user={self.user}", *args]
        streams.setdefault("stdout", subprocess.PIPE)
        try:
            return subprocess.run(argv, stderr=subprocess.PIPE, env=env, check=False, **streams)
        except OSError as exc:
            raise MaintenanceFailed(f"cannot run {program}: {exc}") from None

    def sql(self, *statements: str, in_database: bool = True) -> str:
        script = "".join(f"{statement};\n" for statement in statements).encode()
        result = self.run("mariadb", "--batch", "--skip-column-names", *([self.name] if in_database else []),
                          input=script)
        if result.returncode != 0:
            raise MaintenanceFailed(f"MariaDB at {self.host}:{self.port} refused SQL: {_stderr(result)}")
        return result.stdout.decode()

    def dump(self, target: Path) -> None:
        with private_file(target) as out:
            result = self.run("mariadb-dump", "--single-transaction", "--routines", "--events", "--triggers",
                              "--hex-blob", "--default-character-set=utf8mb4", self.name, stdout=out)
        if result.returncode != 0:
            raise MaintenanceFailed(f"mariadb-dump of {self.name} failed: {_stderr(result)}")

    def migration_revisions(self) -> dict[str, str]:
        """Each Alembic stream's stored revision, by version table (core: alembic_version)."""
        tables = [t for t in self.sql("SELECT table_name FROM information_schema.tables WHERE table_schema = "
                                      "DATABASE() AND table_name LIKE 'alembic\\_version%'").split()
                  if re.fullmatch(r"alembic_version[a-z0-9_]*", t)]
        if not tables:
            return {}
        union = " UNION ALL ".join(f"SELECT '{t}', version_num FROM `{t}`" for t in tables)  # noqa: S608
        rows = (line.split("\t", 1) for line in self.sql(union).splitlines() if "\t" in line)
        return {table: revision for table, revision in rows}

    def replace_with(self, dump: Path) -> None:
        """Drops and recreates the database, so tables made after the dump go too, then loads the dump."""
        self.sql(f"DROP DATABASE IF EXISTS `{self.name}`", create_database_statement(self.name),
                 in_database=False)
        # --sandbox: a client command in the dump (a shell, another file) fails the load instead of running.
        with dump.open("rb") as source:
            result = self.run("mariadb", "--batch", "--sandbox", "--default-character-set=utf8mb4", self.name,
                              stdin=source)
        if result.returncode != 0:
            raise MaintenanceFailed(f"loading {dump.name} into {self.name} failed: {_stderr(result)}")


@dataclass(frozen=True)
class Archive:
    """A backup whose manifest, version and checksums were verified, extracted into a private directory."""

    path: Path
    manifest: dict[str, Any]
    directory: Path

    @property
    def version(self) -> str:
        return str(self.manifest["software_version"])

    def file(self, name: str) -> Path:
        return self.directory / name

    def entries(self, prefix: str) -> list[dict[str, Any]]:
        return [entry for entry in self.manifest["files"] if entry["path"].startswith(prefix)]


@contextmanager
def verified(path: Path, installed_version: str, work_dir: Path) -> Iterator[Archive]:
    """The archive, checked whole (manifest, version, every checksum) before the caller may act on it."""
    private_dir(work_dir)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix=".restore-") as directory:
        yield _extract(path, installed_version, Path(directory))


def _extract(path: Path, installed_version: str, directory: Path) -> Archive:
    try:
        with tarfile.open(path, "r:gz") as tar:
            first = tar.next()
            if first is None or first.name != MANIFEST or not first.isfile():
                raise Refused(f"{path} is not a ScaiGrid appliance backup (it does not start with {MANIFEST})")
            manifest = _manifest(path, _read_member(tar, first))
            if manifest["software_version"] != installed_version:
                version = manifest["software_version"]
                raise Refused(f"{path} is a backup of ScaiGrid {version}; this appliance runs {installed_version}. "
                              f"Restore it with version {version} installed, then upgrade.")
            expected = {entry["path"]: entry for entry in manifest["files"]}
            seen: set[str] = set()
            while (member := tar.next()) is not None:
                entry = expected.get(member.name)
                if entry is None or member.name in seen or not member.isfile():
                    raise Refused(f"{path}: unexpected member {member.name!r}; not restoring a tampered archive")
                seen.add(member.name)
                target = directory / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                digest, size = _copy_member(tar, member, target)
                if (digest, size) != (entry["sha256"], entry["size"]):
                    raise Refused(f"{path}: {member.name} does not match its checksum: the archive is damaged")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise Refused(f"{path}: cannot read it as a backup archive ({exc}); it is damaged or not a backup") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise Refused(f"{path}: {', '.join(missing)} listed in the manifest but missing: the archive is incomplete")
    command = client_command(directory / DUMP)
    if command is not None:
        raise Refused(f"{path}: {DUMP} holds a mariadb client command ({command}), which no dump does: not restoring "
                      "a tampered archive")
    return Archive(path, manifest, directory)


def _manifest(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
        well_formed = (manifest.get("format") == FORMAT and isinstance(manifest.get("software_version"), str)
                       and isinstance(manifest.get("database", {}).get("name"), str)
                       and all(_well_formed(entry) for entry in manifest["files"]))
    except (ValueError, AttributeError, KeyError, TypeError):
        well_formed = False
    if not well_formed:
        raise Refused(f"{path}: {MANIFEST} is not a {FORMAT} manifest")
    names = {entry["path"] for entry in manifest["files"]}
    if not {DUMP, CONFIG_MEMBER} <= names:
        raise Refused(f"{path}: the manifest lists no {DUMP} or no {CONFIG_MEMBER}")
    return dict(manifest)


def _well_formed(entry: dict[str, Any]) -> bool:
    return (isinstance(entry.get("path"), str) and bool(MEMBER_NAME.fullmatch(entry["path"]))
            and bool(re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256"))))
            and isinstance(entry.get("size"), int) and bool(re.fullmatch(r"0[0-7]{3}", str(entry.get("mode")))))


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    source = tar.extractfile(member)
    assert source is not None  # a regular file, checked by the caller
    with source:
        return source.read()


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> tuple[str, int]:
    source = tar.extractfile(member)
    assert source is not None
    digest = hashlib.sha256()
    size = 0
    with source, private_file(target) as out:
        while chunk := source.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    return digest.hexdigest(), size


@contextmanager
def new_archive(target: Path) -> Iterator[tarfile.TarFile]:
    """A tar.gz written beside target (0600 from its first byte) and renamed into place only once complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    try:
        with private_file(partial) as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            yield tar
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def add_member(tar: tarfile.TarFile, name: str, data: bytes | IO[bytes], mode: int, size: int | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.mode = mode
    info.mtime = int(time.time())
    if isinstance(data, bytes):
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        assert size is not None
        info.size = size
        tar.addfile(info, data)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def stamp(moment: datetime.datetime) -> str:
    return moment.strftime("%Y%m%dT%H%M%SZ")


def human_size(size_bytes: int) -> str:
    if size_bytes < 1024:
        return f"{size_bytes} B"
    size = size_bytes / 1024
    for unit in ("KB", "MB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def indented(say: Say) -> Say:
    return lambda message: say(f"  {message}")


def _stderr(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode(errors="replace").strip()
