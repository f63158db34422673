-- wrk script of bench/run.py: POSTs BENCH_BODY (JSON) with an optional bearer key, stops after
-- BENCH_MAX_REQUESTS answers when set, and prints one JSON line of results for run.py to parse.
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BENCH_KEY")
if key and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end

local max_requests = tonumber(os.getenv("BENCH_MAX_REQUESTS") or "")
if max_requests then
  -- Defined only when needed: wrk calls into Lua for every answer once `response` exists.
  local answered = 0
  function response(status, headers, body)
    answered = answered + 1
    if answered == max_requests then
      wrk.thread:stop()
      -- wrk's main thread sleeps out the whole -d duration; run.py sends SIGINT when it reads this line.
      io.write("stopped\n")
      io.flush()
    end
  end
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,' ..
    '"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, errors.connect, errors.read, errors.write, errors.status,
    errors.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean,
    latency.max))
end
