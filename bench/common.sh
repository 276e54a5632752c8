# Sourced by bench/ofrep.sh and bench/overload.sh: builds the release binaries, starts one node
# (memory store, the 50 flags of flags50.py) and the bare axum handler on 127.0.0.1, and exports
# node_url, bare_url, KEY (an evaluate token for `default`) and BODY. Set EXTRA_LIMITS to add
# lines to the node's [limits] table. The caller's EXIT trap must call bench_cleanup.
if ! command -v wrk >/dev/null; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
  else sudo apt-get install -y wrk; fi
fi
work="$(mktemp -d)"; pids=()
bench_cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }

cargo build --quiet --release --locked -p bunting-node --bin bunting --example bare_ofrep --manifest-path "$root/Cargo.toml"
target="$(cargo metadata --format-version 1 --no-deps --manifest-path "$root/Cargo.toml" | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"

# 50 flags: 30 static booleans, 10 with targeting on email and plan, 10 fractional rollouts.
python3 "$root/bench/flags50.py" flagd > "$work/flags.json"
cat > "$work/node.toml" <<TOML
node_id = "bench-1"
region = "local"
store = "memory"
[limits]
requests_per_second_per_token = 100000000
burst_per_token = 100000000
${EXTRA_LIMITS:-}
[telemetry]
log_filter = "warn"
TOML

wait_url() { for _ in $(seq 1 400); do u="$(sed -n 's/^listening on //p' "$1" | head -1)"; [ -n "$u" ] && { echo "$u"; return; }; sleep 0.05; done; echo "no url in $1; its stderr:" >&2; cat "${1%.out}.err" >&2 2>/dev/null; exit 1; }
# Bootstrap tokens need 32 characters or more.
admin="bench-admin-$(od -An -N16 -tx1 /dev/urandom | tr -d " \n")"
BUNTING_ADMIN_TOKEN="$admin" "$target/release/bunting" serve --config "$work/node.toml" --http 127.0.0.1:0 \
  --data-dir "$work/data" --flags "$work/flags.json" > "$work/bunting.out" 2>"$work/bunting.err" &
pids+=($!)
"$target/release/examples/bare_ofrep" > "$work/bare.out" 2>"$work/bare.err" &
pids+=($!)
node_url="$(wait_url "$work/bunting.out")"; bare_url="$(wait_url "$work/bare.out")"
for _ in $(seq 1 200); do curl -fs "$node_url/readyz" >/dev/null && break; sleep 0.05; done
KEY="$(curl -fsS -X POST "$node_url/api/v1/tokens" -H "Authorization: Bearer $admin" -H 'content-type: application/json' \
  -d '{"name":"bench","scopes":["evaluate"],"flagSets":["default"]}' | sed -n 's/.*"token":"\([^"]*\)".*/\1/p')"
export KEY
export BODY='{"context":{"targetingKey":"user-123","email":"ann@example.com","plan":"pro","country":"NZ"}}'
