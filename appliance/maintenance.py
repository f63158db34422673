"""Backup, restore, support bundle and upgrade: each checks its input before it stops or changes anything."""

from __future__ import annotations

import datetime
import email.parser
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import scaigrid
from appliance import config as appliance_config
from appliance import devstack, firstboot, logs, render
from appliance.config import Appliance, ConfigProblems, check_files, read_secrets, under
from appliance.programs import EVENTS_NAME, NGINX, PROGRAMS, healthy
from appliance.supervisor import SUPERVISORD, Supervisor
from scaigrid.settings import entries

Say = Callable[[str], None]

FORMAT = "scaigrid-appliance-backup/1"
MANIFEST = "manifest.json"
DUMP = "database.sql"
CONFIG_MEMBER = "config/appliance.env"
# Everything a backup may hold besides its manifest; any other name marks a foreign or tampered archive.
MEMBER_NAME = re.compile(r"database\.sql|config/appliance\.env|config/(secrets|tls)/[A-Za-z0-9][A-Za-z0-9._-]*")
# The password belongs to this machine's MariaDB account, not to the data: an older one from a backup
# would lock the programs out.
KEPT_SECRETS = ("database-password",)
HEALTH_TIMEOUT_S = 180.0
HEALTH_POLL_S = 1.0
# Restarts of one program during the health gate that mean it is crash-looping (one may be a passing hiccup).
CRASH_LOOP_RESTARTS = 2
STATUS_TIMEOUT_S = 120.0
VERSION_TIMEOUT_S = 10.0
SUPPORT_LOG_LINES = 2000
CHUNK_BYTES = 1 << 20
# The logs a support bundle takes, LOG_DIR/<name>.log as supervisord.conf names them; nothing else in LOG_DIR.
LOG_NAMES = (*(program.name for program in PROGRAMS), EVENTS_NAME, "supervisord")
SECRET_SETTINGS = frozenset(entry.env for entry in entries() if entry.secret)
URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)([^@\s]+)(@)")
# Commented-out lines too: an old value kept as `#S3_SECRET_ACCESS_KEY=...` is still a live secret somewhere.
SECRET_LINE = re.compile(r"^([ \t]*[#;]?[ \t]*(?:export[ \t]+)?(?:" + "|".join(sorted(SECRET_SETTINGS))
                         + r")[ \t]*=).+$", re.MULTILINE)
PIP = ("-m", "pip", "--disable-pip-version-check", "--no-input", "--quiet")


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
        with _private_file(target) as out:
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
        self.sql(f"DROP DATABASE IF EXISTS `{self.name}`", devstack.create_database_statement(self.name),
                 in_database=False)
        # --sandbox: a client command in the dump (a shell, another file) fails the load instead of running.
        with dump.open("rb") as source:
            result = self.run("mariadb", "--batch", "--sandbox", "--default-character-set=utf8mb4", self.name,
                              stdin=source)
        if result.returncode != 0:
            raise MaintenanceFailed(f"loading {dump.name} into {self.name} failed: {_stderr(result)}")


# --- backup ---

def backup(appliance: Appliance, *, say: Say, output: Path | None = None, label: str = "") -> Path:
    """Dumps the database and copies appliance.env, secrets and TLS files into one 0600 archive with a manifest."""
    config = appliance.config
    version = scaigrid.__version__
    created = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    target = output or config.backups_dir / f"scaigrid-{version}-{_stamp(created)}{'-' + label if label else ''}.tar.gz"
    if target.exists():
        raise Refused(f"{target} exists; choose another --output")
    if output is None:
        _private_dir(config.backups_dir)
    database = Database.of(appliance)
    files = _config_files(appliance)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".backup-") as work:
        dump = Path(work) / DUMP
        say(f"dumping database {database.name} ...")
        database.dump(dump)
        say(f"  database {database.name}: {_size(dump.stat().st_size)}")
        revisions = database.migration_revisions()
        secrets_count = sum(name.startswith("config/secrets/") for name in files)
        tls_count = sum(name.startswith("config/tls/") for name in files)
        say(f"  appliance.env, {secrets_count} secret(s), {tls_count} TLS file(s): "
            f"{_size(sum(len(data) for data, _ in files.values()))}")
        for name, path in (("TLS_CERT_FILE", config.tls_cert), ("TLS_KEY_FILE", config.tls_key)):
            if path.parent != config.config_dir / "tls":
                say(f"  note: {name} {path} is outside {config.config_dir / 'tls'} and not in the backup")
        manifest = {
            "format": FORMAT,
            "software_version": version,
            "created_at": created.isoformat(),
            "hostname": config.hostname,
            "database": {"name": database.name, "migrations": revisions},
            "files": [_entry(DUMP, _sha256_file(dump), dump.stat().st_size, 0o600),
                      *(_entry(name, hashlib.sha256(data).hexdigest(), len(data), mode)
                        for name, (data, mode) in files.items())],
        }
        with _new_archive(target) as tar:
            _add(tar, MANIFEST, json.dumps(manifest, indent=2).encode(), 0o600)
            with dump.open("rb") as source:
                _add(tar, DUMP, source, 0o600, size=dump.stat().st_size)
            for name, (data, mode) in files.items():
                _add(tar, name, data, mode)
    say(f"wrote {target} ({_size(target.stat().st_size)}, mode 0600: it holds the secrets, keep it safe)")
    return target


