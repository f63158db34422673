"""`make chaos`: the fault table of docs/reliability.md, run on a whole appliance under steady load.

One enrolled node (the appliance under test: every program, nginx, its own MariaDB, Redis and S3) and a managed side
for its link. A mixed load (tests/chaos/load.py) flows through the node's nginx over TLS while each fault of
tests/chaos/faults.py is injected, held and undone in turn; after each, the run measures recovery, what the clients
saw, what MariaDB recorded, what the webhook receiver got, whether stored objects are intact, and which of the
appliance's alerts a real Prometheus fired. Writes var/chaos/results.jsonl (one object per fault) and results.md.

    python -m tests.chaos.run [--short] [--var DIR] [--only SUBSTRING ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import redis as redis_lib

from appliance import devstack
from appliance.cli import program_rows
from appliance.programs import healthy
from appliance.supervisor import SupervisorUnavailable
from tests.appliance_stack import ApplianceStack, start_stack
from tests.backends import GATEWAY_SETTINGS, FakeBackend
from tests.chaos import faults, load
from tests.chaos.audit import audit
from tests.chaos.gate import Gate
from tests.chaos.load import CHAT, STACK_SETTINGS, Traffic, World, prepare
from tests.hybrid_stacks import data, enroll, link_state, run_sql
from tests.support import prometheus
from tests.webhook_receiver import Receiver

REPO = Path(__file__).resolve().parents[2]
KEYS = ("fault", "attempted", "succeeded", "failed_documented", "failed_other", "usage_missing", "usage_doubled",
        "events_lost", "objects_corrupt", "recovered_s", "alert", "alert_after_s", "note")
# Short cadences, so that a record, a link loss or an alert shows within seconds, not the production minutes.
NODE_SETTINGS = {**GATEWAY_SETTINGS, **STACK_SETTINGS, "HYBRID_BACKOFF_MAX_S": "2", "HTTP_DRAIN_GRACE_S": "5"}
MANAGED_SETTINGS = {**GATEWAY_SETTINGS, "HYBRID_ROLE": "managed", "HYBRID_HEARTBEAT_INTERVAL_S": "1",
                    "HYBRID_CONFIG_REFRESH_S": "1", "USAGE_FLUSH_INTERVAL_S": "2", "HTTP_PROCESSES": "1",
                    "WORKER_PROCESSES": "1", "HTTP_DRAIN_GRACE_S": "5"}
# The load: clients, and requests a second in all (a storage turn is a PUT and a GET).
CONCURRENCY = 8
RATE_PER_S = 16.0
# tmpfs sizes of the node's log and state directories (filled on purpose by the disk faults).
LOG_FS_MIB = 256
STATE_FS_MIB = 64
RECOVERY_TIMEOUT_S = 180
# After recovery, the load goes on this long before the fault's window closes: what recovery left broken shows.
SETTLE_S = 5
# The limit of the user whose requests check, after a Redis fault, that rate limits are exact again.
LIMIT_RPM = 10
# A stream broken this soon after the kill of an http process was on it (nginx passes the break on at once).
CUT_WINDOW_S = 2.0
# How long after recovery an alert may still start firing and count for the fault (rules with a `for:`).
ALERT_WAIT_S = 30


@dataclass
class Bench:
    """The system under test, and what the faults act on (a restarted server replaces its entry)."""

    var: Path
    mariadb: devstack.MariaDB
    redis: devstack.Redis
    s3: devstack.S3Server
    s3_gate: Gate
    stack: ApplianceStack
    managed: ApplianceStack
    managed_mariadb: devstack.MariaDB
    link_gate: Gate
    traffic: Traffic
    world: World
    prometheus_url: str
    hq_key: str  # a managed tenant's key, allowed on the node: its usage there must reach the managed side
    relayed: list[str] = field(default_factory=list)  # request ids the node served hq while its link was cut

    def redis_client(self) -> redis_lib.Redis:
        return redis_lib.Redis(port=self.redis.port, socket_timeout=5)

    def not_ready(self) -> str:
        return not_ready(self.stack)


class SupervisordGone(Exception):
    """supervisord itself exited: nothing will bring the programs back, and the run cannot go on."""


def not_ready(node: ApplianceStack) -> str:
    """What keeps the node from being whole ("" when nothing): every program RUNNING and ready, the API ready
    through nginx, and the link up."""
    if node.supervisord.poll() is not None:
        raise SupervisordGone(f"supervisord exited with {node.supervisord.returncode}; see "
                              f"{node.appliance.path.parent / 'supervisord.out'}")
    try:
        rows = program_rows(node.appliance)
        if not healthy(rows):
            return "programs: " + ", ".join(f"{row['name']} {row['state']} ready={row['ready']}" for row in rows
                                            if row["state"] != "RUNNING" or not row["ready"])
        status, _ = node.get("/health/ready")
        if status != 200:
            return f"/health/ready answers {status}"
        if link_state(node).get("connected") is not True:
            return "link not connected"
    except (SupervisorUnavailable, OSError, ValueError, LookupError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def alerts_fired_since(prometheus_url: str, start: float) -> dict[str, float]:
    """Alerts (name and labels) that fired after `start` and were not yet pending or firing at it (an alert whose
    `for` began in an earlier fault is that fault's): seconds after `start` each began firing."""
    series = prometheus.api(prometheus_url, "query_range", query="ALERTS", start=f"{start - 5:.3f}",
                            end=f"{time.time():.3f}", step="1")["result"]
    seen: dict[str, float] = {}
    firing: dict[str, float] = {}
    for one in series:
        labels = {k: v for k, v in one["metric"].items() if k not in (
            "__name__", "alertstate", "alertname", "severity", "appliance", "instance")}
        name = one["metric"]["alertname"] + (
            "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}" if labels else "")
        first = float(one["values"][0][0])
        seen[name] = min(seen.get(name, first), first)
        if one["metric"]["alertstate"] == "firing":
            firing[name] = first
    return {name: round(at - start, 1) for name, at in firing.items() if seen[name] > start}


def say(message: str) -> None:
    print(f"chaos: {message}", flush=True)


def mount_tmpfs(path: Path, size_mib: int, mounts: list[Path]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(path)], check=True)
    mounts.append(path)


