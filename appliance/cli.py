"""`scaigrid-appliance`: the operator's one command for the appliance. It parses and dispatches; the work is elsewhere.

Exit codes: 0 done; 1 the operation failed; 2 bad usage or a bad appliance config (one line per problem);
3 supervisord is not reachable (the appliance is not running); 4 not healthy (a program is not running or not
ready; for upgrade and restore: the health gate failed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
import xmlrpc.client
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click

from appliance import config as appliance_config
from appliance import firstboot, logs, render
from appliance import link as link_module
from appliance.config import Appliance, ConfigProblems
from appliance.maintenance import backup, restore, support_bundle, upgrade
from appliance.maintenance.archive import MaintenanceFailed, Unhealthy
from appliance.programs import EVENTS_NAME, Context, enabled_programs, healthy, processes, scaigrid_argv
from appliance.supervisor import Supervisor, SupervisorUnavailable

EXIT_FAILED, EXIT_CONFIG, EXIT_NOT_RUNNING, EXIT_UNHEALTHY = 1, 2, 3, 4


class Failed(click.ClickException):
    """An operation failed: the message goes to stderr, the exit code says what kind of failure it was."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click reads it per instance; the class value is a default

    def show(self, file: Any = None) -> None:
        click.echo(f"scaigrid-appliance: {self.message}", err=True)


CONFIG_ENVVAR = "SCAIGRID_APPLIANCE_CONFIG"
CONFIG_HELP = (f"the appliance config (KEY=VALUE lines); before or after the command; default ${CONFIG_ENVVAR}, else "
               f"{appliance_config.DEFAULT_CONFIG}")


def _config_path(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path:
    """--config after the subcommand, else before it (the group's), else $SCAIGRID_APPLIANCE_CONFIG, else the
    default: `scaigrid-appliance --config F status` and `scaigrid-appliance status --config F` are one command."""
    if value is not None:
        return value
    given = ctx.find_root().params.get("config_path")
    if given is not None:
        return Path(given)
    from_env = os.environ.get(CONFIG_ENVVAR)
    return Path(from_env) if from_env else appliance_config.DEFAULT_CONFIG


config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                             callback=_config_path, help=CONFIG_HELP)


def load(path: Path) -> Appliance:
    try:
        return appliance_config.load(path)
    except ConfigProblems as exc:
        raise Failed(problem_list(path, exc.problems), EXIT_CONFIG) from None


def checked(path: Path, root: Path = Path("/")) -> Appliance:
    """The config and the files it names (under root), every problem of both in one list; exit 2 on any."""
    appliance, problems = appliance_config.examine(path)
    named = {problem.split(":", 1)[0] for problem in problems}
    # The files are looked for only where the config says: a bad key's stand-in default would name other files.
    if appliance is not None and "APPLIANCE_CONFIG_DIR" not in named:
        problems += [p for p in appliance_config.check_files(appliance, root) if p.split(":", 1)[0] not in named]
    if appliance is None or problems:
        raise Failed(problem_list(path, problems), EXIT_CONFIG)
    return appliance


def problem_list(path: Path, problems: list[str]) -> str:
    return f"{path} has {len(problems)} problem(s):\n  " + "\n  ".join(problems)


def say(message: str) -> None:
    click.echo(message)


def supervisor_of(appliance: Appliance) -> Supervisor:
    return Supervisor(appliance.config.supervisor_socket)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="scaigrid", prog_name="scaigrid-appliance")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help=CONFIG_HELP)
def cli(config_path: Path | None) -> None:
    """Operate the ScaiGrid appliance: configure, render, run, inspect, back up, upgrade.

    \b
    Exit codes: 0 done, 1 failed, 2 bad usage or config, 3 appliance not running, 4 not healthy.
    """


