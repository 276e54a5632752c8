#!/usr/bin/env bash
# OFREP load test on one node, against the physical limit of the HTTP stack measured in the same run:
#   1. a bare axum handler (crates/node/examples/bare_ofrep.rs) that parses the same request body and
#      answers a fixed OFREP body;
#   2. `bunting serve` (memory store, 50 flags: static, targeting and fractional rollouts).
# Same wrk settings for both (default -t1 -c32, 10 s per run, everything on 127.0.0.1), then the
# single-flag p99 at ~80% of bunting's peak rate. Prints requests/s, latencies and both ratios.
# Env: DURATION (10s), THREADS (1), CONNS (32). Installs wrk from Debian when missing.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
DURATION="${DURATION:-10s}"; THREADS="${THREADS:-1}"; CONNS="${CONNS:-32}"
trap bench_cleanup EXIT  # defined by common.sh; set first so a failed start leaves nothing behind
source "$root/bench/common.sh"
# Sanity: the targeting flag really matches, and bulk returns 50 flags.
curl -fsS -X POST "$node_url/ofrep/v1/evaluate/flags/flag-35" -H "Authorization: Bearer $KEY" -H 'content-type: application/json' -d "$BODY"; echo
test "$(curl -fsS -X POST "$node_url/ofrep/v1/evaluate/flags" -H "Authorization: Bearer $KEY" -H 'content-type: application/json' -d "$BODY" | grep -o '"key"' | wc -l)" = 50

run() { # name url path [extra env]
  local name="$1" url="$2" path="$3"
  local line; line="$(env "${@:4}" wrk -t"$THREADS" -c"${C:-$CONNS}" -d"$DURATION" -s "$root/bench/wrk-post.lua" "$url$path" | grep '^RESULT')"
  printf '%-28s %s\n' "$name" "${line#RESULT }"
  echo "$line" | sed -n 's/.*rps=\([0-9]*\).*/\1/p' > "$work/$name.rps"
  echo "$line" | sed -n 's/.*p99_ms=\([0-9.]*\).*/\1/p' > "$work/$name.p99"
}
echo "wrk -t$THREADS -c$CONNS -d$DURATION, $(nproc) cores shared by wrk and the server"
run bare-single "$bare_url" /ofrep/v1/evaluate/flags/flag-35
run bunting-single "$node_url" /ofrep/v1/evaluate/flags/flag-35
run bare-bulk50 "$bare_url" /ofrep/v1/evaluate/flags
run bunting-bulk50 "$node_url" /ofrep/v1/evaluate/flags
peak="$(cat "$work/bunting-single.rps")"; goal=$(( peak * 8 / 10 ))
# ~80% of the peak: each connection waits 1 ms between requests (wrk has no rate option); a short
# calibration run scales the number of connections until the achieved rate is near the goal.
c=$(( (goal + 999) / 1000 ))
for _ in 1 2; do
  got="$(DELAY_MS=1 wrk -t"$THREADS" -c"$c" -d3s -s "$root/bench/wrk-post.lua" "$node_url/ofrep/v1/evaluate/flags/flag-35" | sed -n 's/^RESULT rps=\([0-9]*\).*/\1/p')"
  c=$(( c * goal / (got > 0 ? got : 1) )); [ "$c" -lt 1 ] && c=1; [ "$c" -gt 2000 ] && c=2000
done
C=$c run bunting-single-at-80pct "$node_url" /ofrep/v1/evaluate/flags/flag-35 DELAY_MS=1
ratio() { awk -v a="$(cat "$work/$1.rps")" -v b="$(cat "$work/$2.rps")" 'BEGIN { printf "%.2f", a / b }'; }
echo "single-flag: bunting / bare axum = $(ratio bunting-single bare-single)x (goal >= 0.7)"
echo "bulk (50):   bunting / bare axum = $(ratio bunting-bulk50 bare-bulk50)x"
echo "p99 at ~80% load: $(cat "$work/bunting-single-at-80pct.p99") ms at $(cat "$work/bunting-single-at-80pct.rps") req/s, goal rate $goal (goal <= 5 ms)"
