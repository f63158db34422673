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
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import redis as redis_lib
import yaml

from appliance import devstack
from appliance.local import child_env, program_rows
from appliance.programs import healthy
from appliance.supervisor import SupervisorUnavailable
from tests.appliance_stack import ApplianceStack, start_stack
from tests.backends import GATEWAY_SETTINGS, FakeBackend
from tests.chaos import faults
from tests.chaos.gate import Gate
from tests.chaos.audit import audit
from tests.chaos.load import CHAT, STACK_SETTINGS, Traffic, World, prepare
from tests.hybrid_stacks import api, data, enroll, link_state, run_sql
from tests.webhook_receiver import Receiver

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = "/usr/bin/prometheus"
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
# How long after recovery an alert may still start firing and count for the fault (rules with a `for:`).
ALERT_WAIT_S = 30


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            reply = json.load(response)
        if reply["status"] != "success":
            raise RuntimeError(f"Prometheus: {reply}")
        return reply["data"]

    def fired_since(self, start: float) -> dict[str, float]:
        """Alerts (name and labels) that went from not firing to firing after `start`: seconds after it each did."""
        end = time.time()
        series = self.api("query_range", query='ALERTS{alertstate="firing"}', start=f"{start - 5:.3f}",
                          end=f"{end:.3f}", step="1")["result"]
        fired = {}
        for one in series:
            times = [float(at) for at, _ in one["values"]]
            if times[0] <= start:
                continue  # already firing when the fault began: another fault's
            labels = {k: v for k, v in one["metric"].items() if k not in ("__name__", "alertstate", "alertname",
                                                                          "severity", "appliance", "job")}
            name = one["metric"]["alertname"] + (
                "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}" if labels else "")
            fired[name] = round(times[0] - start, 1)
        return fired

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)


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
    prometheus: Prometheus
    hq_key: str  # a managed tenant's key, allowed on the node: its usage there must reach the managed side
    mounts: list[Path] = field(default_factory=list)
    relayed: list[str] = field(default_factory=list)  # request ids the node served hq while its link was cut

    def redis_client(self) -> redis_lib.Redis:
        return redis_lib.Redis(port=self.redis.port, socket_timeout=5)

    def ready(self) -> bool:
        """Every program RUNNING and ready, the API ready through nginx, and the link up."""
        try:
            if not healthy(program_rows(self.stack.appliance)):
                return False
        except SupervisorUnavailable:
            return False
        status, _ = self.stack.get("/health/ready")
        return status == 200 and link_state(self.stack).get("connected") is True


def say(message: str) -> None:
    print(f"chaos: {message}", flush=True)


def mount_tmpfs(path: Path, size_mib: int, mounts: list[Path]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(path)], check=True)
    mounts.append(path)