@cli.command()
@config_option
@click.option("--skip-database", is_flag=True, help="do not create the database and its user (an external MariaDB)")
def init(config_path: Path, skip_database: bool) -> None:
    """First-boot set-up; safe to run again: secrets, TLS, database, render, migrate, bootstrap admin key.

    \b
    Writes a documented appliance.env first if there is none.
    Example:  scaigrid-appliance init
    """
    if not config_path.exists():
        config_path.parent.mkdir(parents=True, exist_ok=True)
        firstboot.write_example_config(config_path)
        say(f"wrote {config_path}: every key at its default, which init now applies "
            "(change keys there later, then `scaigrid-appliance render` and `restart`)")
    appliance = load(config_path)
    try:
        create_database = None if skip_database else lambda: firstboot.ensure_database(appliance)
        firstboot.run(appliance, create_database=create_database, say=say)
    except firstboot.StepFailed as exc:
        raise Failed(str(exc)) from None
    say("init done")


@cli.command("check-config")
@config_option
def check_config(config_path: Path) -> None:
    """Validate appliance.env and the files it names; print one line per problem.

    \b
    Example:  scaigrid-appliance check-config --config /etc/scaigrid/appliance.env
    """
    checked(config_path)
    say(f"{config_path}: ok")


@cli.command("render")
@config_option
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("/"), show_default=True,
              help="write under this directory instead of / (an image build)")
@click.option("--diff", "show_diff", is_flag=True, help="show what would change; write nothing")
def render_command(config_path: Path, root: Path, show_diff: bool) -> None:
    """Write supervisord, nginx, scaigrid env, Garage and Prometheus files from appliance.env.

    With --root, the secrets and TLS files the config names are read under that root too.

    \b
    Run `scaigrid-appliance restart` afterwards to apply the new files.
    Example:  scaigrid-appliance render --diff
    """
    appliance = checked(config_path, root)
    files = render.outputs(appliance, root)
    if show_diff:
        click.echo(render.diff(root, files) or "no changes", nl=False)
        return
    written = render.write(root, files, appliance.config.user)
    for path in written:
        say(f"wrote {path}")
    say(f"{len(written)} file(s) changed, {len(files) - len(written)} unchanged")
    if any(path.suffix == ".conf" and path.parent.name.endswith(".service.d") for path in written):
        say("the unit's drop-in changed: run `systemctl daemon-reload` before the next restart")
    if written:
        say("apply with `scaigrid-appliance restart` (or `systemctl restart scaigrid-appliance`)")


def program_rows(appliance: Appliance) -> list[dict[str, Any]]:
    """Each process's supervisord state and uptime, its readiness probe, and its recorded FATALs."""
    # Ports and graces do not depend on secrets: status works (and says what is down) even before init.
    ctx = Context(appliance, appliance.settings())
    expected = {process.name: process for process in processes(ctx)}
    infos = {info.name: info for info in supervisor_of(appliance).processes()}
    recorded = logs.recorded_states(appliance)

    def row(name: str) -> dict[str, Any]:
        info = infos.get(name)
        state = info.state if info else "ABSENT"  # rendered, but supervisord has not loaded it (render, no restart)
        process = expected.get(name)
        ready = process.program.ready(ctx, process.index, info.pid) if process and info and state == "RUNNING" else None
        history = recorded.get(name, {})
        return {"name": name, "program": process.program.name if process else info.group if info else name,
                "state": state, "pid": info.pid if info else None,
                "uptime_s": round(info.uptime_s) if info and info.uptime_s is not None else None,
                "ready": ready, "fatal_count": history.get("fatal_count", 0),
                "last_fatal_at": history.get("last_fatal_at")}

    names = [*expected, *(name for name in infos if name not in expected)]
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        return list(pool.map(row, names))


