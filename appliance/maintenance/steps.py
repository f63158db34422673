"""Steps restore and upgrade share, run by the installed scaigrid-appliance: render, start, status, health gate."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

from appliance.config import Appliance
from appliance.maintenance.archive import MaintenanceFailed, Say, Unhealthy
from appliance.programs import healthy
from appliance.supervisor import Supervisor

HEALTH_TIMEOUT_S = 180.0
HEALTH_POLL_S = 1.0
# Restarts of one program during the health gate that mean it is crash-looping (one may be a passing hiccup).
CRASH_LOOP_RESTARTS = 2
STATUS_TIMEOUT_S = 120.0


def _installed_cli(appliance: Appliance, *args: str,
                   timeout_s: float | None = None) -> subprocess.CompletedProcess[str]:
    """Runs the installed scaigrid-appliance: after an upgrade's install, it is the new version that renders and
    judges health, not this process's already imported code."""
    argv = [str(appliance.config.venv / "bin" / "scaigrid-appliance"), *args, "--config", str(appliance.path)]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(argv, 1, "", str(exc))


def render(appliance: Appliance, say: Say) -> None:
    result = _installed_cli(appliance, "render")
    if result.returncode != 0:
        raise MaintenanceFailed(f"render failed: {(result.stderr or result.stdout).strip()}")
    say(f"rendered: {result.stdout.strip().splitlines()[-1]}")


def start(supervisor: Supervisor, say: Say) -> None:
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


def health_gate(appliance: Appliance, say: Say, *, failure: str) -> None:
    say(f"waiting up to {HEALTH_TIMEOUT_S:.0f}s for every program to be running and ready ...")
    problems = wait_healthy(appliance)
    if problems:
        raise Unhealthy(f"{failure}: " + "; ".join(problems))
    say("all programs running and ready")