def _config_files(appliance: Appliance) -> dict[str, tuple[bytes, int]]:
    """appliance.env, every secret and the files of CONFIG_DIR/tls: archive name -> (content, mode)."""
    config = appliance.config
    files = {CONFIG_MEMBER: (appliance.path.read_bytes(), 0o600)}
    for kind, directory in (("secrets", config.secrets_dir), ("tls", config.config_dir / "tls")):
        for path in sorted(directory.iterdir()) if directory.is_dir() else []:
            name = f"config/{kind}/{path.name}"
            if path.is_file() and MEMBER_NAME.fullmatch(name):
                mode = 0o600 if kind == "secrets" else path.stat().st_mode & 0o644
                files[name] = (path.read_bytes(), mode)
    return files


def _entry(name: str, sha256: str, size: int, mode: int) -> dict[str, Any]:
    return {"path": name, "sha256": sha256, "size": size, "mode": f"{mode:04o}"}


# --- reading a backup ---

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
    _private_dir(work_dir)
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
    with source, _private_file(target) as out:
        while chunk := source.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    return digest.hexdigest(), size


# --- client commands in a dump ---

# The mariadb client runs commands of its own from a script, not only SQL: `\!` and `system` run a shell, `\.` and
# `source` read another file, `\T`, `\P`, `connect`, `quit`... A dump made by mariadb-dump holds none but `\-`
# (which turns the client's sandbox on) and `DELIMITER ;;` / `DELIMITER ;` around triggers and routines. The load
# runs with --sandbox anyway; this finds them first, before anything is stopped, reading the dump as the client does
# (its add_line: strings, `/* */` comments but not `/*! */` ones, `#` and `-- ` comments, the delimiter).
CLIENT_COMMAND_WORDS = frozenset({
    "?", "charset", "clear", "connect", "edit", "ego", "exit", "go", "help", "nopager", "notee", "nowarning",
    "pager", "print", "prompt", "quit", "rehash", "sandbox", "source", "status", "system", "tee", "use", "warnings"})
HARMLESS_BACKSLASH = frozenset(b"N-")  # \N is NULL; \- turns the sandbox on
DUMP_DELIMITERS = (b";", b";;")
_FIRST_WORD = re.compile(rb"([A-Za-z]+|\?)(?=[ \t;]|$)")
_SPACES = re.compile(rb"\s*")
# Where the client's reading may change, by state: the rest of a line is skipped up to the next of these.
_CODE_SPECIAL = re.compile(rb"[\\'\"`#/*;-]")
_COMMENT_SPECIAL = re.compile(rb"[*/]")
BACKSLASH, BACKTICK, HASH, DASH = 0x5C, 0x60, 0x23, 0x2D
# How strings read depends on the sql_mode (NO_BACKSLASH_ESCAPES, ANSI_QUOTES and the modes including it): the
# reader follows the server's default, so a dump may set sql_mode only as mariadb-dump does, to other modes.
_SQL_MODE = re.compile(rb"sql_mode", re.IGNORECASE)
_DUMP_SQL_MODE = re.compile(
    rb"/\*!\d{5} SET (?:@OLD_SQL_MODE=@@SQL_MODE, SQL_MODE='([A-Z_,]*)'|SQL_MODE=@OLD_SQL_MODE|"
    rb"@saved_sql_mode\s*=\s*@@sql_mode|sql_mode\s*=\s*'([A-Z_,]*)'|sql_mode\s*=\s*@saved_sql_mode) \*/\s*;",
    re.IGNORECASE)
