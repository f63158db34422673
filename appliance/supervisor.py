"""Talks to the appliance's supervisord over its XML-RPC unix socket (what supervisorctl does, without the shell)."""

from __future__ import annotations

import http.client
import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

# supervisord's process states (supervisor.states.ProcessStates) that mean the program is not coming back by itself.
STOPPED_STATES = ("STOPPED", "EXITED", "FATAL", "UNKNOWN")


class SupervisorUnavailable(Exception):
    """supervisord is not running, or its socket is not ours to use."""


@dataclass(frozen=True)
class ProcessInfo:
    name: str
    state: str
    pid: int
    uptime_s: float | None  # None unless RUNNING
    description: str
    exit_status: int

    @classmethod
    def from_rpc(cls, info: dict[str, Any]) -> ProcessInfo:
        running = info["statename"] == "RUNNING"
        return cls(info["name"], info["statename"], info["pid"],
                   float(info["now"] - info["start"]) if running else None, info["description"], info["exitstatus"])


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
        if name is None:
            self._call("startAllProcesses", True)
        else:
            self._call("startProcess", name, True)

    def stop(self, name: str | None = None) -> None:
        if name is None:
            self._call("stopAllProcesses", True)
        else:
            self._call("stopProcess", name, True)

    def signal(self, name: str, signal_name: str) -> None:
        self._call("signalProcess", name, signal_name)

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

    def shutdown(self) -> None:
        self._call("shutdown")


def is_fault(exc: BaseException, *names: str) -> bool:
    """Whether exc is supervisord's Fault of one of the given names (e.g. BAD_NAME, ALREADY_STARTED)."""
    return isinstance(exc, xmlrpc.client.Fault) and any(name in exc.faultString for name in names)
