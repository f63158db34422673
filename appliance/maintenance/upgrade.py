"""`scaigrid-appliance upgrade`: stop, backup, install a wheel, migrate, start, health gate; roll back on failure."""

from __future__ import annotations

import email.parser
import re
import shutil
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path

import scaigrid
from appliance import firstboot
from appliance.config import Appliance
from appliance.files import write_private_file
from appliance.maintenance import steps
from appliance.maintenance.archive import DUMP, Database, MaintenanceFailed, Refused, Say, Unhealthy, indented, verified
from appliance.maintenance.backup import backup
from appliance.supervisor import Supervisor

PIP = ("-m", "pip", "--disable-pip-version-check", "--no-input", "--quiet")


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
        archive = backup(appliance, say=indented(say), label="pre-upgrade")
        # The dependencies as they are: a rollback puts back those the new wheel upgrades, not just the wheel.
        requirements = archive.with_name(archive.name.removesuffix(".tar.gz") + ".requirements.txt")
        write_private_file(requirements, frozen.rstrip("\n"))
        say(f"  installed packages (for a rollback): {requirements}")
    except Exception as exc:
        say(f"the backup failed ({exc}); starting the programs again, nothing was installed")
        steps.start(supervisor, indented(say))
        raise MaintenanceFailed(f"not upgraded: the backup failed ({exc}); nothing was installed and the programs "
                                "were started again") from None
    migrated = False
    try:
        say(f"[3/6] installing {package.name} into {config.venv} ...")
        _pip_install(config.venv, package)
        say("[4/6] render and migrate")
        steps.render(appliance, indented(say))
        migrated = True  # from here on the database may hold the new version's schema
        firstboot.migrate(appliance, indented(say))
        say("[5/6] start")
        steps.start(supervisor, indented(say))
        say(f"[6/6] health gate: waiting up to {steps.HEALTH_TIMEOUT_S:.0f}s for every program to be running and ready")
        problems = steps.wait_healthy(appliance)
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
    step = indented(say)
    try:
        step("stopping all programs ...")
        supervisor.stop()
        step(f"reinstalling {rollback.wheel.name} and the packages of {rollback.requirements.name} ...")
        _pip_install(appliance.config.venv, rollback.wheel, requirements=rollback.requirements)
        steps.render(appliance, step)
        if rollback.database_changed:
            with verified(rollback.archive, rollback.version, appliance.config.backups_dir) as archive:
                step("restoring the database from the backup ...")
                Database.of(appliance).replace_with(archive.file(DUMP))
        else:
            step("the database was not touched (the upgrade failed before migrate): kept as it is")
        steps.start(supervisor, step)
    except Exception as exc:  # the operator gets everything needed to finish by hand
        python = appliance.config.venv / "bin" / "python"
        raise MaintenanceFailed(
            f"the upgrade failed ({reason}) and so did the rollback ({exc}); finish it by hand: "
            f"`{python} -m pip install -r {rollback.requirements}`, `{python} -m pip install --no-deps "
            f"--force-reinstall {rollback.wheel}`, then `scaigrid-appliance restore {rollback.archive} --yes`"
        ) from None
    steps.health_gate(appliance, step, failure=f"the upgrade failed ({reason}); rolled back to {rollback.version}, "
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
