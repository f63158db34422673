"""`make bench-storage`: a 256 MiB object up and down through bunker_proxy vs straight to the same S3 server (moto).

One run measures both paths against one moto server, so the ratio compares like with like; it also records the
proxy's RSS growth (peak VmHWM over the warmed-up VmRSS). Results replace the storage block of bench/RESULTS.md.
"""

import argparse
import asyncio
import io
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from minio import Minio

from appliance import devstack
from appliance.local import child_env
from scaigrid.modules.scaibunker import capabilities
from scaigrid.settings import Secret

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
BEGIN, END = "<!-- storage:begin (bench/storage.py rewrites this block) -->", "<!-- storage:end -->"
MiB = 1024 * 1024
OBJECT_BYTES = 256 * MiB
PART_BYTES = 8 * MiB  # the proxy's default STORAGE_PART_SIZE_BYTES; the direct client uses the same
CHUNK_BYTES = MiB
# Targets of issue 4, point 3.
MIN_RATIO = 0.70
MAX_RSS_GROWTH_MIB = 64
STORAGE = "/v1/modules/scaibunker/storage"


def say(message: str) -> None:
    print(f"[bench-storage] {message}", flush=True)


class Pattern(io.RawIOBase):
    """OBJECT_BYTES of data made from one random MiB, read like a file (no 256 MiB buffer on the client side)."""

    def __init__(self, block: bytes, size: int) -> None:
        self._block, self._left = block, size

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = self._left if size < 0 else min(size, self._left)
        out = (self._block * (size // len(self._block) + 1))[:size]
        self._left -= size
        return out


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


@contextmanager
def proxy_process(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "scaigrid", "run", "--mode", "bunker_proxy"],
                                   env={**child_env(), "PYTHONPATH": str(REPO), **env}, cwd=REPO,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not devstack.http_answers(f"http://127.0.0.1:{env['BUNKER_PROXY_PORT']}/health/ready"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bunker_proxy did not become ready:\n{devstack.log_tail(log_path)}")
            time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        process.wait(30)


@dataclass
class Timing:
    upload_s: list[float]
    download_s: list[float]
    first_byte_s: list[float]  # of each download: the fixed cost before the bytes flow

    @staticmethod
    def mb_s(seconds: list[float]) -> float:
        return OBJECT_BYTES / 1e6 / statistics.median(seconds)


def direct_round(s3: Minio, bucket: str, block: bytes, name: str) -> tuple[float, float, float]:
    started = time.perf_counter()
    s3.put_object(bucket, name, Pattern(block, OBJECT_BYTES), OBJECT_BYTES, part_size=PART_BYTES)
    uploaded = time.perf_counter()
    response = s3.get_object(bucket, name)
    first_byte = 0.0
    try:
        received = 0
        for chunk in response.stream(CHUNK_BYTES):
            first_byte = first_byte or time.perf_counter()
            received += len(chunk)
    finally:
        response.close()
        response.release_conn()
    downloaded = time.perf_counter()
    assert received == OBJECT_BYTES, received
    s3.remove_object(bucket, name)
    return uploaded - started, downloaded - uploaded, first_byte - uploaded


async def proxy_round(session: aiohttp.ClientSession, url: str, token: str, block: bytes
                      ) -> tuple[float, float, float]:
    auth = {"Authorization": f"Bearer {token}"}

    async def body() -> AsyncIterator[bytes]:
        for _ in range(OBJECT_BYTES // len(block)):
            yield block

    started = time.perf_counter()
    async with session.put(url, data=body(), headers={**auth, "Content-Length": str(OBJECT_BYTES)}) as response:
        assert response.status == 201, await response.text()
    uploaded = time.perf_counter()
    received = 0
    first_byte = 0.0
    async with session.get(url, headers=auth) as response:
        assert response.status == 200
        async for chunk in response.content.iter_chunked(CHUNK_BYTES):
            first_byte = first_byte or time.perf_counter()
            received += len(chunk)
    downloaded = time.perf_counter()
    assert received == OBJECT_BYTES, received
    async with session.delete(url, headers=auth) as response:
        assert response.status == 204
    return uploaded - started, downloaded - uploaded, first_byte - uploaded


@dataclass
class Result:
    direct: Timing
    proxy: Timing
    rss_baseline_mib: float
    rss_growth_mib: float  # peak (VmHWM) over the warmed-up VmRSS


async def measure(rounds: int, base_dir: Path) -> Result:
    s3_server = devstack.start_s3(base_dir / "s3", devstack.free_ports(1)[0])
    try:
        s3 = Minio(f"127.0.0.1:{s3_server.port}", access_key=s3_server.access_key_id,
                   secret_key=s3_server.secret_access_key, secure=False)
        bucket = "bench-storage"
        s3.make_bucket(bucket)
        secret = secrets.token_hex(32)
        port = devstack.free_ports(1)[0]
        env = {"APP_ENV": "test", "APP_LOG_LEVEL": "warning", "S3_ENDPOINT_URL": s3_server.endpoint_url,
               "S3_ACCESS_KEY_ID": s3_server.access_key_id, "S3_SECRET_ACCESS_KEY": s3_server.secret_access_key,
               "S3_BUCKET": bucket, "BUNKER_PROXY_PORT": str(port), "STORAGE_CAPABILITY_SECRET": secret,
               "STORAGE_MAX_OBJECT_BYTES": str(1024 * MiB), "STORAGE_PART_SIZE_BYTES": str(PART_BYTES)}
        # Signed with the shared secret, as the http process signs what it mints.
        token = capabilities.mint(Secret(secret), capabilities.Capability(
            "cap_bench", "ten_bench", "bench/", frozenset(capabilities.VERBS), 1024 * MiB, int(time.time()) + 3600))
        block = os.urandom(MiB)
        with proxy_process(env, base_dir / "proxy.log") as proxy:
            url = f"http://127.0.0.1:{port}{STORAGE}/objects/bench/object"
            timeout = aiohttp.ClientTimeout(total=600)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.put(url, data=block, headers={"Authorization": f"Bearer {token}"}) as response:
                    assert response.status == 201  # warm-up: imports, first S3 connection
                baseline_kib = rss_kib(proxy.pid, "VmRSS")
                direct, through = Timing([], [], []), Timing([], [], [])
                for number in range(rounds):
                    for timing, measured in [
                            (direct, await asyncio.to_thread(direct_round, s3, bucket, block, f"direct-{number}")),
                            (through, await proxy_round(session, url, token, block))]:
                        timing.upload_s.append(measured[0])
                        timing.download_s.append(measured[1])
                        timing.first_byte_s.append(measured[2])
                    say(f"round {number + 1}/{rounds}: direct up {direct.upload_s[-1]:.2f} s down "
                        f"{direct.download_s[-1]:.2f} s; proxy up {through.upload_s[-1]:.2f} s down "
                        f"{through.download_s[-1]:.2f} s")
            peak_kib = rss_kib(proxy.pid, "VmHWM")
    finally:
        s3_server.stop()
    return Result(direct, through, baseline_kib / 1024, (peak_kib - baseline_kib) / 1024)


def render(result: "Result", rounds: int) -> str:
    direct, through, growth = result.direct, result.proxy, result.rss_growth_mib
    rows = []
    verdicts = []
    for label, d, p in [("upload", direct.upload_s, through.upload_s), ("download", direct.download_s,
                                                                        through.download_s)]:
        ratio = Timing.mb_s(p) / Timing.mb_s(d)
        verdicts.append(ratio >= MIN_RATIO)
        rows.append(f"| {label} | {Timing.mb_s(d):.0f} | {Timing.mb_s(p):.0f} | {ratio:.1%} | "
                    f"{'met' if ratio >= MIN_RATIO else 'MISSED'} (≥ {MIN_RATIO:.0%}) |")
    met = growth < MAX_RSS_GROWTH_MIB
    return "\n".join([
        BEGIN,
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; moto_server as S3 on the same host; {OBJECT_BYTES // MiB} MiB object, "
        f"{PART_BYTES // MiB} MiB parts, median of {rounds} rounds (direct and proxy alternate within each round).",
        "",
        "| transfer | direct to S3 (MB/s) | through bunker_proxy (MB/s) | ratio | target |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Proxy RSS: {result.rss_baseline_mib:.0f} MiB warmed up; peak growth over all rounds "
        f"{growth:.1f} MiB ({'met' if met else 'MISSED'}: < {MAX_RSS_GROWTH_MIB} MiB). "
        f"Download first byte (median): direct {statistics.median(direct.first_byte_s) * 1000:.0f} ms, "
        f"proxy {statistics.median(through.first_byte_s) * 1000:.0f} ms.",
        END,
    ])


def write_results(block: str) -> None:
    text = RESULTS.read_text()
    if BEGIN in text:
        head, _, rest = text.partition(BEGIN)
        text = head + block + rest.partition(END)[2]
    else:
        text = text.rstrip("\n") + "\n\n# Storage proxy benchmark (issue 4, point 3)\n\n" + block + "\n"
    RESULTS.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        result = asyncio.run(measure(args.rounds, Path(tmp)))
    block = render(result, args.rounds)
    print(block)
    if not args.no_write:
        write_results(block)
        say(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
