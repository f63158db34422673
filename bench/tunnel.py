"""`make bench-tunnel`: a request tunnelled from the managed side down the hybrid link vs the same request made to
the appliance directly.

It starts what tests/test_hybrid_e2e.py runs (tests/hybrid_stacks.py): two managed replicas (A and B, one database
and one Redis) and a node appliance linked to A through A's nginx over TLS, each stack whole under supervisord. One
FakeBackend model on the node (`site/bench`, no delay) is reached three ways, with one managed tenant's API key
(known to the node through the config snapshot), through each stack's nginx over TLS:
- direct:    client -> node nginx -> node http -> backend;
- tunnel A:  client -> A nginx -> A http -> A grpc (relay) -> link (A nginx, TLS) -> node link -> node http -> backend;
- tunnel B:  the same asked of replica B, whose http finds A through Redis and relays through A's grpc.
Governance stays on everywhere (auth, rate limits, accounting). Results replace the tunnel block of
bench/RESULTS.md.
"""

import argparse
import asyncio
import os
import platform
import ssl
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from appliance import devstack
from tests.hybrid_stacks import Hybrid, api, data, hybrid_stacks, wait_until

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
BEGIN, END = "<!-- tunnel:begin (bench/tunnel.py rewrites this block) -->", "<!-- tunnel:end -->"
NODE_MODEL, MANAGED_MODEL = "site/bench", "onprem/bench"
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


def say(message: str) -> None:
    print(f"[bench-tunnel] {message}", flush=True)


@dataclass
class Target:
    name: str
    url: str  # the chat completions URL
    model: str
    cafile: Path


@dataclass
class Run:
    latencies_s: list[float]
    wall_s: float

    def quantile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def rate(self) -> float:
        return len(self.latencies_s) / self.wall_s


async def drive(target: Target, key: str, requests: int, concurrency: int, stream: bool) -> Run:
    """`requests` chat completions, `concurrency` at a time over kept-alive connections; every answer checked."""
    ssl_context = ssl.create_default_context(cafile=str(target.cafile))
    connector = aiohttp.TCPConnector(ssl=ssl_context, limit=concurrency)
    headers = {"Authorization": f"Bearer {key}"}
    body = {**BODY, "model": target.model, "stream": stream}
    latencies: list[float] = []
    left = requests

    async def one(session: aiohttp.ClientSession) -> None:
        started = time.perf_counter()
        async with session.post(target.url, json=body, headers=headers) as response:
            payload = await response.read()
            if response.status != 200 or (stream and not payload.rstrip().endswith(b"data: [DONE]")):
                raise RuntimeError(f"{target.name}: {response.status} {payload[:300]!r}")
        latencies.append(time.perf_counter() - started)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one(session)

    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(min(20, requests)):  # warm the connections, the caches and the tunnel's channel
            await one(session)
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall_s = time.perf_counter() - started
    return Run(latencies, wall_s)


def prepare(hybrid: Hybrid) -> tuple[str, list[Target]]:
    """The node's model, a managed model tunnelled to it, and a managed tenant allowed on the node; its key."""
    node, a = hybrid.node, hybrid.a
    data(node, "POST", "/v1/backends", node.admin_key, {
        "id": "bench-fake", "provider": "custom", "base_url": hybrid.node_fake.url, "model": "bench"}, expect=201)
    data(node, "POST", "/v1/models", node.admin_key, {
        "slug": NODE_MODEL, "modality": "chat", "routes": [{"backend": "bench-fake"}]}, expect=201)
    data(a, "POST", "/v1/backends", a.admin_key, {
        "id": "bench-tunnel", "provider": "hybrid", "model": f"{hybrid.node_id}/{NODE_MODEL}"}, expect=201)
    data(a, "POST", "/v1/models", a.admin_key, {
        "slug": MANAGED_MODEL, "modality": "chat", "routes": [{"backend": "bench-tunnel"}]}, expect=201)
    tenant = hybrid.managed_tenant("bench")
    hybrid.allow_tenants(tenant.id)
    wait_until(lambda: api(node, "GET", "/oai/v1/models", tenant.key)[0] == 200, "the bench key on the node")
    chat = "/oai/v1/chat/completions"
    targets = [Target("direct to the appliance", node.url + chat, NODE_MODEL, node.config.tls_cert),
               Target("tunnel via replica A", a.url + chat, MANAGED_MODEL, a.config.tls_cert),
               Target("tunnel via replica B", hybrid.b.url + chat, MANAGED_MODEL, hybrid.b.config.tls_cert)]
    return tenant.key, targets


def measure(key: str, targets: Sequence[Target], latency_requests: int, load_requests: int, concurrency: int
            ) -> list[str]:
    rows = []
    results: dict[str, dict[str, Run]] = {}
    for target in targets:
        results[target.name] = {
            "c1": asyncio.run(drive(target, key, latency_requests, 1, stream=False)),
            "c1-stream": asyncio.run(drive(target, key, latency_requests, 1, stream=True)),
            "load": asyncio.run(drive(target, key, load_requests, concurrency, stream=True)),
        }
        run = results[target.name]
        say(f"{target.name}: p50 {run['c1'].quantile_ms(0.5):.1f} ms, "
            f"stream p50 {run['c1-stream'].quantile_ms(0.5):.1f} ms, "
            f"{run['load'].rate:.0f} streams/s at c={concurrency}")
    direct = results[targets[0].name]
    for target in targets:
        run = results[target.name]
        added = run["c1"].quantile_ms(0.5) - direct["c1"].quantile_ms(0.5)
        rows.append(
            f"| {target.name} | {run['c1'].quantile_ms(0.5):.1f} | {run['c1'].quantile_ms(0.99):.1f} | "
            f"{run['c1-stream'].quantile_ms(0.5):.1f} | {run['c1-stream'].quantile_ms(0.99):.1f} | "
            f"{'—' if target is targets[0] else f'{added:+.1f}'} | {run['load'].rate:.0f} | "
            f"{run['load'].rate / direct['load'].rate:.0%} | {run['load'].quantile_ms(0.99):.0f} |")
    return rows


def write(rows: list[str], args: argparse.Namespace) -> str:
    block = "\n".join([
        BEGIN,
        f"Generated by `make bench-tunnel` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"every process (three appliance stacks, MariaDB, Redis, the backend, the client) on the same cores.",
        "",
        f"Latency: {args.latency_requests} non-streamed, then {args.latency_requests} streamed (3 chunks + usage) chat "
        f"completions one at a time. Load: {args.load_requests} streamed completions, {args.concurrency} at a time.",
        "",
        "| path | p50 ms | p99 ms | stream p50 ms | stream p99 ms | added p50 ms | streams/s (load) | vs direct | "
        "load p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        END,
    ])
    text = RESULTS.read_text()
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Hybrid tunnel (issue 6)\n\n" + (__doc__ or "").split("\n\n", 1)[1] + "\n" \
            + block + "\n"
    if not args.no_write:
        RESULTS.write_text(text)
    return block


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-requests", type=int, default=300)
    parser.add_argument("--load-requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-tunnel-") as scratch:
        base = Path(scratch)
        say("starting MariaDB, S3 and three appliance stacks (about a minute)")
        mariadb = devstack.start_mariadb(base / "mariadb")
        s3 = devstack.start_s3(base / "s3")
        try:
            with hybrid_stacks(base, mariadb, s3) as hybrid:
                key, targets = prepare(hybrid)
                say("measuring")
                rows = measure(key, targets, args.latency_requests, args.load_requests, args.concurrency)
        finally:
            s3.stop()
            mariadb.stop()
    print(write(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
