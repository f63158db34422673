"""Talks to the appliance's supervisord over its XML-RPC unix socket (what supervisorctl does, without the shell)."""

from __future__ import annotations

import http.client
import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import Faults, SupervisorTransport

SUPERVISORD = "/usr/bin/supervisord"  # Debian's: the unit, make run and the tests all run this one
# supervisord's states of a process that is on its way up or down (supervisor.states.ProcessStates).
MOVING_STATES = ("STARTING", "STOPPING", "BACKOFF")
STOP_POLL_S = 0.2


class SupervisorUnavailable(Exception):
    """supervisord is not running, or its socket is not ours to use."""


@dataclass(frozen=True)
class ProcessInfo:
    name: str
    group: str  # the program's name: its own for a program of one process
    state: str
    pid: int
    uptime_s: float | None  # None unless RUNNING

    @classmethod
    def from_rpc(cls, info: dict[str, Any]) -> ProcessInfo:
        running = info["statename"] == "RUNNING"
        return cls(info["name"], info["group"], info["statename"], info["pid"],
                   float(info["now"] - info["start"]) if running else None)


class Supervisor:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    def _call(self, method: str, *args: Any) -> Any:
        # A fresh connection per call: the transport's kept connection is unusable after any error.
        transport = SupervisorTransport(None, None, f"unix://{self.socket_path}")
        # The host part is ignored: the transport always dials the unix socket.
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        try:
            return getattr(proxy.supervisor, method)(*args)
        except (OSError, xmlrpc.client.ProtocolError, http.client.HTTPException) as exc:
            raise SupervisorUnavailable(
                f"cannot reach supervisord at {self.socket_path} ({exc}); is scaigrid-appliance.service running?"
            ) from None
        finally:
            transport.close()

    def processes(self) -> list[ProcessInfo]:
        return [ProcessInfo.from_rpc(info) for info in self._call("getAllProcessInfo")]

    def start(self, name: str | None = None) -> None:
        """Starts a process or a group (supervisord's `group:process`, `group:*`), or all after loading a re-rendered
        config; one already running is left alone."""
        if name is not None:
            self._tolerating("ALREADY_STARTED", "startProcess", name, True)
            return
        self.reread_and_update()
        self._call("startAllProcesses", True)  # in priority order: nginx before the programs it fronts

    def stop(self, name: str | None = None, timeout_s: float = 600) -> None:
        """Stops a process or a group (its processes at once, each draining), or all in reverse priority; one already
        stopped is left alone.

        supervisord's own stopAllProcesses signals every process at once; stopping tier by tier keeps nginx
        relaying the programs' last streams while they drain, and the event listener recording it all.
        """
        if name is not None:
            self._tolerating("NOT_RUNNING", "stopProcess", name, True)
            return
        tiers: dict[int, list[str]] = {}
        for info in self._call("getAllConfigInfo"):
            if not info["inuse"]:
                continue  # in the config file but not loaded (rendered, not yet applied): nothing runs
            tiers.setdefault(info["process_prio"], []).append(f"{info['group']}:{info['name']}")
        deadline = time.monotonic() + timeout_s
        for priority in sorted(tiers, reverse=True):
            for full_name in tiers[priority]:
                self._tolerating("NOT_RUNNING", "stopProcess", full_name, False)
            while any(self._call("getProcessInfo", n)["statename"] in MOVING_STATES for n in tiers[priority]):
                if time.monotonic() > deadline:
                    break  # supervisord SIGKILLs what outlives its stopwaitsecs; we only stop waiting
                time.sleep(STOP_POLL_S)

    def _tolerating(self, fault: str, method: str, *args: Any) -> None:
        try:
            results = self._call(method, *args)
        except xmlrpc.client.Fault as exc:
            if fault not in exc.faultString:
                raise
            return
        # A group's call answers with one result per process instead of raising.
        for result in results if isinstance(results, list) else []:
            if result["status"] not in (Faults.SUCCESS, getattr(Faults, fault)):
                raise xmlrpc.client.Fault(result["status"], f"{result['group']}:{result['name']}: "
                                                            f"{result['description']}")

    def reread_and_update(self) -> list[str]:
        """Applies a re-rendered supervisord.conf: added programs start, removed ones stop, changed ones restart."""
        added, changed, removed = self._call("reloadConfig")[0]
        for name in removed + changed:
            self._call("stopProcessGroup", name, True)
            self._call("removeProcessGroup", name)
        for name in added + changed:
            self._call("addProcessGroup", name)
        return sorted(added + changed + removed)

    def wait_until_up(self, timeout_s: float) -> bool:
        """True once supervisord answers on its socket."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self._call("getState")
                return True
            except SupervisorUnavailable:
                time.sleep(0.2)
        return False