STRING_MODES = frozenset({b"ANSI", b"ANSI_QUOTES", b"NO_BACKSLASH_ESCAPES", b"DB2", b"MAXDB", b"MSSQL", b"ORACLE",
                          b"POSTGRESQL"})


@dataclass
class _ClientReader:
    """The client's reading state across lines."""

    quote: int = 0  # the quote character of the string we are in, or 0
    comment: bool = False  # inside /* ... */
    conditional: bool = False  # inside /*! ... */, whose first */ does not end a comment nested in it
    statement_start: bool = True
    delimiter: bytes = b";"

    def command(self, line: bytes) -> str | None:
        """The first client command on this line, if any."""
        pos, end = 0, len(line)
        while pos < end:
            if self.statement_start and not (self.quote or self.comment):
                pos = _SPACES.match(line, pos).end()  # type: ignore[union-attr]  # \s* always matches
                if pos >= end:
                    return None
                if not _comment_start(line, pos):
                    self.statement_start = False
                    word = _FIRST_WORD.match(line, pos)
                    name = word.group(1).decode().lower() if word else ""
                    if word and name == "delimiter":
                        self.delimiter = line[word.end():].strip()
                        self.statement_start = True
                        return None if self.delimiter in DUMP_DELIMITERS else f"DELIMITER {self.delimiter!r}"
                    if name in CLIENT_COMMAND_WORDS:
                        return name
            found = self._special(line, pos)
            if found is None:
                return None
            pos = found
            char = line[pos]
            if not self.comment and char == BACKSLASH and self.quote != BACKTICK:
                if pos + 1 >= end:
                    return None if self.quote else "\\ at the end of a line"
                if not self.quote and line[pos + 1] not in HARMLESS_BACKSLASH:
                    return "\\" + chr(line[pos + 1])
                pos += 2
            elif not (self.comment or self.quote) and line.startswith(self.delimiter, pos):
                self.statement_start = True
                pos += len(self.delimiter)
            elif not (self.comment or self.quote) and (char == HASH or line.startswith(b"--", pos)):
                if char == DASH and pos + 2 < end and not line[pos + 2:pos + 3].isspace():
                    return "'--' not followed by a space"  # a comment to some client versions, not to others
                return None  # the rest of the line is a comment
            elif not self.quote and line.startswith(b"/*", pos) and not line.startswith((b"/*!", b"/*M!"), pos):
                if line.startswith(b"/*+", pos):
                    return "an optimizer hint"  # a comment to some client versions, not to others
                self.comment = True
                pos += 2
            elif self.comment and not self.conditional and line.startswith(b"*/", pos):
                self.comment = False
                pos += 2
            elif not self.quote and self.conditional and line.startswith(b"*/", pos):
                self.conditional = False
                pos += 2
            else:
                if not self.quote and line.startswith(b"/*!", pos):
                    self.conditional = True
                if char == self.quote:
                    self.quote = 0
                elif not (self.comment or self.quote) and char in b"'\"`":
                    self.quote = char
                pos += 1
        return None

    def _special(self, line: bytes, pos: int) -> int | None:
        """Where the next character that may change the reading is, from pos on."""
        if self.quote:
            found = [index for index in (line.find(bytes([self.quote]), pos),
                                         line.find(b"\\", pos) if self.quote != BACKTICK else -1) if index >= 0]
            return min(found) if found else None
        match = (_COMMENT_SPECIAL if self.comment else _CODE_SPECIAL).search(line, pos)
        return match.start() if match else None


def _comment_start(line: bytes, pos: int) -> bool:
    return line.startswith((b"#", b"--"), pos) or (
        line.startswith(b"/*", pos) and not line.startswith((b"/*!", b"/*M!"), pos))


def client_command(dump: Path) -> str | None:
    """The first mariadb client command in an SQL script, with its line number; None for a plain dump."""
    reader = _ClientReader()
    with dump.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            line = line.rstrip(b"\r\n")
            command = reader.command(line)
            if command is None and _SQL_MODE.search(line):
                dumped = _DUMP_SQL_MODE.fullmatch(line.strip())
                modes = set(b",".join(dumped.groups(b"")).upper().split(b",")) if dumped else set()
                if dumped is None or modes & STRING_MODES:
                    command = "an sql_mode other than mariadb-dump sets, changing how the client reads strings"
            if command is not None:
                return f"line {number}: {command}"
    return None


# --- restore ---

