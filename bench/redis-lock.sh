#!/usr/bin/env bash
# bench/redis-lock.sh [REDIS_URL | PORT]: the Redis lock against redis-benchmark.
#
# 1. redis-benchmark runs the two commands an acquire + release pair costs at best:
#    `SET key token NX PX lease` and `EVALSHA <release script> 1 key token channel`
#    (50 clients, random keys); their combined rate is one pair per (1/r1 + 1/r2) seconds.
# 2. The lock_bench example (release build) runs acquire + release pairs on uncontended keys with
#    50 tasks over one LockClient, then contended handoffs (16 waiters on one key).
# Prints both rates, their ratio (target >= 0.8) and the handoff latency (target p50 < 1 ms).
#
# Default target: redis://127.0.0.1:56379/0 (or $CONTEND_REDIS_URL). Needs redis-cli and
# redis-benchmark on PATH. Keys are namespaced and removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

target=${1:-${CONTEND_REDIS_URL:-redis://127.0.0.1:56379/0}}
if [[ $target =~ ^[0-9]+$ ]]; then
  url="redis://127.0.0.1:$target/0"
else
  url=$target
fi
hostport=${url#*://}
hostport=${hostport##*@}
hostport=${hostport%%/*}
host=${hostport%%:*}
port=${hostport##*:}
[[ $port == "$host" ]] && port=6379
requests=${BENCH_REQUESTS:-100000}
clients=${BENCH_CLIENTS:-50}

for tool in redis-cli redis-benchmark; do
  command -v "$tool" >/dev/null || { echo "redis-lock.sh: $tool not found" >&2; exit 2; }
done

release='if redis.call("GET", KEYS[1]) == ARGV[1] then redis.call("DEL", KEYS[1]); redis.call("PUBLISH", ARGV[2], "1"); return 1 end return 0'
sha=$(redis-cli -h "$host" -p "$port" SCRIPT LOAD "$release")

rate() { # the requests-per-second figure of one redis-benchmark -q run
  redis-benchmark -h "$host" -p "$port" -c "$clients" -n "$requests" -r 1000000 -q "$@" \
    | tr '\r' '\n' | grep -o '[0-9.]* requests per second' | tail -1 | cut -d' ' -f1
}

echo "== redis-benchmark at $host:$port ($clients clients, $requests requests each)"
set_rate=$(rate SET contend-bench:__rand_int__ token NX PX 10000)
evalsha_rate=$(rate EVALSHA "$sha" 1 contend-bench:__rand_int__ token contend-bench:released)
pair_rate=$(awk -v a="$set_rate" -v b="$evalsha_rate" 'BEGIN { printf "%.0f", 1 / (1 / a + 1 / b) }')
echo "SET NX PX:          $set_rate/s"
echo "EVALSHA release:    $evalsha_rate/s"
echo "pair (both):        $pair_rate/s"
redis-cli -h "$host" -p "$port" --scan --pattern 'contend-bench:*' \
  | xargs -r -n 500 redis-cli -h "$host" -p "$port" DEL >/dev/null

echo "== contend-redis lock_bench (release build)"
out=$(cargo run --quiet --release -p contend-redis --example lock_bench -- \
  --url "$url" --concurrency "$clients" --ops "$requests")
echo "$out"
lock_rate=$(sed -n 's/^uncontended_pairs_per_sec=//p' <<<"$out")
p50=$(sed -n 's/^handoff_p50_ms=//p' <<<"$out")
# The bench namespaces its keys (bench-XXXXXXXX:*); remove them.
redis-cli -h "$host" -p "$port" --scan --pattern 'bench-*' \
  | xargs -r -n 500 redis-cli -h "$host" -p "$port" DEL >/dev/null

ratio=$(awk -v a="$lock_rate" -v b="$pair_rate" 'BEGIN { printf "%.2f", a / b }')
echo "== summary"
echo "uncontended acquire+release: $lock_rate pairs/s vs redis-benchmark $pair_rate pairs/s: ratio $ratio (target >= 0.80)"
echo "contended handoff p50: $p50 ms (target < 1 ms)"
