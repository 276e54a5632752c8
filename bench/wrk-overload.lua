-- Like wrk-post.lua, but counts shed (non-2xx) responses apart from socket errors and reports the
-- 2xx rate; prints one RESULT line.
wrk.method = "POST"
wrk.body = os.getenv("BODY") or '{"context":{}}'
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("KEY")
if key and #key > 0 then
  wrk.headers["Authorization"] = "Bearer " .. key
end
function done(summary, latency, requests)
  local e = summary.errors
  local secs = summary.duration / 1e6
  io.write(string.format(
    "RESULT rps=%.0f ok_rps=%.0f p50_ms=%.3f p99_ms=%.3f non2xx=%d socket_errors=%d requests=%d\n",
    summary.requests / secs, (summary.requests - e.status) / secs,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    e.status, e.connect + e.read + e.write + e.timeout, summary.requests))
end