def start_prometheus(stack: ApplianceStack, directory: Path) -> Prometheus:
    """Debian's Prometheus on the node's rendered scrape file and alert rules, scraping and evaluating every second."""
    directory.mkdir(parents=True, exist_ok=True)
    rendered = stack.config.config_dir / "prometheus"
    config = yaml.safe_load((rendered / "scaigrid.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    for rules in rendered.glob("*alerts*.yml"):
        shutil.copy(rules, directory / rules.name)
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = devstack.free_port()
    log = directory / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
    prometheus = Prometheus(f"http://127.0.0.1:{port}", process)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Prometheus exited: {devstack.log_tail(log)}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=5):
                return prometheus
        time.sleep(0.5)
    raise RuntimeError("Prometheus not ready in 60 s")


@contextlib.contextmanager
def bench_up(var: Path) -> Iterator[Bench]:
    """Starts everything; stops it all (and unmounts) however the run ends."""
    with contextlib.ExitStack() as cleanup:
        mounts: list[Path] = []
        cleanup.callback(lambda: [subprocess.run(["umount", "-l", str(path)], check=False) for path in mounts])
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
        managed = start_stack(var / "managed", managed_mariadb, managed_redis, s3, **MANAGED_SETTINGS)
        cleanup.callback(managed.stop)
        node = start_stack(var / "node", services["mariadb"], services["redis"], replace(s3, port=s3_gate.port),
                           **NODE_SETTINGS)
        cleanup.callback(node.stop)
        link_gate = Gate(managed.config.grpc_tls_port).start()
        cleanup.callback(link_gate.stop)
        say("enrolling the node (its link through a gate the link faults close)")
        node_id = enroll(managed, node, link_target=f"127.0.0.1:{link_gate.port}")

        prometheus = start_prometheus(node, var / "prometheus")
        cleanup.callback(prometheus.stop)
        world = prepare(node, fake, receiver)
        traffic = Traffic(world, concurrency=CONCURRENCY, rate_per_s=RATE_PER_S)
        bench = Bench(var, services["mariadb"], services["redis"], s3, s3_gate, node, managed, managed_mariadb,
                      link_gate, traffic, world, prometheus, managed_key(managed, node, node_id), mounts)
        # A restarted server replaces the bench's entry; the cleanup stops whichever is current.
        cleanup.callback(lambda: bench.mariadb.stop())
        cleanup.callback(lambda: bench.redis.stop())
        wait_ready(bench, "the node ready and linked")
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
        status, answer = api(node, "POST", "/v1/inference/chat", key,
                             {"model": CHAT, "messages": [{"role": "user", "content": "hi"}]})
        if status == 200:
            return str(answer["meta"]["request_id"])
    return None


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


def wait_ready(bench: Bench, what: str) -> float:
    """Seconds until bench.ready(); raises past RECOVERY_TIMEOUT_S."""
    started = time.monotonic()
    while not bench.ready():
        if time.monotonic() - started > RECOVERY_TIMEOUT_S:
            raise TimeoutError(f"{what}: not ready after {RECOVERY_TIMEOUT_S} s")
        time.sleep(0.25)
    return time.monotonic() - started


def run_fault(bench: Bench, fault: faults.Fault, hold_s: float) -> dict[str, Any]:
    say(f"--- {fault.name}")
    mark = bench.traffic.mark()
    began = time.time()
    undone = fault.inject(bench, hold_s)
    try:
        wait_ready(bench, fault.name)
        recovered_s: float | None = round(time.monotonic() - undone, 1)
    except TimeoutError:
        recovered_s = None
    time.sleep(SETTLE_S)
    # With the requests in flight when the fault began: they are the ones it hits first.
    records = bench.traffic.records(since=mark, overlapping=True)
    counts = audit(bench.stack, bench.world, records)
    details = counts["details"]
    notes = [f"{len(records)} requests ({details['codes'] or 'no error codes'})"]
    if bench.relayed:
        missing, doubled = managed_usage(bench)
        counts["usage_missing"] += len(missing)
        counts["usage_doubled"] += len(doubled)
        notes.append(f"{len(bench.relayed)} requests of a managed tenant served while the link was down: "
                     f"{len(missing)} missing, {len(doubled)} doubled on the managed side")
        bench.relayed.clear()
    deadline = time.time() + ALERT_WAIT_S
    fired = bench.prometheus.fired_since(began)
    while not fired and time.time() < deadline:
        time.sleep(1)
        fired = bench.prometheus.fired_since(began)
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
        "note": "; ".join(filter(None, [fault.no_alert_reason if not fired else "", *notes,
                                        *details["failed_other"][:3]])),
    }
    (bench.var / "details.jsonl").open("a").write(json.dumps({"fault": fault.name, **details}) + "\n")
    say(json.dumps(row))
    return row


def lost(row: dict[str, Any]) -> list[str]:
    """What a row shows lost or broken: each a defect."""
    problems = [f"{key} {row[key]}" for key in ("failed_other", "usage_missing", "usage_doubled", "events_lost",
                                                  "objects_corrupt") if row[key]]
    if row["recovered_s"] is None:
        problems.append(f"not ready within {RECOVERY_TIMEOUT_S} s")
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
    parser.add_argument("--short", action="store_true", help="each fault class once, shorter holds (make test)")
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
    hold_s = 6.0 if args.short else 20.0
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    with bench_up(var / "run") as bench:
        processes = [info.name for info in bench.stack.supervisor.processes()]
        table = faults.table(processes, enrolled=True, hold_s=hold_s)
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
