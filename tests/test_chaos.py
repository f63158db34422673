"""The short fault table (`python -m tests.chaos.run --short`): each fault class once, on a whole enrolled appliance
under load, and nothing lost. `make chaos` runs the whole table (docs/reliability.md)."""

import json
import subprocess
import sys

import pytest

from appliance.local import child_env
from tests.chaos import faults
from tests.chaos.run import KEYS, REPO

pytestmark = pytest.mark.timeout(1500)

CLASSES = {"program", "mariadb", "redis", "s3", "upstream", "disk", "clock", "link"}


def test_each_fault_class_once_under_load_loses_nothing_and_is_reported(tmp_path_factory: pytest.TempPathFactory):
    var = tmp_path_factory.mktemp("chaos")
    run = subprocess.run([sys.executable, "-m", "tests.chaos.run", "--short", "--var", str(var)], cwd=REPO,
                         env=child_env(), capture_output=True, text=True, timeout=1400, check=False)
    table = (var / "results.md").read_text() if (var / "results.md").exists() else "(no table)"
    capture = f"--- stdout\n{run.stdout[-20000:]}\n--- stderr\n{run.stderr[-5000:]}\n--- table\n{table}"
    assert run.returncode == 0, capture
    rows = [json.loads(line) for line in (var / "results.jsonl").read_text().splitlines()]
    assert all(list(row) == list(KEYS) for row in rows), capture
    every = faults.table(["http_1"], enrolled=True, hold_s=20, link_hold_s=40)
    assert [row["fault"] for row in rows] == [fault.name for fault in faults.short(every)], capture
    assert {fault.kind for fault in faults.short(every)} == CLASSES
    for row in rows:
        assert row["attempted"] > 0 and row["succeeded"] > 0, row
        assert (row["failed_other"], row["usage_missing"], row["usage_doubled"], row["events_lost"],
                row["objects_corrupt"]) == (0, 0, 0, 0, 0), row
        assert row["recovered_s"] is not None, row
        assert row["alert"], row  # every fault is one an operator is told of
    print(table)