@contextlib.contextmanager
def bench_up(var: Path) -> Iterator[Bench]:
    """Starts everything; stops it all (and unmounts) however the run ends."""
    with contextlib.ExitStack() as cleanup:
        mounts: list[Path] = []
        cleanup.callback(lambda: [subprocess.run(["umount", "-l", str(path)], check=False) for path in mounts])
        # Last, after the orderly stops: whatever still runs from under var (programs a dead supervisord left).
        cleanup.callback(lambda: subprocess.run(["pkill", "-KILL", "-f", str(var)], check=False))
        mount_tmpfs(var / "node" / "log", LOG_FS_MIB, mounts)
        mount_tmpfs(var / "node" / "lib", STATE_FS_MIB, mounts)
        say(f"starting MariaDB, Redis and S3 (node and managed side) under {var}")
        services: dict[str, Any] = {}
        services["mariadb"] = devstack.start_mariadb(var / "mariadb")
        cleanup.callback(lambda: services["mariadb"].stop())
        services["redis"] = devstack.start_redis(var / "redis")
        cleanup.callback(lambda: services["redis"].stop())
        managed_mariadb = devstack.start_mariadb(var / "managed-mariadb")
        cleanup.callback(managed_mariadb.stop)
        managed_redis = devstack.start_redis(var / "managed-redis")
        cleanup.callback(managed_redis.stop)
        s3 = devstack.start_s3(var / "s3")
        cleanup.callback(s3.stop)
        s3_gate = Gate(s3.port).start()
        cleanup.callback(s3_gate.stop)
        fake = FakeBackend().start()
        cleanup.callback(fake.stop)
        receiver = Receiver().start()
        cleanup.callback(receiver.stop)

        say("starting the managed side and the node (every program, nginx)")
        with ThreadPoolExecutor(max_workers=2) as pool:
            starting = [pool.submit(start_stack, var / "managed", managed_mariadb, managed_redis, s3,
                                    **MANAGED_SETTINGS),
                        pool.submit(start_stack, var / "node", services["mariadb"], services["redis"],
                                    replace(s3, port=s3_gate.port), **NODE_SETTINGS)]
        for future in starting:  # every stack that started is stopped, even if the other failed
            if future.exception() is None:
                cleanup.callback(future.result().stop)
        managed, node = (future.result() for future in starting)
        link_gate = Gate(managed.config.grpc_tls_port).start()
        cleanup.callback(link_gate.stop)
        say("enrolling the node (its link through a gate the link faults close)")
        node_id = enroll(managed, node, link_target=f"127.0.0.1:{link_gate.port}")

        # Enrolment restarts the node's programs with the link's settings.
        wait_until(lambda: not_ready(node), "the node ready and linked")
        prometheus_url = cleanup.enter_context(prometheus.running(
            node.config.config_dir / "prometheus" / "scaigrid.yml", var / "prometheus"))
        world = prepare(node, fake, receiver)
        traffic = Traffic(world, concurrency=CONCURRENCY, rate_per_s=RATE_PER_S)
        bench = Bench(var, services["mariadb"], services["redis"], s3, s3_gate, node, managed, managed_mariadb,
                      link_gate, traffic, world, prometheus_url, managed_key(managed, node, node_id))
        # A restarted server replaces the bench's entry; the cleanup stops whichever is current.
        cleanup.callback(lambda: bench.mariadb.stop())
        cleanup.callback(lambda: bench.redis.stop())
        yield bench


