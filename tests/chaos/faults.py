"""The fault table: each fault is injected into a running appliance under load, held, and undone.

A fault's `inject` returns the time (time.monotonic()) the fault was undone: the kill itself for a killed process
(supervisord's restart is part of the recovery), the start of a stopped server, the gate opened, the filler file
deleted. From then on the run measures recovery.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance import devstack
from appliance.local import child_env
from appliance.programs import PROGRAMS, Context
from tests.chaos.load import CUT, LIMITED, STALL
from tests.support.waiting import eventually

if TYPE_CHECKING:
    from tests.chaos.run import Bench

RESTART_TIMEOUT_S = 60


@dataclass(frozen=True)
class Fault:
    name: str
    kind: str  # the fault's class: the short run injects the first fault of each
    expected: str  # the behaviour docs/reliability.md documents for it
    inject: Callable[[Bench, float], float]  # (bench, hold_s) -> when the fault was undone
    cuts_streams: bool = False  # kills the process that serves streams: those open on it break (run.cut_by_kill)


# --- programs ---

def pid_of(bench: Bench, name: str) -> int:
    [info] = [info for info in bench.stack.supervisor.processes() if info.name == name]
    return info.pid if info.state == "RUNNING" else 0


def kill_process(name: str) -> Callable[[Bench, float], float]:
    def inject(bench: Bench, hold_s: float) -> float:
        pid = pid_of(bench, name)
        assert pid, f"{name} is not running"
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        # Readiness is measured from the kill; supervisord must first have seen it.
        eventually(lambda: pid_of(bench, name) != pid, f"supervisord saw {name} die", RESTART_TIMEOUT_S)
        return killed
    return inject


# --- MariaDB, Redis, S3 ---

def mariadb_stopped(bench: Bench, hold_s: float) -> float:
    """A clean stop (SIGTERM, as systemctl stop mariadb), then a start on the same data and port."""
    port = bench.mariadb.port
    bench.mariadb.stop()
    time.sleep(hold_s)
    undone = time.monotonic()
    bench.mariadb = devstack.start_mariadb(bench.var / "mariadb", port)
    return undone


def mariadb_killed(bench: Bench, hold_s: float) -> float:
    """kill -9: InnoDB's crash recovery on the next start."""
    port = bench.mariadb.port
    bench.mariadb.process.kill()
    bench.mariadb.process.wait()
    undone = time.monotonic()
    bench.mariadb = devstack.start_mariadb(bench.var / "mariadb", port)
    return undone


def redis_stopped(bench: Bench, hold_s: float) -> float:
    """A clean stop that saves (as Debian's redis-server does), then a start that loads what was saved."""
    port = bench.redis.port
    with contextlib.suppress(Exception):  # SHUTDOWN answers by closing the connection
        bench.redis_client().shutdown(save=True)
    bench.redis.process.wait(30)
    time.sleep(hold_s)
    undone = time.monotonic()
    bench.redis = devstack.start_redis(bench.var / "redis", port)
    return undone


def redis_emptied(bench: Bench, hold_s: float) -> float:
    """kill -9 and no dump: Redis comes back with no data at all (buffered usage, counters, limits, locks gone)."""
    port = bench.redis.port
    bench.redis.process.kill()
    bench.redis.process.wait()
    (bench.var / "redis" / "dump.rdb").unlink(missing_ok=True)
    undone = time.monotonic()
    bench.redis = devstack.start_redis(bench.var / "redis", port)
    return undone


def s3_stopped(bench: Bench, hold_s: float) -> float:
    """S3 refuses connections (and open ones are reset) for hold_s. The gate stands in for stopping the server:
    moto keeps objects only in memory, where Garage would keep them on disk through a restart."""
    bench.s3_gate.close()
    time.sleep(hold_s)
    bench.s3_gate.open()
    return time.monotonic()


# --- upstream models ---

def upstream(model: str) -> Callable[[Bench, float], float]:
    """Half the chat traffic goes to a model whose backend misbehaves, for hold_s."""
    def inject(bench: Bench, hold_s: float) -> float:
        bench.traffic.mix({model: 0.5})
        try:
            time.sleep(hold_s)
        finally:
            bench.traffic.mix()
        return time.monotonic()
    return inject


# --- the machine ---

def filesystem_full(directory: str) -> Callable[[Bench, float], float]:
    """The tmpfs under the stack's log (or state) directory filled to the last byte for hold_s."""
    def inject(bench: Bench, hold_s: float) -> float:
        path = Path(getattr(bench.stack.config, directory)) / "chaos-filler"
        with path.open("wb", buffering=0) as filler:  # unbuffered: ENOSPC comes from write, never from close
            for block in (1 << 20, 4096, 1):
                with contextlib.suppress(OSError):  # ENOSPC: full at this block size; then smaller ones
                    while filler.write(b"\0" * block):
                        pass
        try:
            time.sleep(hold_s)
        finally:
            path.unlink()
        return time.monotonic()
    return inject