def _duration(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def status(config_path: Path, as_json: bool) -> None:
    """Each program's state, uptime and readiness, and the hybrid link's state when enrolled; exit 4 unless all
    programs are RUNNING and ready (a link that is down does not change the exit code).

    \b
    Example:  scaigrid-appliance status --json | jq '.programs[] | select(.ready == false)'
    """
    appliance = load(config_path)
    try:
        rows = program_rows(appliance)
    except SupervisorUnavailable as exc:
        if as_json:
            click.echo(json.dumps({"running": False, "error": str(exc), "programs": []}))
        raise Failed(str(exc), EXIT_NOT_RUNNING) from None
    is_healthy = healthy(rows)  # the link's state is reported, never judged: the appliance serves without it
    link_state = (link_module.local_state(appliance, appliance.settings().server.http_port)
                  if appliance.enrolled else None)
    if as_json:
        click.echo(json.dumps({"running": True, "healthy": is_healthy, "programs": rows, "link": link_state},
                              indent=2))
    else:
        click.echo(f"{'PROGRAM':<14}{'STATE':<10}{'UPTIME':<10}{'READY':<7}FATAL (recorded)")
        for row in rows:
            ready = {True: "yes", False: "NO", None: "-"}[row["ready"]]
            fatal = "-"
            if row["fatal_count"]:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["last_fatal_at"]))
                fatal = f"{row['fatal_count']}x, last {when}"
            click.echo(f"{row['name']:<14}{row['state']:<10}{_duration(row['uptime_s']):<10}{ready:<7}{fatal}")
        if link_state is not None:
            click.echo(f"link: {link_module.describe(link_state, time.time())}")
    if not is_healthy:
        sys.exit(EXIT_UNHEALTHY)


def program_argument(required: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.argument("program", required=required)


def _target(appliance: Appliance, name: str | None) -> tuple[str, list[str]] | None:
    """What NAME means to supervisord: a program (every process of it: `http`), one process (`http_2`) or the event
    listener; and the names of the processes (their logs). None for all programs."""
    if name is None:
        return None
    ctx = Context(appliance, appliance.settings())
    known = []
    for program in enabled_programs(ctx):
        names = program.process_names(ctx)
        if name == program.name:
            return (f"{name}:*" if program.processes is not None else name), names
        if name in names:
            return f"{program.name}:{name}", [name]
        known.append(program.name if program.processes is None else f"{program.name} ({', '.join(names)})")
    if name == EVENTS_NAME:
        return name, [name]
    raise Failed(f"no program {name!r}; the programs are: {', '.join([*known, EVENTS_NAME])}", EXIT_CONFIG)


def _control(config_path: Path, program: str | None, actions: tuple[str, ...]) -> None:
    appliance = load(config_path)
    target = _target(appliance, program)
    supervisor = supervisor_of(appliance)
    shown = program or "all programs"
    try:
        for action in actions:
            say(f"{action} {shown} ...")
            getattr(supervisor, action)(target[0] if target else None)
    except SupervisorUnavailable as exc:
        raise Failed(str(exc), EXIT_NOT_RUNNING) from None
    except xmlrpc.client.Fault as exc:  # e.g. a program that will not start (SPAWN_ERROR)
        raise Failed(f"{shown}: {exc.faultString}") from None
    say("done")


@cli.command()
@config_option
@program_argument()
def start(config_path: Path, program: str | None) -> None:
    """Start one program (all its processes), one process (e.g. http_2), or all (through supervisord).

    \b
    Example:  scaigrid-appliance start worker
    """
    _control(config_path, program, ("start",))


@cli.command()
@config_option
@program_argument()
def stop(config_path: Path, program: str | None) -> None:
    """Stop one program (all its processes), one process (e.g. http_2), or all; each drains within its grace period.

    \b
    Example:  scaigrid-appliance stop bunker_proxy
    """
    _control(config_path, program, ("stop",))


@cli.command()
@config_option
@program_argument()
def restart(config_path: Path, program: str | None) -> None:
    """Restart one program (all its processes at once), one process (e.g. http_2), or all (stop, drain, start).

    \b
    Example:  scaigrid-appliance restart http
    """
    _control(config_path, program, ("stop", "start"))


@cli.command("logs")
@config_option
@program_argument()
@click.option("-n", "--lines", default=50, show_default=True, help="lines to show from the end of each log")
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines (Ctrl-C stops)")
def logs_command(config_path: Path, program: str | None, lines: int, follow: bool) -> None:
    """Show a process's log, a program's (each of its processes'), or all of them, optionally following.

    \b
    Example:  scaigrid-appliance logs http -f
    """
    appliance = load(config_path)
    target = _target(appliance, program)
    names = target[1] if target else [p.name for p in processes(Context(appliance, appliance.settings()))]
    paths = {n: appliance.config.log_dir / f"{n}.log" for n in names}
    logs.show(paths, lines, follow, prefix=len(names) > 1)


@cli.command()
@config_option
def migrate(config_path: Path) -> None:
    """Run the database migrations (core, then each module); the appliance unit does this on every start.

    \b
    Example:  scaigrid-appliance migrate
    """
    appliance = load(config_path)
    try:
        firstboot.migrate(appliance, say)
    except firstboot.StepFailed as exc:
        raise Failed(str(exc)) from None


def _maintenance(work: Callable[[], object]) -> None:
    """Runs a maintenance operation, its failures mapped to the exit codes above."""
    try:
        work()
    except Unhealthy as exc:
        raise Failed(str(exc), EXIT_UNHEALTHY) from None
    except MaintenanceFailed as exc:
        raise Failed(str(exc)) from None
    except SupervisorUnavailable as exc:
        raise Failed(str(exc), EXIT_NOT_RUNNING) from None


output_option = click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
                             help="the archive to write (default: under STATE_DIR, named by version and UTC time)")