def restore(appliance: Appliance, path: Path, *, say: Say, confirm: Callable[[str], bool]) -> None:
    """Verifies the archive and what it would leave behind, then: safety backup, stop, files, database, render,
    migrate, start, health gate."""
    supervisor = Supervisor(appliance.config.supervisor_socket)
    with verified(path, scaigrid.__version__, appliance.config.backups_dir) as archive:
        try:
            archived = appliance_config.load(archive.file(CONFIG_MEMBER))
        except ConfigProblems as exc:
            raise Refused(f"{path}: its appliance.env is not valid here:\n  " + "\n  ".join(exc.problems)) from None
        files = _restored_files(appliance, archive, archived)
        # Render would refuse what check-config refuses (a TLS file or secret missing), but only after the database
        # was replaced: the files as the restore will leave them are checked now.
        problems = _check_restored_files(archived, files, archive.directory / "after-restore")
        if problems:
            raise Refused(f"{path}: not restoring, the appliance would not start with its files:\n  "
                          + "\n  ".join(problems))
        # The database as the restored appliance.env names it, with this machine's password: reachable before
        # any change, or the restore would stop the appliance and then fail.
        database = Database.of(archived, read_secrets(appliance)["database-password"])
        try:
            database.sql("SELECT 1", in_database=False)
        except MaintenanceFailed as exc:
            raise Refused(f"{path}: not restoring, its database settings do not work here ({exc})") from None
        supervisor.processes()  # supervisord answers (exit 3 otherwise), before any change
        manifest = archive.manifest
        say(f"{path}: ScaiGrid {archive.version}, database {manifest['database']['name']}, made "
            f"{manifest['created_at']} on {manifest.get('hostname', '?')}; {len(manifest['files'])} files, "
            "checksums ok")
        if not confirm(f"Replace database {database.name}, appliance.env, secrets and TLS files with the backup's?"):
            raise Refused("not confirmed; nothing changed")
        say("backing up the current state first:")
        try:
            safety = backup(appliance, say=_indented(say), label="pre-restore")
        except MaintenanceFailed as exc:
            raise MaintenanceFailed(f"backing up the current state failed, so nothing was changed: {exc}") from None
        try:
            say("stopping all programs ...")
            supervisor.stop()
            restored = _restore_files(appliance, archive, archived, files, say)
            dump_size = archive.file(DUMP).stat().st_size
            say(f"loading database {database.name} ({_size(dump_size)}) ...")
            database.replace_with(archive.file(DUMP))
            _render(restored, say)
            firstboot.migrate(restored, say)
            _start(supervisor, say)
        except Exception as exc:  # whatever broke, the operator needs the way back
            raise MaintenanceFailed(f"restore failed: {exc}\nThe state before it is in {safety}: "
                                    f"scaigrid-appliance restore {safety} --yes") from None
    _health_gate(restored, say, failure=f"restored from {path}, but the appliance is not healthy")
    say(f"restored {path}; the state before it is in {safety}")


def _restored_files(appliance: Appliance, archive: Archive, archived: Appliance) -> dict[Path, tuple[str, int]]:
    """What the restore writes: appliance.env, the secrets (0600) and the TLS files, path -> (content, mode)."""
    config = archived.config
    files = {}
    for entry in archive.manifest["files"]:
        name = entry["path"]
        if name == CONFIG_MEMBER:
            target, mode = appliance.path, 0o600
        elif name.startswith("config/secrets/"):
            target, mode = config.secrets_dir / name.rsplit("/", 1)[1], 0o600
            if target.name in KEPT_SECRETS and target.exists():
                continue
        elif name.startswith("config/tls/"):
            target, mode = config.config_dir / "tls" / name.rsplit("/", 1)[1], int(entry["mode"], 8) & 0o644
        else:
            continue
        try:
            files[target] = (archive.file(name).read_bytes().decode(), mode)
        except UnicodeDecodeError:
            raise Refused(f"{archive.path}: {name} is not text; not restoring it") from None
    return files


def _check_restored_files(archived: Appliance, files: dict[Path, tuple[str, int]], shadow: Path) -> list[str]:
    """check_files on the files as the restore will leave them (the archive's over those already here), laid out
    under shadow: links to those already here, copies of the archive's."""
    config = archived.config
    here = [path for directory in (config.secrets_dir, config.config_dir / "tls") if directory.is_dir()
            for path in directory.iterdir()]
    for path in {*here, config.tls_cert, config.tls_key}:
        if path.exists():
            under(shadow, path).parent.mkdir(parents=True, exist_ok=True)
            under(shadow, path).symlink_to(path)
    for path, (text, mode) in files.items():
        under(shadow, path).parent.mkdir(parents=True, exist_ok=True)
        _place(under(shadow, path), text, mode)
    return [problem.replace(str(shadow), "") for problem in check_files(archived, shadow)]


