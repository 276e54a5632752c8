#!/usr/bin/env bash
# Bunting's OFREP against Unleash Edge's frontend API, same 50 flags (bench/flags50.py), same wrk
# load, one run, both on 127.0.0.1 (wrk and the servers share the machine's cores; the servers run
# one after the other, never at once). Installs unleash-edge from crates.io with
# `cargo install --locked` into a temporary directory (about 8 minutes on 2 idle cores; set
# UNLEASH_EDGE_ROOT to reuse an earlier install) and runs it in offline mode.
# Compared: one flag for a context (Bunting POST /ofrep/v1/evaluate/flags/{key}, Edge
# GET /api/frontend/features/{name}) and every flag for a context (Bunting bulk OFREP, Edge
# GET /api/frontend). Env: DURATION (10s), THREADS (1), CONNS (32).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
DURATION="${DURATION:-10s}"; THREADS="${THREADS:-1}"; CONNS="${CONNS:-32}"
if ! command -v wrk >/dev/null; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
  else sudo apt-get install -y wrk; fi
fi
work="$(mktemp -d)"; pid=""
cleanup() { [ -n "$pid" ] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }; rm -rf "$work"; }
trap cleanup EXIT

edge_root="${UNLEASH_EDGE_ROOT:-$work/unleash-edge}"
if [ ! -x "$edge_root/bin/unleash-edge" ]; then
  echo "installing unleash-edge into $edge_root (cargo install --locked) ..."
  cargo install --quiet --locked unleash-edge --root "$edge_root"
fi
cargo build --quiet --release --locked -p bunting-node --bin bunting --manifest-path "$root/Cargo.toml"
target="$(cargo metadata --format-version 1 --no-deps --manifest-path "$root/Cargo.toml" | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
python3 "$root/bench/flags50.py" flagd > "$work/flags.json"
python3 "$root/bench/flags50.py" unleash > "$work/unleash.json"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 400); do curl -fs "$@" >/dev/null 2>&1 && return; sleep 0.05; done; echo "not up: $*" >&2; exit 1; }
ctx_json='{"context":{"targetingKey":"user-123","email":"ann@example.com","plan":"pro"}}'
ctx_query='userId=user-123&properties%5Bemail%5D=ann%40example.com&properties%5Bplan%5D=pro'
measure() { # name, then wrk arguments; prints and records requests/s
  local name="$1"; shift
  local line; line="$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" "$@" | grep '^RESULT')"
  printf '%-22s %s\n' "$name" "${line#RESULT }"
  echo "$line" | sed -n 's/.*rps=\([0-9]*\).*/\1/p' > "$work/$name.rps"
}
echo "wrk -t$THREADS -c$CONNS -d$DURATION, $(nproc) cores"

# --- Unleash Edge, offline mode ---
port="$(free_port)"; token='*:development.benchsecret'
"$edge_root/bin/unleash-edge" -i 127.0.0.1 -p "$port" offline -b "$work/unleash.json" \
  --frontend-tokens "$token" --client-tokens "$token" > "$work/edge.log" 2>&1 &
pid=$!
wait_http -H "Authorization: $token" "http://127.0.0.1:$port/api/frontend?$ctx_query"
edge_bulk="$(curl -fsS -H "Authorization: $token" "http://127.0.0.1:$port/api/frontend?$ctx_query" | python3 -c 'import json, sys; print(len(json.load(sys.stdin)["toggles"]))')"
echo "edge: /api/frontend lists $edge_bulk enabled toggles for the context"
cat > "$work/get.lua" <<LUA
wrk.headers["Authorization"] = "$token"
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT rps=%.0f p50_ms=%.3f p99_ms=%.3f non2xx_or_errors=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, e.status + e.connect + e.read + e.write + e.timeout))
end
LUA
measure edge-single -s "$work/get.lua" "http://127.0.0.1:$port/api/frontend/features/flag-35?$ctx_query"
measure edge-all -s "$work/get.lua" "http://127.0.0.1:$port/api/frontend?$ctx_query"
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""

# --- Bunting ---
cat > "$work/node.toml" <<'TOML'
store = "memory"
[limits]
requests_per_second_per_token = 100000000
burst_per_token = 100000000
[telemetry]
log_filter = "warn"
TOML
admin="bench-admin-$(od -An -N16 -tx1 /dev/urandom | tr -d " \n")"
BUNTING_ADMIN_TOKEN="$admin" "$target/release/bunting" serve --config "$work/node.toml" --http 127.0.0.1:0 \
  --data-dir "$work/data" --flags "$work/flags.json" > "$work/bunting.out" 2>&1 &
pid=$!
for _ in $(seq 1 400); do url="$(sed -n 's/^listening on //p' "$work/bunting.out" | head -1)"; [ -n "$url" ] && break; sleep 0.05; done
wait_http "$url/readyz"
export KEY="$(curl -fsS -X POST "$url/api/v1/tokens" -H "Authorization: Bearer $admin" -H 'content-type: application/json' \
  -d '{"name":"bench","scopes":["evaluate"],"flagSets":["default"]}' | sed -n 's/.*"token":"\([^"]*\)".*/\1/p')"
export BODY="$ctx_json"
measure bunting-single -s "$root/bench/wrk-post.lua" "$url/ofrep/v1/evaluate/flags/flag-35"
measure bunting-all -s "$root/bench/wrk-post.lua" "$url/ofrep/v1/evaluate/flags"

ratio() { awk -v a="$(cat "$work/$1.rps")" -v b="$(cat "$work/$2.rps")" 'BEGIN { printf "%.2f", a / b }'; }
echo "one flag:   bunting / unleash-edge = $(ratio bunting-single edge-single)x (goal >= 1.5)"
echo "all flags:  bunting / unleash-edge = $(ratio bunting-all edge-all)x"