def managed_key(managed: ApplianceStack, node: ApplianceStack, node_id: str) -> str:
    """A tenant of the managed side, allowed on the node, and its user's key once it works there."""
    admin = managed.admin_key
    tenant = data(managed, "POST", "/v1/tenants", admin, {"slug": "hq", "name": "HQ"}, expect=201)
    user = data(managed, "POST", "/v1/users", admin, {"email": "user@hq.example", "tenant_id": tenant["id"]},
                expect=201)
    key = str(data(managed, "POST", "/v1/api-keys", admin, {"name": "hq app", "user_id": user["id"]},
                   expect=201)["key"])
    data(managed, "PUT", f"/v1/hybrid/nodes/{node_id}/tenants", admin, {"tenant_ids": [tenant["id"]]})
    deadline = time.monotonic() + 60
    while relay_chat(node, key) is None:
        if time.monotonic() > deadline:
            raise TimeoutError("the managed tenant's key does not work on the node")
        time.sleep(0.5)
    return key


def relay_chat(node: ApplianceStack, key: str) -> str | None:
    """One chat completion on the node with a managed tenant's key: its request id, or None if it failed."""
    with contextlib.suppress(OSError, ValueError):
        status, _, headers = load.api(node, "POST", "/v1/inference/chat", key,
                                      {"model": CHAT, "messages": [{"role": "user", "content": "hi"}]})
        if status == 200:
            return headers["X-Request-ID"]
    return None


def rate_limit_exact(bench: Bench) -> tuple[bool, str]:
    """A new user of the load's first tenant, limited to LIMIT_RPM requests a minute, sends LIMIT_RPM + 5 chats
    through nginx (both http processes): exactly LIMIT_RPM pass, the rest get RATE_LIMITED."""
    stack, tenant_id = bench.stack, bench.world.tenants[0].id
    user_id = load.created(stack, "/v1/users", {"email": f"limited-{time.monotonic_ns()}@example.com",
                                                "role": "tenant_user", "tenant_id": tenant_id})["id"]
    key = load.created(stack, "/v1/api-keys", {"name": "chaos limit", "user_id": user_id})["key"]
    status, reply, _ = load.api(stack, "PUT", f"/v1/rate-limits/user/{user_id}", stack.admin_key, {"rpm": LIMIT_RPM})
    if status != 200:
        return False, f"could not set the limit: {status} {reply}"
    answers: list[tuple[int, str | None]] = []
    for _ in range(LIMIT_RPM + 5):
        status, reply, _ = load.api(stack, "POST", "/v1/inference/chat", key,
                                    {"model": CHAT, "messages": [{"role": "user", "content": "hi"}]})
        answers.append((status, load.error_code(json.dumps(reply).encode()) if status != 200 else None))
    passed = sum(status == 200 for status, _ in answers)
    limited = sum(answer == (429, "RATE_LIMITED") for answer in answers)
    exact = (passed, limited) == (LIMIT_RPM, 5)
    return exact, f"rate limit {'exact' if exact else 'NOT exact'} afterwards: {passed} of {len(answers)} passed " \
                  f"a limit of {LIMIT_RPM}/min, {limited} RATE_LIMITED"