def _restore_files(appliance: Appliance, archive: Archive, archived: Appliance, files: dict[Path, tuple[str, int]],
                   say: Say) -> Appliance:
    """Writes what _restored_files planned; returns the appliance as restored."""
    _private_dir(archived.config.secrets_dir)
    for path, (text, mode) in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        _place(path, text, mode)
    secrets_count = sum(path.parent == archived.config.secrets_dir for path in files)
    kept = len(archive.entries("config/secrets/")) - secrets_count
    say(f"restored appliance.env, {secrets_count} secret(s), {len(archive.entries('config/tls/'))} TLS file(s)"
        + (" (kept this machine's database password)" if kept else ""))
    return appliance_config.load(appliance.path)


def _place(path: Path, text: str, mode: int) -> None:
    devstack.write_private_file(path, text.rstrip("\n"))
    path.chmod(mode)  # a certificate is 0644; everything else stays 0600


# --- upgrade ---

def upgrade(appliance: Appliance, package: Path, *, say: Say) -> str:
    """stop, backup, install, migrate, start, health gate; on any failure after the backup, rolls back. Returns the
    version now running."""
    config = appliance.config
    new_version = _wheel_version(package)
    current = config.wheels_dir / "current"
    if not current.is_file():
        raise Refused(f"no previous wheel at {current} to roll back to (provision.sh keeps it); not upgrading")
    previous = current.resolve()
    supervisor = Supervisor(config.supervisor_socket)
    supervisor.processes()  # supervisord answers (exit 3 otherwise), before any change
    try:
        frozen = _pip(config.venv, "freeze", "--exclude", "scaigrid")
    except MaintenanceFailed as exc:
        raise Refused(f"cannot list the packages installed in {config.venv} ({exc}); not upgrading") from None
    installed = scaigrid.__version__
    say(f"upgrading ScaiGrid {installed} to {new_version} ({package.name}); rollback: {previous.name}")
    # Stopped first, so that the backup holds every write the programs accepted, the drain's included.
    try:
        say("[1/6] stopping all programs ...")
        supervisor.stop()
        say("[2/6] backup")
        archive = backup(appliance, say=_indented(say), label="pre-upgrade")
        # The dependencies as they are: a rollback puts back those the new wheel upgrades, not just the wheel.
        requirements = archive.with_name(archive.name.removesuffix(".tar.gz") + ".requirements.txt")
        devstack.write_private_file(requirements, frozen.rstrip("\n"))
        say(f"  installed packages (for a rollback): {requirements}")
    except Exception as exc:
        say(f"the backup failed ({exc}); starting the programs again, nothing was installed")
        _start(supervisor, _indented(say))
        raise MaintenanceFailed(f"not upgraded: the backup failed ({exc}); nothing was installed and the programs "
                                "were started again") from None
    migrated = False
    try:
        say(f"[3/6] installing {package.name} into {config.venv} ...")
        _pip_install(config.venv, package)
        say("[4/6] render and migrate")
        _render(appliance, _indented(say))
        migrated = True  # from here on the database may hold the new version's schema
        firstboot.migrate(appliance, _indented(say))
        say("[5/6] start")
        _start(supervisor, _indented(say))
        say(f"[6/6] health gate: waiting up to {HEALTH_TIMEOUT_S:.0f}s for every program to be running and ready")
        problems = wait_healthy(appliance)
        if problems:
            raise MaintenanceFailed("not healthy: " + "; ".join(problems))
    except Exception as exc:  # whatever broke, the appliance must not stay down on a half-installed version
        reason = str(exc)
        say(f"upgrade failed: {reason}")
        _roll_back(appliance, supervisor, Rollback(installed, previous, requirements, archive, migrated), say, reason)
        database = f"database restored from {archive}" if migrated else "database untouched"
        raise Unhealthy(f"upgrade to {new_version} failed ({reason}); rolled back to {installed} "
                        f"({database})") from None
    try:
        _keep_wheel(config.wheels_dir, package)
    except OSError as exc:
        raise MaintenanceFailed(f"upgraded to {new_version}, but keeping {package.name} in {config.wheels_dir} for "
                                f"the next rollback failed: {exc}") from None
    say(f"upgraded to {new_version}: all programs running and ready; the backup of {installed} is {archive}")
    return new_version


