-- POST with a JSON body and an API key, both from the environment; prints one RESULT line.
-- DELAY_MS > 0 paces every connection (closed loop with a think time) to hold a lower load.
wrk.method = "POST"
wrk.body = os.getenv("BODY") or '{"context":{}}'
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("KEY")
if key and #key > 0 then
  wrk.headers["Authorization"] = "Bearer " .. key
end
local pause = tonumber(os.getenv("DELAY_MS") or "0")
if pause > 0 then
  function delay() return pause end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT rps=%.0f p50_ms=%.3f p99_ms=%.3f non2xx_or_errors=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, e.status + e.connect + e.read + e.write + e.timeout))
end
