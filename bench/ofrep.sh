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
if ! command -v wrk >/dev/null; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
  else sudo apt-get install -y wrk; fi
fi
work="$(mktemp -d)"; pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

cargo build --quiet --release --locked -p bunting-node --bin bunting --example bare_ofrep --manifest-path "$root/Cargo.toml"
target="$(cargo metadata --format-version 1 --no-deps --manifest-path "$root/Cargo.toml" | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"

# 50 flags: 30 static booleans, 10 with targeting on email and plan, 10 fractional rollouts.
python3 "$root/bench/flags50.py" flagd > "$work/flags.json"
cat > "$work/node.toml" <<'TOML'
node_id = "bench-1"
region = "local"
store = "memory"
[limits]
requests_per_second_per_token = 100000000
burst_per_token = 100000000
[telemetry]
log_filter = "warn"
TOML

wait_url() { for _ in $(seq 1 400); do u="$(sed -n 's/^listening on //p' "$1" | head -1)"; [ -n "$u" ] && { echo "$u"; return; }; sleep 0.05; done; echo "no url in $1" >&2; exit 1; }
admin="bench-admin-$(od -An -N16 -tx1 /dev/urandom | tr -d " \n")"
BUNTING_ADMIN_TOKEN="$admin" "$target/release/bunting" serve --config "$work/node.toml" --http 127.0.0.1:0 \
  --data-dir "$work/data" --flags "$work/flags.json" > "$work/bunting.out" 2>"$work/bunting.err" &
pids+=($!)
"$target/release/examples/bare_ofrep" > "$work/bare.out" &
pids+=($!)
node_url="$(wait_url "$work/bunting.out")"; bare_url="$(wait_url "$work/bare.out")"
for _ in $(seq 1 200); do curl -fs "$node_url/readyz" >/dev/null && break; sleep 0.05; done
key="$(curl -fsS -X POST "$node_url/api/v1/tokens" -H "Authorization: Bearer $admin" -H 'content-type: application/json' \
  -d '{"name":"bench","scopes":["evaluate"],"flagSets":["default"]}' | sed -n 's/.*"token":"\([^"]*\)".*/\1/p')"
export KEY="$key"
export BODY='{"context":{"targetingKey":"user-123","email":"ann@example.com","plan":"pro","country":"NZ"}}'
# Sanity: the targeting flag really matches, and bulk returns 50 flags.
curl -fsS -X POST "$node_url/ofrep/v1/evaluate/flags/flag-35" -H "Authorization: Bearer $key" -H 'content-type: application/json' -d "$BODY"; echo
test "$(curl -fsS -X POST "$node_url/ofrep/v1/evaluate/flags" -H "Authorization: Bearer $key" -H 'content-type: application/json' -d "$BODY" | grep -o '"key"' | wc -l)" = 50

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