@dataclass(frozen=True)
class Rollback:
    """What an upgrade goes back to: the version, its wheel and dependencies, and its backup (taken once stopped)."""

    version: str
    wheel: Path
    requirements: Path
    archive: Path
    database_changed: bool  # migrate began: the database is reloaded from the archive


def _roll_back(appliance: Appliance, supervisor: Supervisor, rollback: Rollback, say: Say, reason: str) -> None:
    say(f"rolling back to {rollback.version}:")
    step = _indented(say)
    try:
        step("stopping all programs ...")
        supervisor.stop()
        step(f"reinstalling {rollback.wheel.name} and the packages of {rollback.requirements.name} ...")
        _pip_install(appliance.config.venv, rollback.wheel, requirements=rollback.requirements)
        _render(appliance, step)
        if rollback.database_changed:
            with verified(rollback.archive, rollback.version, appliance.config.backups_dir) as archive:
                step("restoring the database from the backup ...")
                Database.of(appliance).replace_with(archive.file(DUMP))
        else:
            step("the database was not touched (the upgrade failed before migrate): kept as it is")
        _start(supervisor, step)
    except Exception as exc:  # the operator gets everything needed to finish by hand
        python = appliance.config.venv / "bin" / "python"
        raise MaintenanceFailed(
            f"the upgrade failed ({reason}) and so did the rollback ({exc}); finish it by hand: "
            f"`{python} -m pip install -r {rollback.requirements}`, `{python} -m pip install --no-deps "
            f"--force-reinstall {rollback.wheel}`, then `scaigrid-appliance restore {rollback.archive} --yes`"
        ) from None
    _health_gate(appliance, step, failure=f"the upgrade failed ({reason}); rolled back to {rollback.version}, "
                                          "but that is not healthy either")


