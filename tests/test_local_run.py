"""`make run` (appliance.local): the four long-running modes come up on private services and Ctrl-C stops all."""

import os
import signal
import subprocess
import sys
import time

from appliance import devstack
from tests.conftest import PORT_SETTINGS, REPO, http_ok


def test_local_run_starts_everything_and_ctrl_c_stops_it(tmp_path):
    ports = dict(zip(PORT_SETTINGS, map(str, devstack.free_ports(len(PORT_SETTINGS))), strict=True))
    output = tmp_path / "run.out"
    with output.open("w") as out:
        run = subprocess.Popen([sys.executable, "-m", "appliance.local", "--var", str(tmp_path / "var")],
                               cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                               env={"PATH": os.environ["PATH"], **ports})
    try:
        deadline = time.monotonic() + 90
        while "Ctrl-C stops everything" not in output.read_text():
            assert run.poll() is None, output.read_text()
            assert time.monotonic() < deadline, output.read_text()
            time.sleep(0.1)
        assert http_ok(f"http://127.0.0.1:{ports['HTTP_PORT']}/health/ready")
        assert http_ok(f"http://127.0.0.1:{ports['BUNKER_PROXY_PORT']}/health/ready")
        env_file = tmp_path / "var" / "scaigrid.env"
        assert oct(env_file.stat().st_mode & 0o777) == "0o600"
        run.send_signal(signal.SIGINT)
        assert run.wait(60) == 0
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    text = output.read_text()
    for mode in ("http", "grpc", "worker", "bunker_proxy"):
        assert f"{mode} exited with 0" in text, text
    assert "MariaDB, Redis and S3 stopped" in text
    assert f"http://127.0.0.1:{ports['HTTP_PORT']}" in text