@cli.command("backup")
@config_option
@output_option
def backup_command(config_path: Path, output: Path | None) -> None:
    """Back up the database, appliance.env, secrets and TLS files into one tar.gz with a manifest.

    \b
    The archive (0600) holds the secrets: keep it as safe as the appliance itself.
    Default: STATE_DIR/backups/scaigrid-VERSION-UTCTIME.tar.gz.
    Example:  scaigrid-appliance backup --output /srv/backups/scaigrid-$(date +%F).tar.gz
    """
    appliance = load(config_path)
    _maintenance(lambda: backup.backup(appliance, say=say, output=output))


@cli.command("restore")
@config_option
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--yes", is_flag=True, help="do not ask before replacing the current state")
def restore_command(config_path: Path, archive: Path, yes: bool) -> None:
    """Restore a backup: stop, put back files and database, render, migrate, start, check health.

    \b
    Refuses, changing nothing, a damaged archive, one from another ScaiGrid version, or one the appliance
    would not start with (TLS files, secrets).
    Backs up the current state first (STATE_DIR/backups/...-pre-restore.tar.gz).
    Exit 1: refused, nothing changed; or a step failed (the message names the pre-restore archive).
    Exit 4: restored, but not every program became running and ready.
    Example:  scaigrid-appliance restore /var/lib/scaigrid/backups/scaigrid-0.1.0-20250101T020000Z.tar.gz
    """
    appliance = load(config_path)
    _maintenance(lambda: restore.restore(appliance, archive, say=say,
                                         confirm=lambda question: yes or click.confirm(question)))


@cli.command("support-bundle")
@config_option
@output_option
@click.option("-n", "--lines", default=support_bundle.SUPPORT_LOG_LINES, show_default=True,
              help="lines from the end of each log")
def support_bundle_command(config_path: Path, output: Path | None, lines: int) -> None:
    """Collect configs (secrets redacted), recent logs, versions and status into a tar.gz for support.

    \b
    Holds no secret and no TLS private key. Default: STATE_DIR/support/scaigrid-support-UTCTIME.tar.gz.
    Example:  scaigrid-appliance support-bundle --output /tmp/support.tar.gz
    """
    appliance = load(config_path)
    _maintenance(lambda: support_bundle.support_bundle(appliance, say=say, output=output, log_lines=lines))


@cli.command("upgrade")
@config_option
@click.argument("package", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def upgrade_command(config_path: Path, package: Path) -> None:
    """Upgrade to a scaigrid wheel: stop, backup, install, migrate, start, health gate.

    \b
    If a step after the backup fails, or the programs are not running and ready in time, it rolls back to the
    previous wheel (APPLIANCE_VENV/../wheels/current) and its packages, and, if migrate had begun, to the
    database of the backup (what the new version wrote is lost); exit 4.
    Exit 1: refused, nothing changed; or the backup or the rollback failed (the message says what to run).
    Example:  scaigrid-appliance upgrade scaigrid-0.2.0-py3-none-any.whl
    """
    appliance = load(config_path)
    _maintenance(lambda: upgrade.upgrade(appliance, package, say=say))


@cli.group()
def link() -> None:
    """The hybrid link: enrol this appliance with a managed ScaiGrid, check, rotate or leave (docs/hybrid.md).

    \b
    Example:  scaigrid-appliance link status
    """


@link.command("enroll")
@config_option
@click.option("--url", required=True, help="the managed ScaiGrid, https://...")
@click.option("--token", required=True, help="the enrolment token its admin minted (single use)")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), help="CA bundle that signs the managed "
              "side's TLS certificate (default: the system CAs)")