def _wheel_version(package: Path) -> str:
    """The version of a scaigrid wheel; Refused for anything else."""
    if package.suffix != ".whl":
        raise Refused(f"{package} is not a wheel (*.whl)")
    try:
        with zipfile.ZipFile(package) as wheel:
            names = [name for name in wheel.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", name)]
            if len(names) != 1:
                raise Refused(f"{package} is not a wheel (no single *.dist-info/METADATA)")
            metadata = email.parser.BytesHeaderParser().parsebytes(wheel.read(names[0]))
    except (zipfile.BadZipFile, OSError) as exc:
        raise Refused(f"{package} is not a wheel ({exc})") from None
    name = re.sub(r"[-_.]+", "-", str(metadata.get("Name", ""))).lower()
    if name != "scaigrid" or not metadata.get("Version"):
        raise Refused(f"{package} is a wheel of {name or 'nothing'!r}, not of scaigrid")
    return str(metadata["Version"])


def _pip(venv: Path, *args: str) -> str:
    """pip of the appliance's venv (it reads PIP_FIND_LINKS / PIP_NO_INDEX for an offline wheelhouse); its output."""
    result = subprocess.run([str(venv / "bin" / "python"), *PIP, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise MaintenanceFailed(f"pip {args[0]} failed: {result.stderr.strip()[-2000:]}")
    return result.stdout


def _pip_install(venv: Path, wheel: Path, *, requirements: Path | None = None) -> None:
    """The wheel's dependencies (for a rollback: exactly those of the requirements file), then this very build,
    which pip would skip as installed if only rebuilt under the same version."""
    _pip(venv, "install", *(("-r", str(requirements)) if requirements else (str(wheel),)))
    _pip(venv, "install", "--no-deps", "--force-reinstall", str(wheel))


def _keep_wheel(wheels_dir: Path, package: Path) -> None:
    """Keeps the installed wheel and points `current` at it, as provision.sh does: the next upgrade's rollback."""
    wheels_dir.mkdir(parents=True, exist_ok=True)
    kept = wheels_dir / package.name
    if not kept.exists() or not kept.samefile(package):
        shutil.copyfile(package, kept)
        kept.chmod(0o644)
    link = wheels_dir / ".current.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(package.name)
    link.replace(wheels_dir / "current")


# --- steps shared by restore and upgrade ---

def _installed_cli(appliance: Appliance, *args: str,
                   timeout_s: float | None = None) -> subprocess.CompletedProcess[str]:
    """Runs the installed scaigrid-appliance: after an upgrade's install, it is the new version that renders and
    judges health, not this process's already imported code."""
    argv = [str(appliance.config.venv / "bin" / "scaigrid-appliance"), *args, "--config", str(appliance.path)]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(argv, 1, "", str(exc))


def _render(appliance: Appliance, say: Say) -> None:
    result = _installed_cli(appliance, "render")
    if result.returncode != 0:
        raise MaintenanceFailed(f"render failed: {(result.stderr or result.stdout).strip()}")
    say(f"rendered: {result.stdout.strip().splitlines()[-1]}")


def _start(supervisor: Supervisor, say: Say) -> None:
    changed = supervisor.reread_and_update()
    if changed:
        say(f"supervisord took the new config of: {', '.join(changed)}")
    say("starting all programs ...")
    supervisor.start()


def status_report(appliance: Appliance) -> dict[str, Any]:
    """What `scaigrid-appliance status --json` says; {"running": false, "error": ...} when it cannot say."""
    result = _installed_cli(appliance, "status", "--json", timeout_s=STATUS_TIMEOUT_S)
    try:
        report = json.loads(result.stdout)
    except ValueError:
        return {"running": False, "error": result.stderr.strip() or f"status exited {result.returncode}",
                "programs": []}
    return dict(report)


def wait_healthy(appliance: Appliance, timeout_s: float = HEALTH_TIMEOUT_S) -> list[str]:
    """Waits until every program is RUNNING and ready (as `status` judges); the problems if that does not happen.

    Gives up early on a program supervisord gave up on (FATAL) or keeps restarting: one that dies after its
    startsecs is restarted for ever and would otherwise hold the gate for the whole timeout.
    """
    deadline = time.monotonic() + timeout_s
    pids: dict[str, set[int]] = {}
    log_dir = appliance.config.log_dir
    while True:
        report = status_report(appliance)
        if report.get("healthy"):
            return []
        programs = report.get("programs", [])
        for p in programs:
            if p["pid"]:
                pids.setdefault(p["name"], set()).add(p["pid"])
        failed = [f"{p['name']} is FATAL (see {log_dir / p['name']}.log)" for p in programs if p["state"] == "FATAL"]
        failed += [f"{name} keeps exiting: {len(seen) - 1} restarts while waiting (see {log_dir / name}.log)"
                   for name, seen in pids.items() if len(seen) - 1 >= CRASH_LOOP_RESTARTS]
        if failed:
            return failed
        if time.monotonic() >= deadline:
            if not report.get("running"):
                return [str(report.get("error"))]
            return [f"{p['name']} is {p['state']}" + (", not ready" if p["ready"] is False else "")
                    for p in programs if not healthy([p])]
        time.sleep(HEALTH_POLL_S)


def _health_gate(appliance: Appliance, say: Say, *, failure: str) -> None:
    say(f"waiting up to {HEALTH_TIMEOUT_S:.0f}s for every program to be running and ready ...")
    problems = wait_healthy(appliance)
    if problems:
        raise Unhealthy(f"{failure}: " + "; ".join(problems))
    say("all programs running and ready")


# --- support bundle ---

@dataclass(frozen=True)
class Redactor:
    """Hides every secret: the values of CONFIG_DIR/secrets and of secret settings, wherever they appear, and
    the password of any URL."""

    values: tuple[tuple[str, str], ...]  # (text to hide, what it is), longest first

    @classmethod
    def of(cls, appliance: Appliance) -> Redactor:
        found: dict[str, str] = {}
        directory = appliance.config.secrets_dir
        for path in sorted(directory.iterdir()) if directory.is_dir() else []:
            if path.is_file():
                found[path.read_text(errors="replace").strip()] = path.name
        for name, value in appliance.passthrough.items():
            if name in SECRET_SETTINGS:
                found[value] = name
        for value, name in list(found.items()):
            found.setdefault(quote(value, safe=""), name)  # as DATABASE_URL carries the password
        found.pop("", None)
        return cls(tuple(sorted(found.items(), key=lambda item: -len(item[0]))))

    def __call__(self, text: str) -> str:
        for value, name in self.values:
            text = text.replace(value, f"<redacted:{name}>")
        text = URL_PASSWORD.sub(r"\1<redacted>\3", text)
        return SECRET_LINE.sub(r"\1<redacted>", text)


def support_bundle(appliance: Appliance, *, say: Say, output: Path | None = None,
                   log_lines: int = SUPPORT_LOG_LINES) -> Path:
    """A tar.gz to share with support: configs with secrets redacted, log tails, versions, status. No TLS key."""
    config = appliance.config
    now = datetime.datetime.now(datetime.UTC)
    target = output or config.state_dir / "support" / f"scaigrid-support-{_stamp(now)}.tar.gz"
    redact = Redactor.of(appliance)
    members: dict[str, str] = {}

    def files_name(path: Path) -> str:
        return "files/" + str(path).lstrip("/")

    members[files_name(appliance.path)] = appliance.path.read_text(errors="replace")
    try:
        rendered = render.outputs(appliance)
    except (OSError, KeyError) as exc:  # e.g. secrets missing before init
        members["render-error.txt"] = f"cannot render: {exc}\n"
        rendered = []
    for output_file in rendered:
        if output_file.path.is_file():
            members[files_name(output_file.path)] = output_file.path.read_text(errors="replace")
    if rendered:
        members["render-diff.txt"] = render.diff(Path("/"), rendered) or "the files on disk are as rendered\n"
    say(f"configs: {len(members)} file(s), {_size(sum(len(text) for text in members.values()))}")
    tails = {f"logs/{name}.log": _log_tail(config.log_dir / f"{name}.log", log_lines) for name in LOG_NAMES}
    members |= {name: text for name, text in tails.items() if text is not None}
    say(f"logs: {sum(text is not None for text in tails.values())} file(s), last {log_lines} lines each, "
        f"{_size(sum(len(text or '') for text in tails.values()))}")
    members["versions.txt"] = _versions(appliance)
    members["status.json"] = json.dumps(status_report(appliance), indent=2) + "\n"
    say("versions and status collected")
    if output is None:
        _private_dir(target.parent)
    with _new_archive(target) as tar:
        for name, text in members.items():
            _add(tar, name, redact(text).encode(), 0o600)
    say(f"wrote {target} ({_size(target.stat().st_size)}); secrets redacted, no TLS key: safe to send to support")
    return target


def _log_tail(path: Path, lines: int) -> str | None:
    """The last lines of a log, None if there is none (logs.tail never follows a link planted in LOG_DIR)."""
    try:
        return "".join(logs.tail(path, lines)) or None
    except OSError as exc:
        raise MaintenanceFailed(f"cannot read {path}: {exc.strerror}") from None


def _versions(appliance: Appliance) -> str:
    def command(*argv: str) -> str:
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=VERSION_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"(not available: {exc})"
        return (result.stdout + result.stderr).strip() or f"(exit {result.returncode}, no output)"

    try:
        server = Database.of(appliance).sql("SELECT VERSION()", in_database=False).strip()
    except (MaintenanceFailed, OSError, KeyError) as exc:
        server = f"(not reachable: {exc})"
    try:
        lines = Path("/etc/os-release").read_text().splitlines()
        pretty = [line.split("=", 1)[1] for line in lines if line.startswith("PRETTY_NAME=")]
        system = pretty[0].strip('"') if pretty else "?"
    except OSError:
        system = "?"
    versions = [
        f"scaigrid: {scaigrid.__version__}",
        f"python: {sys.version.split()[0]} ({sys.executable})",
        f"nginx: {command(NGINX, '-v')}",
        f"supervisord: {command(SUPERVISORD, '--version')}",
        f"mariadb client: {command('mariadb', '--version')}",
        f"mariadb server: {server}",
        f"os: {system}; kernel {platform.release()} {platform.machine()}",
    ]
    return "\n".join(versions) + "\n"


# --- files and archives ---

@contextmanager
def _new_archive(target: Path) -> Iterator[tarfile.TarFile]:
    """A tar.gz written beside target (0600 from its first byte) and renamed into place only once complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    try:
        with _private_file(partial) as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            yield tar
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def _add(tar: tarfile.TarFile, name: str, data: bytes | IO[bytes], mode: int, size: int | None = None) -> None:
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


@contextmanager
def _private_file(path: Path) -> Iterator[IO[bytes]]:
    """0600 from its first byte, streamed: dumps and archives are too big for devstack.write_private_file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as handle:
        yield handle


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(moment: datetime.datetime) -> str:
    return moment.strftime("%Y%m%dT%H%M%SZ")


def _size(size_bytes: int) -> str:
    if size_bytes < 1024:
        return f"{size_bytes} B"
    size = size_bytes / 1024
    for unit in ("KB", "MB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _indented(say: Say) -> Say:
    return lambda message: say(f"  {message}")


def _stderr(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode(errors="replace").strip()
