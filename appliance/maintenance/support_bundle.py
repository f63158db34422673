"""`scaigrid-appliance support-bundle`: configs with every secret redacted, log tails, versions and status."""

from __future__ import annotations

import datetime
import json
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import scaigrid
from appliance import logs, render
from appliance.config import Appliance
from appliance.files import private_dir
from appliance.maintenance.archive import (
    Database,
    MaintenanceFailed,
    Say,
    add_member,
    human_size,
    new_archive,
    stamp,
)
from appliance.maintenance.steps import status_report
from appliance.programs import EVENTS_NAME, NGINX, PROGRAMS, Context
from appliance.supervisor import SUPERVISORD
from scaigrid.settings import entries

VERSION_TIMEOUT_S = 10.0
SUPPORT_LOG_LINES = 2000
SECRET_SETTINGS = frozenset(entry.env for entry in entries() if entry.secret)
URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)([^@\s]+)(@)")
# Commented-out lines too: an old value kept as `#S3_SECRET_ACCESS_KEY=...` is still a live secret somewhere.
SECRET_LINE = re.compile(r"^([ \t]*[#;]?[ \t]*(?:export[ \t]+)?(?:" + "|".join(sorted(SECRET_SETTINGS))
                         + r")[ \t]*=).+$", re.MULTILINE)


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


def log_names(appliance: Appliance) -> list[str]:
    """The logs a support bundle takes, LOG_DIR/<name>.log as supervisord.conf names them (every process of every
    program, enabled or not); nothing else in LOG_DIR."""
    ctx = Context(appliance, appliance.settings())
    return [*(name for program in PROGRAMS for name in program.process_names(ctx)), EVENTS_NAME, "supervisord"]


def support_bundle(appliance: Appliance, *, say: Say, output: Path | None = None,
                   log_lines: int = SUPPORT_LOG_LINES) -> Path:
    """A tar.gz to share with support: configs with secrets redacted, log tails, versions, status. No TLS key."""
    config = appliance.config
    now = datetime.datetime.now(datetime.UTC)
    target = output or config.state_dir / "support" / f"scaigrid-support-{stamp(now)}.tar.gz"
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
    say(f"configs: {len(members)} file(s), {human_size(sum(len(text) for text in members.values()))}")
    tails = {f"logs/{name}.log": _log_tail(config.log_dir / f"{name}.log", log_lines) for name in log_names(appliance)}
    members |= {name: text for name, text in tails.items() if text is not None}
    say(f"logs: {sum(text is not None for text in tails.values())} file(s), last {log_lines} lines each, "
        f"{human_size(sum(len(text or '') for text in tails.values()))}")
    members["versions.txt"] = _versions(appliance)
    members["status.json"] = json.dumps(status_report(appliance), indent=2) + "\n"
    say("versions and status collected")
    if output is None:
        private_dir(target.parent)
    with new_archive(target) as tar:
        for name, text in members.items():
            add_member(tar, name, redact(text).encode(), 0o600)
    say(f"wrote {target} ({human_size(target.stat().st_size)}); secrets redacted, no TLS key: safe to send to support")
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