def managed_usage(bench: Bench) -> tuple[list[str], list[str]]:
    """Of the node's requests for the managed tenant, those missing from the managed side's usage records (after the
    outbox drained, waited for) and those stored there more than once."""
    ids = set(bench.relayed)

    def counts() -> dict[str, int]:
        rows = run_sql(bench.managed_mariadb, bench.managed.config.database_name,
                       "SELECT request_id, COUNT(*) AS n FROM usage_records GROUP BY request_id")
        return {row["request_id"]: int(row["n"]) for row in rows if row["request_id"] in ids}

    deadline = time.monotonic() + 90
    while len(counts()) < len(ids) and time.monotonic() < deadline:
        time.sleep(1)
    found = counts()
    return sorted(ids - set(found)), sorted(id_ for id_, n in found.items() if n > 1)


def wait_until(problem: Callable[[], str], what: str) -> None:
    """Polls until problem() says nothing is wrong, saying what still is every 10 s; raises TimeoutError past
    RECOVERY_TIMEOUT_S."""
    started = time.monotonic()
    said = started
    while reason := problem():
        now = time.monotonic()
        if now - started > RECOVERY_TIMEOUT_S:
            raise TimeoutError(f"{what}: not within {RECOVERY_TIMEOUT_S} s ({reason})")
        if now - said >= 10:
            say(f"  {what}: {reason}")
            said = now
        time.sleep(0.25)


def run_fault(bench: Bench, fault: faults.Fault, hold_s: float) -> dict[str, Any]:
    say(f"--- {fault.name}")
    mark = bench.traffic.mark()
    began = time.time()
    undone = fault.inject(bench, hold_s)
    try:
        wait_until(bench.not_ready, f"ready again after {fault.name}")
        recovered_s: float | None = round(time.monotonic() - undone, 1)
    except TimeoutError:
        recovered_s = None
    time.sleep(SETTLE_S)
    # With the requests in flight when the fault began: they are the ones it hits first.
    records = bench.traffic.records(since=mark, overlapping=True)
    counts = audit(bench.stack, bench.world, records)
    details = counts["details"]
    notes = [f"{len(records)} requests ({details['codes'] or 'no error codes'})"]
    if fault.cuts_streams:
        cut = [record for record in records if cut_by_kill(record, undone)]
        counts["failed_other"] -= len(cut)
        if cut:
            notes.append(f"{len(cut)} stream(s) open on the killed process ended without their last chunk: no process "
                         "is left to send an error frame, and the HTTP framing tells the client the body is incomplete")
    limits_exact = None
    if fault.kind == "redis":
        limits_exact, said = rate_limit_exact(bench)
        notes.append(said)
    if bench.relayed:
        missing, doubled = managed_usage(bench)
        counts["usage_missing"] += len(missing)
        counts["usage_doubled"] += len(doubled)
        notes.append(f"{len(bench.relayed)} requests of a managed tenant served while the link was down: "
                     f"{len(missing)} missing, {len(doubled)} doubled on the managed side")
        bench.relayed.clear()
    deadline = time.time() + ALERT_WAIT_S
    fired = alerts_fired_since(bench.prometheus_url, began)
    while not fired and time.time() < deadline:
        time.sleep(1)
        fired = alerts_fired_since(bench.prometheus_url, began)
    first = min(fired.items(), key=lambda item: item[1]) if fired else None
    row = {
        "fault": fault.name,
        "attempted": counts["attempted"],
        "succeeded": counts["succeeded"],
        "failed_documented": counts["failed_documented"],
        "failed_other": counts["failed_other"],
        "usage_missing": counts["usage_missing"],
        "usage_doubled": counts["usage_doubled"],
        "events_lost": counts["events_lost"],
        "objects_corrupt": counts["objects_corrupt"],
        "recovered_s": recovered_s,
        "alert": ", ".join(sorted(fired, key=fired.__getitem__)) if fired else None,
        "alert_after_s": first[1] if first else None,
        "note": "; ".join([*notes, *details["failed_other"][:3]]),
    }
    row["limits_exact"] = limits_exact  # not a results.jsonl key: lost() reads it
    (bench.var / "details.jsonl").open("a").write(json.dumps({"fault": fault.name, **details}) + "\n")
    say(json.dumps(row))
    return row


