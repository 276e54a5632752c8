#!/usr/bin/env bash
# Runs an unmodified OpenFeature JavaScript SDK (@openfeature/server-sdk + @openfeature/ofrep-provider,
# installed from npm into a temporary directory) against a real `bunting serve` on 127.0.0.1.
# Needs node >= 18 and npm. Usage: bash tests/ofrep-js/run.sh   (from anywhere)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
work="$(mktemp -d)"
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

cargo build --quiet --locked -p bunting-node --bin bunting --manifest-path "$root/Cargo.toml"
target_dir="$(cargo metadata --format-version 1 --no-deps --manifest-path "$root/Cargo.toml" \
  | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).target_directory))')"
bunting="$target_dir/debug/bunting"

(cd "$work" && npm init -y >/dev/null && npm install --no-audit --no-fund --silent \
  @openfeature/server-sdk@^1 @openfeature/ofrep-provider@^0.1 @openfeature/ofrep-core@^0.1 >/dev/null)
cp "$here/ofrep.test.mjs" "$work/"
cat > "$work/flags.json" <<'JSON'
{
  "metadata": {"flagSetId": "shop"},
  "flags": {
    "new-banner": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
                   "targeting": {"if": [{"ends_with": [{"var": "email"}, "@example.com"]}, "on", null]},
                   "metadata": {"owner": "growth"}},
    "button-color": {"state": "ENABLED", "variants": {"green": "#1B873F", "blue": "#0969DA"}, "defaultVariant": "green"},
    "page-size": {"state": "ENABLED", "variants": {"small": 10, "large": 50}, "defaultVariant": "small",
                  "targeting": {"if": [{"==": [{"var": "plan"}, "enterprise"]}, "large", null]}},
    "ratio": {"state": "ENABLED", "variants": {"half": 0.5}, "defaultVariant": "half"},
    "pricing": {"state": "ENABLED", "variants": {"control": {"monthly": 9.99, "trialDays": 14}}, "defaultVariant": "control"},
    "old-checkout": {"state": "DISABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on"}
  }
}
JSON

admin="admin-$(od -An -N16 -tx1 /dev/urandom | tr -d " \n")"
BUNTING_ADMIN_TOKEN="$admin" RUST_LOG=warn "$bunting" serve --http 127.0.0.1:0 --store memory \
  --data-dir "$work/data" --flags "$work/flags.json" > "$work/serve.out" &
pid=$!
url=""
for _ in $(seq 1 200); do
  url="$(sed -n 's/^listening on //p' "$work/serve.out" | head -1)"
  if [ -n "$url" ] && curl -fs "$url/readyz" >/dev/null 2>&1; then break; fi
  sleep 0.05
done
[ -n "$url" ] || { echo "bunting serve did not start"; exit 1; }

key="$(curl -fsS -X POST "$url/api/v1/tokens" -H "Authorization: Bearer $admin" \
  -H 'content-type: application/json' \
  -d '{"name": "js-sdk", "scopes": ["evaluate"], "flagSets": ["default"]}' \
  | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).token))')"

cd "$work"
BUNTING_URL="$url" BUNTING_SDK_KEY="$key" node --test ofrep.test.mjs
