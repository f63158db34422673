"""Debian's Prometheus for the tests and the chaos run: on a copy of an appliance's rendered scrape file whose scrape
and rule evaluation intervals are 1 s (15 s as rendered), so that what it watches shows within seconds."""

import contextlib
import json
import signal
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance import devstack
from appliance.local import child_env
from tests.support.waiting import eventually

PROMETHEUS = "/usr/bin/prometheus"
# A plain text replace of the two rendered lines; the scrape file names the rules file by its absolute path.
FAST = {"  scrape_interval: 15s\n": "  scrape_interval: 1s\n",
        "  evaluation_interval: 15s\n": "  evaluation_interval: 1s\n"}


@contextlib.contextmanager
def running(scrape_file: Path, directory: Path) -> Iterator[str]:
    """Prometheus on a free loopback port, evaluating the rendered rules too, until the block ends; its URL."""
    directory.mkdir(parents=True, exist_ok=True)
    text = scrape_file.read_text()
    for line, fast in FAST.items():
        assert line in text, f"{scrape_file} no longer has the line {line!r}"
        text = text.replace(line, fast)
    (directory / "prometheus.yml").write_text(text)
    port = devstack.free_port()
    log = directory / "prometheus.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=output, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: answers(f"{url}/-/ready") or process.poll() is not None, "prometheus ready", 60)
        assert process.poll() is None, devstack.log_tail(log)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def api(url: str, path: str, **params: str) -> Any:
    with urllib.request.urlopen(f"{url}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=10) as response:
        reply = json.load(response)
    assert reply["status"] == "success", reply
    return reply["data"]


def query(url: str, promql: str) -> dict[str, float]:
    """An instant query's results, each series named by its labels (as `k=v,...`), with its value."""
    return {",".join(f"{k}={v}" for k, v in sorted(series["metric"].items())): float(series["value"][1])
            for series in api(url, "query", query=promql)["result"]}