def clock_stepped(offset: str) -> Callable[[Bench, float], float]:
    """worker_2 replaced, for hold_s, by the same worker whose clock (libfaketime, this process alone) is `offset`
    from everybody else's; then worker_2 again."""
    def inject(bench: Bench, hold_s: float) -> float:
        appliance = bench.stack.appliance
        ctx = Context(appliance, appliance.settings())
        [worker] = [program for program in PROGRAMS if program.name == "worker"]
        bench.stack.supervisor.stop("worker:worker_2")
        env = {**child_env(), **worker.environment(ctx, 1)}
        log = appliance.config.log_dir / "worker_faked.log"
        with log.open("ab") as out:
            faked = subprocess.Popen(["faketime", "-f", offset, *shlex.split(worker.command(ctx))], env=env,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            time.sleep(hold_s)
        finally:
            # To its whole group: faketime runs the worker as its child, and passes no signal on.
            os.killpg(faked.pid, signal.SIGTERM)
            try:
                # poll() reaps faketime, which would otherwise stay in the group as a zombie.
                eventually(lambda: faked.poll() is not None and not _group_alive(faked.pid), "the faked worker "
                           "stopped", 60)
            except AssertionError:
                os.killpg(faked.pid, signal.SIGKILL)
            faked.wait()
            bench.stack.supervisor.start("worker:worker_2")
        return time.monotonic()
    return inject


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


# --- the hybrid link ---

def link_cut(bench: Bench, hold_s: float) -> float:
    """The node's link to the managed side refused for hold_s while the node keeps serving and recording usage,
    of its own tenants (the load) and of a managed tenant, whose usage must then reach the managed side once."""
    from tests.chaos.run import relay_chat

    bench.link_gate.close()
    until = time.monotonic() + hold_s
    while time.monotonic() < until:
        if request_id := relay_chat(bench.stack, bench.hq_key):
            bench.relayed.append(request_id)
        time.sleep(0.5)
    bench.link_gate.open()
    return time.monotonic()


PROGRAM_DEATH = ("restarted by supervisord; its requests in flight fail documented (nginx: UPSTREAM_UNAVAILABLE), "
                 "its open streams end unfinished")
OUTAGE = "what needs it fails documented or waits; usage and events arrive once it is back"


def table(processes: list[str], *, enrolled: bool, hold_s: float, link_hold_s: float) -> list[Fault]:
    """Every fault, in the order they run; `processes` are supervisord's process names (nginx and the listener too)."""
    # The http processes first: the short run kills one of those, which carry the load.
    ordered = sorted(processes, key=lambda name: not name.startswith("http_"))
    kills = [Fault(f"kill -9 {name}", "program", PROGRAM_DEATH, kill_process(name),
                   cuts_streams=name.startswith("http_")) for name in ordered if enrolled or name != "link"]
    return [
        *kills,
        Fault("MariaDB kill -9 and restart", "mariadb", OUTAGE + "; InnoDB recovers every committed row",
              mariadb_killed),
        Fault(f"MariaDB stopped {hold_s:g} s", "mariadb", OUTAGE, mariadb_stopped),
        Fault("Redis restarted empty", "redis",
              "limits start again from zero; counters seeded again from MariaDB; buffered usage written again by "
              "the http processes that pushed it", redis_emptied),
        Fault(f"Redis stopped {hold_s:g} s", "redis", "requests go on unlimited; usage goes to MariaDB directly",
              redis_stopped),
        Fault(f"S3 stopped {hold_s:g} s", "s3", OUTAGE, s3_stopped),
        Fault("upstream cuts streams", "upstream",
              "BACKEND_ERROR (an error frame mid-stream), never a silent end", upstream(CUT)),
        Fault("upstream stalls past the timeout", "upstream", "BACKEND_TIMEOUT (an error frame mid-stream)",
              upstream(STALL)),
        Fault("upstream answers 429", "upstream", "BACKEND_RATE_LIMITED with Retry-After",
              upstream(LIMITED)),
        Fault("log filesystem full", "disk", "served; log lines dropped",
              filesystem_full("log_dir")),
        Fault("state filesystem full", "disk",
              "served (uploads are streamed, never buffered to disk)", filesystem_full("state_dir")),
        Fault("clock +5 min on one worker", "clock",
              "jobs stay exclusive (locks, not clocks); nothing doubled", clock_stepped("+5m")),
        Fault("clock -5 min on one worker", "clock",
              "jobs stay exclusive (locks, not clocks); nothing doubled", clock_stepped("-5m")),
        *([Fault(f"link cut {link_hold_s:g} s", "link",
                 "the node serves on; usage waits in the outbox, reaches the managed side once",
                 lambda bench, hold: link_cut(bench, link_hold_s))] if enrolled else []),
    ]


def short(faults: list[Fault]) -> list[Fault]:
    """The first fault of each class."""
    seen: set[str] = set()
    chosen = []
    for fault in faults:
        if fault.kind not in seen:
            seen.add(fault.kind)
            chosen.append(fault)
    return chosen