def cut_by_kill(record: load.Record, killed: float) -> bool:
    """A stream that was open when its http process was killed -9 and broke at once: the only failure a kill of the
    process serving a request cannot turn into a documented error."""
    return (record.outcome == load.OTHER and record.kind.endswith("stream") and record.started_s < killed
            <= record.ended_s <= killed + CUT_WINDOW_S and record.note.startswith(("ClientPayloadError",
                                                                                 "ServerDisconnectedError")))


def lost(row: dict[str, Any]) -> list[str]:
    """What a row shows lost or broken: each a defect."""
    problems = [f"{key} {row[key]}" for key in ("failed_other", "usage_missing", "usage_doubled", "events_lost",
                                                  "objects_corrupt") if row[key]]
    if row["recovered_s"] is None:
        problems.append(f"not ready within {RECOVERY_TIMEOUT_S} s")
    if not row["alert"]:
        problems.append("no alert told the operator")
    if row.get("limits_exact") is False:
        problems.append("rate limits not exact after it")
    return problems


def markdown(rows: list[dict[str, Any]], expected: dict[str, str]) -> str:
    head = ("| fault | expected | attempted | ok | failed (documented) | failed (other) | usage missing/doubled "
            "| events lost | objects corrupt | recovered | alert (after) |")
    lines = [head, "|" + " --- |" * 11]
    for row in rows:
        alert = f"{row['alert']} ({row['alert_after_s']} s)" if row["alert"] else f"none: {row['note']}"
        recovered = f"{row['recovered_s']} s" if row["recovered_s"] is not None else "no"
        lines.append(f"| {row['fault']} | {expected[row['fault']]} | {row['attempted']} | {row['succeeded']} "
                     f"| {row['failed_documented']} | {row['failed_other']} | {row['usage_missing']}/"
                     f"{row['usage_doubled']} | {row['events_lost']} | {row['objects_corrupt']} | {recovered} "
                     f"| {alert} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--var", type=Path, default=REPO / "var" / "chaos", help="working directory (emptied)")
    parser.add_argument("--short", action="store_true", help="each fault class once, shorter holds (make test-chaos)")
    parser.add_argument("--only", nargs="*", default=[], help="only faults whose name contains one of these")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        say("needs root: the disk faults mount tmpfs filesystems")
        return 2
    var: Path = args.var.resolve()
    if var.exists():
        for mounted in sorted(var.rglob("*"), reverse=True):  # a run killed before its cleanup left mounts behind
            if mounted.is_mount():
                subprocess.run(["umount", "-l", str(mounted)], check=False)
        shutil.rmtree(var)
    hold_s = 20.0  # the outages; the short run differs by its faults, one of each class
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    with bench_up(var / "run") as bench:
        processes = [info.name for info in bench.stack.supervisor.processes()]
        # The minute without the link; the short run's 40 s is past ScaigridLinkDown's 30 s.
        table = faults.table(processes, enrolled=True, hold_s=hold_s, link_hold_s=40.0 if args.short else 60.0)
        if args.short:
            table = faults.short(table)
        if args.only:
            table = [fault for fault in table if any(part in fault.name for part in args.only)]
        expected = {fault.name: fault.expected for fault in table}
        say(f"{len(table)} faults, each held {hold_s:g} s, under load ({CONCURRENCY} clients, {RATE_PER_S:g} "
            f"turns a second: chat and streams on both surfaces from {len(bench.world.callers)} keys of "
            f"{len(bench.world.tenants)} tenants, storage PUT and GET, request.* webhooks)")
        bench.traffic.start()
        try:
            time.sleep(SETTLE_S)
            for fault in table:
                rows.append(run_fault(bench, fault, hold_s))
        finally:
            bench.traffic.stop()
    var.mkdir(parents=True, exist_ok=True)
    with (var / "results.jsonl").open("w") as out:
        for row in rows:
            out.write(json.dumps({key: row[key] for key in KEYS}) + "\n")
    (var / "results.md").write_text(markdown(rows, expected))
    print(markdown(rows, expected))
    say(f"{len(rows)} faults in {(time.monotonic() - started) / 60:.1f} min; {var / 'results.jsonl'}")
    defects = {row["fault"]: lost(row) for row in rows if lost(row)}
    for fault, problems in defects.items():
        say(f"DEFECT {fault}: {', '.join(problems)}")
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
