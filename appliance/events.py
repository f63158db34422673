"""supervisord event listener: records every program's state, keeps FATAL ones across restarts, serves them as metrics,
with the appliance's free disk space and its TLS certificate's expiry beside them (the alerting rules watch both).

supervisord speaks to it over stdin/stdout (its event listener protocol), so it logs to stderr only.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from supervisor import childutils

logger = logging.getLogger(__name__)

# The states a process enters when it ended on its own (killed, crashed), not stopped by supervisord: EXITED after it
# had been RUNNING, BACKOFF when it died while STARTING, FATAL when supervisord gave up. Their counters exist at 0 from
# the start: Prometheus' increase() sees no rise in a series whose first sample is already 1, so a program's first
# crash would go unreported.
CRASH_STATES = ("EXITED", "BACKOFF", "FATAL")


class ProgramStates:
    """The last state of each program, and when each last went FATAL, persisted as JSON after every change."""

    def __init__(self, path: Path, registry: CollectorRegistry) -> None:
        self.path = path
        self.programs: dict[str, dict[str, Any]] = read_states(path)
        self.running = Gauge("scaigrid_appliance_program_running", "1 while the program is RUNNING under supervisord",
                             ["program"], registry=registry)
        self.fatal = Counter("scaigrid_appliance_program_fatal", "times the program gave up restarting (FATAL)",
                             ["program"], registry=registry)
        self.transitions = Counter("scaigrid_appliance_program_transitions", "state changes, by state entered",
                                   ["program", "state"], registry=registry)
        for name, record in self.programs.items():
            self.running.labels(name).set(0)  # until seeded from supervisord: a recorded state may be stale
            self._count_crashes_of(name)
            if record.get("fatal_count"):
                self.fatal.labels(name)

    def _count_crashes_of(self, program: str) -> None:
        for state in CRASH_STATES:
            self.transitions.labels(program, state)

    def seed(self, current: dict[str, str]) -> None:
        """Takes the states supervisord reports now: a program RUNNING and stable sends no event to learn it from.

        A process supervisord no longer runs (http_3 after HTTP_PROCESSES went down to 2) is forgotten, so that no
        stale `running 0` is left behind to alert on.
        """
        for program in set(self.programs) - set(current):
            del self.programs[program]
            self.running.remove(program)
        for program, state in current.items():
            self.programs.setdefault(program, {"fatal_count": 0, "last_fatal_at": None})["state"] = state
            self.running.labels(program).set(1 if state == "RUNNING" else 0)
            self._count_crashes_of(program)
        write_states(self.path, self.programs)

    def record(self, program: str, state: str, now: float) -> None:
        entry = self.programs.setdefault(program, {"fatal_count": 0, "last_fatal_at": None})
        entry["state"], entry["since"] = state, now
        if state == "FATAL":
            entry["fatal_count"] += 1
            entry["last_fatal_at"] = now
            self.fatal.labels(program).inc()
            logger.warning("program %s is FATAL: supervisord gave up restarting it", program)
        self.running.labels(program).set(1 if state == "RUNNING" else 0)
        self.transitions.labels(program, state).inc()
        write_states(self.path, self.programs)


class HostCollector(Collector):
    """Free space of the appliance's filesystems and its certificate's expiry, read at each scrape."""

    def __init__(self, filesystems: Iterable[Path], certificate: Path | None) -> None:
        self.filesystems = tuple(dict.fromkeys(filesystems))
        self.certificate = certificate
        self._failing: set[str] = set()  # what could not be read at the last scrape: warned once, not every scrape

    def collect(self) -> Iterator[Metric]:
        avail = GaugeMetricFamily("scaigrid_appliance_filesystem_avail_bytes",
                                  "bytes the service user may still write on the filesystem holding the path",
                                  labels=["path"])
        size = GaugeMetricFamily("scaigrid_appliance_filesystem_size_bytes",
                                 "size of the filesystem holding the path", labels=["path"])
        for path in self.filesystems:
            try:
                stat = os.statvfs(path)
            except OSError as exc:
                self._warn(str(path), f"cannot stat {path}: {exc}")
                continue
            self._ok(str(path))
            # f_bavail, not f_bfree: the blocks root keeps in reserve are no use to the programs, which run as the
            # service user.
            avail.add_metric([str(path)], stat.f_bavail * stat.f_frsize)
            size.add_metric([str(path)], stat.f_blocks * stat.f_frsize)
        yield avail
        yield size
        expiry = GaugeMetricFamily("scaigrid_appliance_tls_certificate_expiry_timestamp_seconds",
                                   "unix time of the TLS certificate's notAfter (the first of the chain, nginx's own)",
                                   labels=["path"])
        if self.certificate is not None:
            try:
                expiry.add_metric([str(self.certificate)], certificate_expiry(self.certificate))
                self._ok(str(self.certificate))
            except (OSError, ValueError) as exc:
                self._warn(str(self.certificate), f"cannot read the certificate {self.certificate}: {exc}")
        yield expiry

    def _warn(self, what: str, message: str) -> None:
        if what not in self._failing:
            self._failing.add(what)
            logger.warning("%s; its metric is left out until it can be read", message)

    def _ok(self, what: str) -> None:
        self._failing.discard(what)


def certificate_expiry(path: Path) -> float:
    """The notAfter of the first certificate in a PEM file (a chain starts with the server's own), as unix time."""
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


def read_states(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_states(path: Path, programs: dict[str, dict[str, Any]]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(programs, indent=1, sort_keys=True))
    os.replace(temporary, path)


def listen(states: ProgramStates, stdin: TextIO, stdout: TextIO) -> None:
    while True:
        headers, payload = childutils.listener.wait(stdin, stdout)
        event = headers["eventname"]
        if event.startswith("PROCESS_STATE_"):
            fields = childutils.get_headers(payload.split("\n", 1)[0])
            states.record(fields["processname"], event.removeprefix("PROCESS_STATE_"), time.time())
        childutils.listener.ok(stdout)


def run(states_path: Path, metrics_port: int, filesystems: Iterable[Path] = (), certificate: Path | None = None
        ) -> None:
    # supervisord stops the listener with SIGTERM; that is a normal end, not a crash to warn about.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    registry = CollectorRegistry()
    states = ProgramStates(states_path, registry)
    registry.register(HostCollector(filesystems, certificate))
    try:  # supervisord tells its children where its socket is (SUPERVISOR_SERVER_URL)
        rpc = childutils.getRPCInterface(os.environ)
        states.seed({info["name"]: info["statename"] for info in rpc.supervisor.getAllProcessInfo()})
    except (KeyError, OSError) as exc:
        logger.warning("could not read the programs' current states from supervisord (%s); waiting for events", exc)
    start_http_server(metrics_port, addr="127.0.0.1", registry=registry)
    logger.info("recording program states in %s; metrics on 127.0.0.1:%d", states_path, metrics_port)
    listen(states, sys.stdin, sys.stdout)
