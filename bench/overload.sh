#!/usr/bin/env bash
# The 10x spike (issue #12, item 10) on one node, everything on 127.0.0.1:
#   1. the single-flag OFREP run of bench/ofrep.sh against the bare axum handler (the hot path must
#      stay >= 0.85x bare with the connection and admission layers in place);
#   2. Bunting's peak at the benchmark's 32 connections, then 320 (10x) and 2,000 connections;
#      during each, /healthz is probed on a fresh connection every 100 ms with curl.
# Reports each load's 2xx rate as a ratio to the peak, the shed fraction (non-2xx: 503 with
# Retry-After) and the /healthz latency (p50 / p99 / max). Goals: ratio >= 0.9, /healthz <= 10 ms.
# Env: DURATION (10s), THREADS (1), ROUNDS (3). Installs wrk from Debian when missing.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
DURATION="${DURATION:-10s}"; THREADS="${THREADS:-1}"; ROUNDS="${ROUNDS:-3}"
# wrk holds up to 2,000 sockets and the node as many.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# The bench client is one address: its per-address cap must admit 2,000 connections.
EXTRA_LIMITS="max_connections_per_address = 4096"
trap bench_cleanup EXIT  # defined by common.sh; set first so a failed start leaves nothing behind
source "$root/bench/common.sh"
path=/ofrep/v1/evaluate/flags/flag-35
curl -fsS -X POST "$node_url$path" -H "Authorization: Bearer $KEY" -H 'content-type: application/json' -d "$BODY" >/dev/null

# /healthz on a fresh connection every 100 ms until the file $1.stop exists; seconds, one a line.
probe() { while [ ! -e "$1.stop" ]; do curl -s -o /dev/null -w '%{http_code} %{time_total}\n' --max-time 5 "$node_url/healthz" >> "$1" || echo "000 5" >> "$1"; sleep 0.1; done; }
# p50 / p99 / max in ms of a probe file, and how many probes were not 200.
summary() { awk '{ if ($1 != 200) bad++; print $2 * 1000 }' "$1" | sort -n | awk -v f="$1" '
  { v[NR] = $1 } END { if (NR == 0) { print "no probes"; exit }
    i50 = int(NR * 0.5); if (i50 < 1) i50 = 1; i99 = int(NR * 0.99 + 0.999); if (i99 > NR) i99 = NR
    printf "healthz p50 %.1f ms, p99 %.1f ms, max %.1f ms over %d probes", v[i50], v[i99], v[NR], NR }'
  printf ", %d not 200\n" "$(awk '$1 != 200' "$1" | wc -l)"; }

# CPU time (user + system, clock ticks) a process has used so far.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
run() { # name url conns server-pid
  local name="$1" url="$2" c="$3" pid="$4" line before after
  rm -f "$work/$name.probe" "$work/$name.probe.stop"; probe "$work/$name.probe" & local pp=$!
  before="$(cpu_ticks "$pid")"
  line="$(wrk -t"$THREADS" -c"$c" -d"$DURATION" -s "$root/bench/wrk-overload.lua" "$url$path" | grep '^RESULT')"
  after="$(cpu_ticks "$pid")"
  touch "$work/$name.probe.stop"; wait "$pp" || true
  # The server's CPU per request: steadier than a rate on a shared machine.
  line="$line cpu_us=$(awk -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" -v n="$(sed -n 's/.* requests=\([0-9]*\).*/\1/p' <<<"$line")" 'BEGIN { printf "%.1f", (n > 0 ? t * 1e6 / hz / n : 0) }')"
  printf '%-22s c=%-5s %s\n' "$name" "$c" "${line#RESULT }"
  printf '%-22s %s\n' "" "$(summary "$work/$name.probe")"
  echo "$line" > "$work/$name.result"
}
field() { sed -n "s/.* $2=\([0-9.]*\).*/\1/p" "$work/$1.result"; }
echo "wrk -t$THREADS -d$DURATION, $(nproc) cores shared by wrk and the servers; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
# This machine's speed drifts between runs (shared VM): a warm-up, then bare and Bunting in turn,
# ROUNDS times; the single-flag ratio is the median of the rounds' ratios, the peak the median of
# Bunting's rounds.
for u in "$bare_url" "$node_url"; do wrk -t"$THREADS" -c32 -d3s -s "$root/bench/wrk-overload.lua" "$u$path" >/dev/null; done
node_pid="${pids[0]}"; bare_pid="${pids[1]}"
ratios=(); peaks=(); bares=(); cpu_ratios=()
for r in $(seq 1 "$ROUNDS"); do
  run "bare-single-$r" "$bare_url" 32 "$bare_pid"
  run "bunting-peak-$r" "$node_url" 32 "$node_pid"
  ratios+=("$(awk -v a="$(field "bunting-peak-$r" ok_rps)" -v b="$(field "bare-single-$r" ok_rps)" 'BEGIN { printf "%.3f", a / b }')")
  cpu_ratios+=("$(awk -v a="$(field "bunting-peak-$r" cpu_us)" -v b="$(field "bare-single-$r" cpu_us)" 'BEGIN { printf "%.3f", b / a }')")
  peaks+=("$(field "bunting-peak-$r" ok_rps)")
  bares+=("$(field "bare-single-$r" ok_rps)")
done
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
peak="$(median "${peaks[@]}")"
run bunting-10x "$node_url" 320 "$node_pid"
run bunting-2000 "$node_url" 2000 "$node_pid"
# The same spike on the bare handler: how much of the loss at 2,000 is wrk's and the kernel's.
run bare-2000 "$bare_url" 2000 "$bare_pid"
echo "single-flag: bunting / bare axum = $(median "${ratios[@]}")x median of ${ratios[*]} (goal >= 0.85)"
echo "single-flag CPU per request: bare / bunting = $(median "${cpu_ratios[@]}")x median of ${cpu_ratios[*]}"
echo "peak (median of the rounds at 32 connections): $peak 2xx/s"
for n in bunting-10x bunting-2000; do
  awk -v n="$n" -v ok="$(field "$n" ok_rps)" -v p="$peak" -v shed="$(field "$n" non2xx)" -v all="$(field "$n" requests)" \
    'BEGIN { printf "%-13s 2xx rate / peak = %.2fx (goal >= 0.9), shed (non-2xx) %.2f%% of %d\n", n, ok / p, (all > 0 ? 100 * shed / all : 0), all }'
done
awk -v ok="$(field bare-2000 ok_rps)" -v p="$(median "${bares[@]}")" \
  'BEGIN { printf "bare-2000     2xx rate / bare at 32 = %.2fx (reference: the client and kernel at 2,000 connections)\n", ok / p }'
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