@click.option("--name", help="this appliance's name on the managed side (default: APPLIANCE_HOSTNAME)")
@click.option("--link-target", metavar="HOST:PORT", help="the managed side's gRPC TLS endpoint the link dials "
              f"(default: the URL's host, port {link_module.DEFAULT_LINK_PORT})")
def link_enroll(config_path: Path, url: str, token: str, ca_file: str | None, name: str | None,
                link_target: str | None) -> None:
    """Exchange an enrolment token for a node id and credential (stored 0600 in CONFIG_DIR/secrets/link.json),
    then run the appliance as a node: render, and restart every program with the link program added.

    \b
    The credential is never printed. Exit 1: refused (the managed side's code and message), unreachable,
    already enrolled, or enrolled but a program would not restart (the message says which).
    Example:  scaigrid-appliance link enroll --url https://grid.example.com --token sget_... --ca-file ca.pem
    """
    from scaigrid import __version__

    appliance = load(config_path)
    try:
        enrolled = link_module.enroll(appliance, url, token, ca_file, name or appliance.config.hostname, __version__,
                                      link_target)
    except link_module.LinkError as exc:
        raise Failed(str(exc)) from None
    say(f"enrolled as {enrolled.node_id} with {enrolled.url}; credential in {appliance.config.link_file}")
    _apply_link(appliance)


@link.command("status")
@config_option
@click.option("--json", "as_json", is_flag=True, help="one JSON object instead of lines")
def link_status(config_path: Path, as_json: bool) -> None:
    """Whether this appliance is enrolled, where, and whether the managed side accepts its credential now.

    \b
    Exit 0: enrolled and accepted; 1: not enrolled, or the managed side refuses or cannot be reached.
    Example:  scaigrid-appliance link status --json
    """
    appliance = load(config_path)
    current = link_module.read(appliance)
    state: dict[str, Any] = {"enrolled": current is not None, "url": None, "node_id": None, "accepted": False,
                             "problem": None}
    if current is None:
        state["problem"] = "not enrolled"
    else:
        state.update(url=current.url, node_id=current.node_id)
        try:
            link_module.check(current)
            state["accepted"] = True
        except link_module.LinkError as exc:
            state["problem"] = str(exc)
    if as_json:
        say(json.dumps(state))
    elif current is None:
        say("not enrolled")
    else:
        say(f"enrolled as {current.node_id} with {current.url}")
        say("credential accepted" if state["accepted"] else f"credential NOT accepted: {state['problem']}")
    if not state["accepted"]:
        sys.exit(EXIT_FAILED)


@link.command("rotate")
@config_option
def link_rotate(config_path: Path) -> None:
    """Replace the node credential: get a new one, save it, switch to it (the old one is revoked at the switch).

    \b
    Exit 1: not enrolled, or the managed side refused or could not be reached.
    Example:  scaigrid-appliance link rotate
    """
    appliance = load(config_path)
    before = link_module.read(appliance)
    try:
        rotated = link_module.rotate(appliance)
    except link_module.LinkError as exc:
        if link_module.read(appliance) != before:
            # Saved, but its first use (the check) failed, maybe after the switch revoked the old one: the link
            # program takes the saved one, as any later render would, and its first use switches just as well.
            _apply_link(appliance)
            raise Failed(f"{exc} (the new credential is saved and the programs use it)") from None
        raise Failed(str(exc)) from None
    say(f"credential of {rotated.node_id} rotated; the old one is revoked")
    _apply_link(appliance)


