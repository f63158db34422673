"""Inference metrics (names fixed by ScaiGrid's documentation; breaker and health gauges live in routing/breaker.py)."""

from prometheus_client import Counter, Gauge, Histogram

from scaigrid.metrics import Children

# status: "ok", or the error code the client got (BACKEND_ERROR, BACKEND_TIMEOUT, MODEL_UNAVAILABLE, ...).
# Only requests naming a model the caller may use are counted: a typo in `model` must not mint a label.
REQUESTS = Counter("scaigrid_requests_total", "Inference requests by model, outcome and protocol (native or oai)",
                   ["model", "status", "protocol"])
REQUEST_DURATION = Histogram(
    "scaigrid_request_duration_seconds", "Inference requests from handler start to the last byte sent",
    ["model", "backend"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
TOKENS = Counter("scaigrid_tokens_total", "Tokens by model, direction (in, out) and tenant",
                 ["model", "direction", "tenant_id"])
TIME_TO_FIRST_TOKEN = Histogram(
    "scaigrid_time_to_first_token_seconds", "Streams: from handler start to the first chunk sent to the client",
    ["model"], buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
BACKEND_INFLIGHT = Gauge("scaigrid_backend_inflight_requests", "Requests this process has open on each backend",
                         ["backend_id"])
GATEWAY_OVERHEAD = Histogram(
    "scaigrid_gateway_overhead_seconds", "Inference handler time not spent waiting on the upstream",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25))

requests = Children(REQUESTS)
request_duration = Children(REQUEST_DURATION)
tokens = Children(TOKENS)
time_to_first_token = Children(TIME_TO_FIRST_TOKEN)
backend_inflight = Children(BACKEND_INFLIGHT)
