"""The `scaigrid` command as an operator runs it: one-shot commands, and `run --mode MODE` processes with a log."""

import json
import signal
import subprocess
import sys
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from appliance import devstack
from appliance.local import child_env
from tests.support.http import http_ok
from tests.support.waiting import eventually

REPO = Path(__file__).resolve().parents[2]


def command_env(env: dict[str, str]) -> dict[str, str]:
    """The test's settings on top of a minimal environment (no stray SCAIGRID_* or DATABASE_URL from the host)."""
    # Warnings are errors in the processes under test too, as in pytest itself.
    return {**child_env(), "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "error", **env}


def scaigrid(*args: str, env: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """Runs `python -m scaigrid ARGS` to completion."""
    return subprocess.run([sys.executable, "-m", "scaigrid", *args], env=command_env(env), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout_s, check=False)


@dataclass
class ModeProcess:
    """A `scaigrid run --mode MODE` subprocess whose stdout (JSON log lines) goes to a file."""

    mode: str
    process: subprocess.Popen[bytes]
    log_path: Path
    signalled: bool = field(default=False)

    def log_lines(self) -> list[dict[str, object]]:
        lines = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                lines.append({"raw": raw})
        return lines

    def wait_for(self, condition: Callable[[], bool], timeout_s: float = 30, what: str = "condition") -> None:
        """`eventually(condition)` while the process runs: its exit fails at once, and any failure shows its log."""
        def running_and_reached() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.mode} exited with {self.process.returncode} before {what}:\n{self.tail()}")
            return condition()

        eventually(running_and_reached, f"{self.mode}: {what}", timeout_s=timeout_s, interval_s=0.1,
                   ignoring=(OSError, urllib.error.URLError, grpc.RpcError), context=self.tail)  # not up yet

    def send(self, sig: int = signal.SIGTERM) -> None:
        self.signalled = True
        self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        """Sends `sig` (once: a second SIGTERM means "stop now") and returns the exit status."""
        if self.process.poll() is None and not self.signalled:
            self.send(sig)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"{self.mode} did not exit within {timeout_s} s of {sig}:\n{self.tail()}") from None

    def tail(self) -> str:
        return devstack.log_tail(self.log_path)


def start_mode_process(mode: str, env: dict[str, str], log_path: Path) -> ModeProcess:
    """Starts `scaigrid run --mode MODE` with its output going to log_path."""
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "scaigrid", "run", "--mode", mode],
                                   env=command_env(env), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return ModeProcess(mode, process, log_path)


def start_http(start_mode: Callable[..., ModeProcess], env: dict[str, str]) -> ModeProcess:
    """An http mode process, returned once /health/ready says ready."""
    process = start_mode("http", env)
    process.wait_for(lambda: http_ok(f"http://127.0.0.1:{env['HTTP_PORT']}/health/ready"), what="readiness")
    return process