@link.command("unenroll")
@config_option
@click.option("--force", is_flag=True, help="remove the local link even if the managed side cannot be told")
def link_unenroll(config_path: Path, force: bool) -> None:
    """Leave the managed side (it revokes this node), remove the local credential, take back what the link mirrored
    (managed keys stop working here, managed models go), then restart as a standalone appliance.

    \b
    Exit 1: not enrolled, or the managed side could not be told (nothing changed; --force removes locally), or
    the mirror could not be taken back (the message says what to run once the database is back).
    Example:  scaigrid-appliance link unenroll
    """
    appliance = load(config_path)
    try:
        current = link_module.enrolled(appliance)
    except link_module.LinkError as exc:
        raise Failed(str(exc)) from None
    try:
        told = link_module.unenroll(appliance, force=force)
    except link_module.LinkError as exc:
        raise Failed(f"{exc} (nothing changed; --force removes the local link anyway)") from None
    if told:
        say(f"unenrolled: {current.node_id} revoked on {current.url}, local credential removed")
    else:
        say(f"local link removed; the managed side was not told and still has {current.node_id}: revoke it there")
    problem = _forget_mirror(appliance)
    _apply_link(appliance)
    if problem is not None:
        raise Failed(problem)


def _forget_mirror(appliance: Appliance) -> str | None:
    """Runs `scaigrid admin hybrid-forget` on the appliance's env, its output said; what went wrong, or None.

    The link program is stopped first: a snapshot it applied after the forget would bring the mirror back.
    """
    if not appliance.config.firstboot_marker.exists():
        return None  # never initialised: no database, so nothing was mirrored
    # supervisord down, or no link program: then nothing applies a snapshot anyway.
    with contextlib.suppress(SupervisorUnavailable, xmlrpc.client.Fault):
        supervisor_of(appliance).stop("link")
    result = firstboot.scaigrid(appliance, "admin", "hybrid-forget")
    for line in result.stdout.splitlines():
        say(line)
    if result.returncode == 0:
        return None
    command = shlex.join(scaigrid_argv(appliance.config, "admin", "hybrid-forget"))
    return (f"the managed mirror was not taken back, so managed keys still work here (exit {result.returncode}: "
            f"{result.stderr.strip()}); once the database is reachable, run: {command}")


def _apply_link(appliance: Appliance) -> None:
    """Renders the link's settings into scaigrid.env and, when supervisord runs, restarts the whole appliance with
    them: every program reads them (the role, and the credential the http processes verify tunnelled callers with),
    and the link program is added or removed."""
    if not appliance.config.firstboot_marker.exists():
        say("not initialised: `scaigrid-appliance init` renders the link's settings")
        return
    written = render.write(Path("/"), render.outputs(appliance), appliance.config.user)
    say(f"rendered {len(written)} file(s)")
    supervisor = supervisor_of(appliance)
    try:
        role = "a node" if appliance.enrolled else "a standalone appliance"
        say(f"restarting every program to run as {role} (the API pauses for a few seconds) ...")
        supervisor.stop()
        supervisor.start()
    except SupervisorUnavailable:
        say("supervisord is not running: the programs pick this up when the appliance starts")
        return
    except xmlrpc.client.Fault as exc:
        raise Failed(f"applying the link: {exc.faultString}") from None
    say("done; `scaigrid-appliance status` shows the link" if appliance.enrolled else "done")


@cli.command("supervisor-events", hidden=True)
@click.option("--states-file", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--port", type=int, required=True)
@click.option("--filesystem", "filesystems", type=click.Path(path_type=Path), multiple=True,
              help="a directory whose filesystem's free space is served as metrics (repeatable)")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="the certificate whose expiry is served as a metric")
def supervisor_events(states_file: Path, port: int, filesystems: tuple[Path, ...], tls_cert: Path | None) -> None:
    """Run as supervisord's event listener (the rendered supervisord.conf starts it).

    It runs as the service user, who may not read appliance.env (0600, root's): render passes what it needs.
    """
    from appliance import events

    events.run(states_file, port, filesystems, tls_cert)


def main() -> None:
    cli(prog_name="scaigrid-appliance")
