#!/opt/scaigrid/bin/python3
"""The image's HEALTHCHECK: exit 0 when this container's scaigrid mode (SCAIGRID_MODE) serves, 1 when not."""

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0
# A wildcard bind is reached on loopback; any other BIND_HOST is where the process listens.
WILDCARDS = ("", "0.0.0.0", "::")


def _host() -> str:
    host = os.environ.get("BIND_HOST", "0.0.0.0")
    return "127.0.0.1" if host in WILDCARDS else host


def _http_ready(port_variable: str, default_port: int) -> int:
    # /health/ready, not /health: 503 while draining or while the database or Redis is away, so a load balancer that
    # follows container health (compose's service_healthy) routes around it.
    url = f"http://{_host()}:{os.environ.get(port_variable, default_port)}/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


def _grpc_serving() -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"{_host()}:{os.environ.get('GRPC_PORT', 50051)}"
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            print(f"{target}: {exc.code().name}", file=sys.stderr)
            return 1
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _worker_beating() -> int:
    """This container's worker has a fresh heartbeat (the container's host name is in its id): another worker's beat
    must not vouch for this one."""
    from scaigrid import cli

    sys.argv = ["scaigrid", "check", "worker", "--this-host"]
    try:
        cli.main()  # the command as run by hand: a configuration error is one line, not a traceback
    except SystemExit as exit_:
        return 0 if exit_.code in (0, None) else 1
    return 0


def main() -> int:
    mode = os.environ.get("SCAIGRID_MODE", "")
    if mode == "http":
        return _http_ready("HTTP_PORT", 8000)
    if mode == "bunker_proxy":
        return _http_ready("BUNKER_PROXY_PORT", 8001)
    if mode == "grpc":
        return _grpc_serving()
    if mode == "worker":
        return _worker_beating()
    # migrate (a one-shot step, judged by its exit code) and anything else: nothing to probe.
    return 0


if __name__ == "__main__":
    sys.exit(main())
