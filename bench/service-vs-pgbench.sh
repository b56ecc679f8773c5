#!/usr/bin/env bash
# bench/service-vs-pgbench.sh: how close does the HTTP service come to PostgreSQL itself?
#
# Measures POST /transfers through HTTP (the release binary `contend serve`, default strategy
# `atomic`, driven by wrk with a Lua script that picks random account pairs and sends each
# `from` account's own bearer token), and pgbench running the service's transfer transaction
# (the same statements, prepared, same client count), in the same session against the same
# server and the same tables. Two workloads:
#   low contention: random distinct pair among 100 accounts;
#   hot account:    every transfer pays account 1 from a random other account (one hot row).
# For each client count and workload, service and pgbench runs alternate ROUNDS times; each
# pair of neighbouring runs gives a ratio, and the median ratio is reported (the machine is
# shared and its speed drifts over seconds: neighbouring runs see the same machine).
#
# Usage: bench/service-vs-pgbench.sh [POSTGRES_URL] [SECONDS]
#   POSTGRES_URL  default $CONTEND_PG_URL, else postgres://postgres@127.0.0.1:55432/app; the
#                 script creates a database of its own on that server and drops it at the end
#   SECONDS       per run, default 5
#   CLIENTS="16 64"  concurrent HTTP connections = pgbench clients, one or more counts
#   POOL=N        the service's --max-connections (default 16, the service's own default; three
#                 quarters serve requests, the rest stays for idempotency keys and reads)
#   ROUNDS=N      service/pgbench pairs per client count and workload (default 5)
#   CONTEND_BIN   the contend binary to measure (default: build the release binary); to compare
#                 two builds, run the script once with each
#   PIN=1         PostgreSQL on CPU 0, service, wrk and pgbench on CPU 1 (needs 2+ CPUs and the
#                 right to change the server's CPU affinity: same user, or root): the database
#                 then has a core of its own, as on a database server, instead of sharing both
#                 cores with its clients
# Needs: cargo, wrk, pgbench and psql (postgresql-client), curl, jq, python3 (taskset for PIN=1).
# Exit status: 0 when every median ratio reaches 0.8, 1 when one does not, 2 when a tool or run
# fails.
#
# What pgbench runs is the service's transaction for a transfer under `atomic` on PostgreSQL
# (crates/contend-service/src/bank.rs, TransferOp::atomic and TransferOp::record): BEGIN; one
# UPDATE of both balances, which locks both rows in id order first; one INSERT of the transfer and
# both of its ledger rows (a data-modifying WITH); COMMIT. The service sends BEGIN together with
# `SET LOCAL lock_timeout` and COMMIT as `SET LOCAL contend.commit_guard = 1; COMMIT` (each one
# simple query, the same round trips). On top of that the service does what a service must: HTTP, the bearer token (looked up
# once per instance and remembered, see --token-cache-secs), JSON, metrics and logs.
#
# Where the time goes (dev machine, 2 shared cores, measured with /proc CPU times and strace):
# per transfer the service makes 4 round trips to PostgreSQL (as pgbench does) and one HTTP
# exchange, and uses ~85 us of CPU per request where pgbench's client uses ~35 us per
# transaction and wrk ~10 us; the loopback sends that wake another process cost ~10 us each on
# this VM. With every process on the same 2 cores, that client CPU is taken from PostgreSQL, so
# at 16 clients the service reaches ~0.65-0.75 of pgbench; with the database on a core of its own
# (PIN=1) it keeps PostgreSQL as busy as pgbench does. At 64 clients pgbench's 64 backends
# thrash while the service's pool keeps a few busy, and the service is faster than pgbench.
#
# perf (2026-11-30: `perf record -F 999 -g -p <serve>` for 8 s under wrk, 16 connections, 100
# accounts, release build): 55% of the service's samples in the kernel (switching tasks in 32%,
# epoll and futex waits, TCP send/receive), 38% in the binary spread flat over hyper, axum, tokio,
# sqlx and contend (the largest: the handler future 1.5%, malloc+free 2.7%, tracing's
# Instrumented 0.7%, contend's Backend::sql 0.7%), 6% libc: no hot spot in user code. The lever was
# the connection count: with POOL=8 (the old default here) the service had at most 6 transactions
# in flight where pgbench has 16. Alternated on the loaded machine (ROUNDS=5, 3 s, 16 clients,
# 100 accounts): POOL=8 0.52-0.53, POOL=16 1.06, POOL=24 0.77 (medians; spread is large while
# other jobs build). On one hot account the pool does not matter (0.70-0.74): the row lock is.
# On the quiet machine (2026-11-30 15:15 UTC, load 4-6 from this script itself, ROUNDS=5, 3 s, 16
# clients): 100 accounts 5,191 vs 9,098 = 0.56, one hot account 1,895 vs 2,188 = 0.85: the 1.06 above
# was pgbench slowed by the other jobs more than the service. CPU per transaction (perf stat
# task-clock on the service's pid while wrk runs, loaded machine): service ~150 us, pgbench's client
# ~40 us; 2.3-5 context switches per request against pgbench's 1.3; a one-worker runtime
# (TOKIO_WORKER_THREADS=1) removes the futex wake-ups but not the CPU per request (152 vs 149 us).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

URL=${1:-${CONTEND_PG_URL:-postgres://postgres@127.0.0.1:55432/app}}
SECS=${2:-5}
CLIENT_COUNTS=${CLIENTS:-16 64}
POOL=${POOL:-16}
ROUNDS=${ROUNDS:-5}
PIN=${PIN:-0}
THREADS=2
ACCOUNTS=100
ADMIN=bench-admin-$$-$RANDOM

TOOLS="cargo wrk pgbench psql curl jq python3"
[ "$PIN" = 1 ] && TOOLS="$TOOLS taskset"
require_tools service-vs-pgbench $TOOLS
require_pg_url service-vs-pgbench "$URL"

BIN=$(contend_bin)

# A database of our own on the same server: URL with the database name replaced.
DBNAME=bench_svc_$$_$RANDOM
DB_URL=$(url_with_database "$URL" "$DBNAME")
PORT=$(free_port)
BASE=http://127.0.0.1:$PORT
WORK=$(mktemp -d)
PID=
PG_PIDS=
cleanup() {
  if [ -n "$PG_PIDS" ]; then
    for p in $PG_PIDS $(pgrep -P "${PG_PIDS%% *}" 2>/dev/null); do taskset -a -p "$ALL_CPUS" "$p" >/dev/null 2>&1 || true; done
  fi
  stop_process "$PID"
  psql -q "$URL" -c "DROP DATABASE IF EXISTS $DBNAME WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

psql -q -v ON_ERROR_STOP=1 "$URL" -c "CREATE DATABASE $DBNAME" >/dev/null

# PIN=1: the server (postmaster and its backends, present and future) on CPU 0, clients on CPU 1.
ALL_CPUS=$(printf '0x%x' $(( (1 << $(nproc)) - 1 )))
ON_CLIENT_CPU=()
if [ "$PIN" = 1 ]; then
  [ "$(nproc)" -ge 2 ] || { echo "service-vs-pgbench: PIN=1 needs 2 CPUs" >&2; exit 2; }
  datadir=$(psql -Atq "$URL" -c "SHOW data_directory")
  postmaster=$(head -1 "$datadir/postmaster.pid" 2>/dev/null) \
    || { echo "service-vs-pgbench: PIN=1 needs the server on this machine (and its data directory readable)" >&2; exit 2; }
  PG_PIDS="$postmaster"
  for p in $postmaster $(pgrep -P "$postmaster"); do
    taskset -a -p 0x1 "$p" >/dev/null || { echo "service-vs-pgbench: cannot pin PostgreSQL (pid $p)" >&2; exit 2; }
  done
  ON_CLIENT_CPU=(taskset 0x2)
fi

echo "starting the service on $BASE (pool of $POOL connections)..." >&2
RUST_LOG=warn "${ON_CLIENT_CPU[@]}" "$BIN" serve --database-url "$DB_URL" --listen "127.0.0.1:$PORT" \
  --admin-token "$ADMIN" --max-connections "$POOL" >"$WORK/service.log" 2>&1 &
PID=$!
wait_for_service service-vs-pgbench "$BASE" "$PID" "$WORK/service.log"

# Accounts through the API; the balance cannot run out during the measurements.
echo "creating $ACCOUNTS accounts through the API..." >&2
: >"$WORK/accounts.tsv"
for i in $(seq 1 $ACCOUNTS); do
  curl -fs -X POST "$BASE/accounts" -H "Authorization: Bearer $ADMIN" \
    -H 'Content-Type: application/json' -d "{\"owner\": \"bench$i\", \"balance\": 1000000000000}" \
    | jq -r '[.id, .token] | @tsv' >>"$WORK/accounts.tsv"
done
[ "$(wc -l <"$WORK/accounts.tsv")" -eq $ACCOUNTS ] || { echo "service-vs-pgbench: account creation failed" >&2; exit 2; }
HOT=$(head -1 "$WORK/accounts.tsv" | cut -f1)
FIRST=$HOT
LAST=$(tail -1 "$WORK/accounts.tsv" | cut -f1)
[ $((LAST - FIRST + 1)) -eq $ACCOUNTS ] || { echo "service-vs-pgbench: account ids are not consecutive" >&2; exit 2; }

# wrk: a Lua table of the accounts, and a request generator per workload.
{
  echo "ids, tokens = {}, {}"
  while IFS=$'\t' read -r id token; do echo "ids[#ids+1] = $id; tokens[$id] = \"$token\""; done <"$WORK/accounts.tsv"
  cat <<LUA
local hot = tonumber(os.getenv("HOT_MODE") or "0") == 1
local n = #ids
function init(args) math.randomseed(os.time() + math.floor(os.clock() * 1e6)) end
function request()
  local from, to
  if hot then
    to = ids[1]
    from = ids[math.random(2, n)]
  else
    local a = math.random(1, n)
    local b = math.random(1, n - 1)
    if b >= a then b = b + 1 end
    from, to = ids[a], ids[b]
  end
  return wrk.format("POST", "/transfers", {
    ["Authorization"] = "Bearer " .. tokens[from],
    ["Content-Type"] = "application/json",
  }, '{"from":' .. from .. ',"to":' .. to .. ',"amount":1}')
end
function done(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %.3f\n", summary.requests, summary.duration,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout, latency:percentile(99) / 1000))
end
LUA
} >"$WORK/transfers.lua"

# pgbench: the service's transfer transaction for the `atomic` strategy on PostgreSQL
# (crates/contend-service/src/bank.rs, TransferOp::atomic and TransferOp::record), with the
# service's `?` placeholders as pgbench variables (pgbench sends them untyped: hence the casts
# where PostgreSQL cannot infer a type).
write_pgbench() { # $1 hot(0/1)
  if [ "$1" = 1 ]; then
    echo "\\set from random($((FIRST + 1)), $LAST)"
    echo "\\set to $HOT"
  else
    echo "\\set from random($FIRST, $LAST)"
    echo "\\set d random(1, $((ACCOUNTS - 1)))"
    echo "\\set to $FIRST + ((:from - $FIRST + :d) % $ACCOUNTS)"
  fi
  cat <<'SQL'
BEGIN;
UPDATE accounts AS a SET balance = CASE WHEN a.id = :from THEN a.balance - 1 ELSE a.balance + 1 END, version = a.version + 1 FROM (SELECT id FROM accounts WHERE id IN (:from, :to) ORDER BY id FOR NO KEY UPDATE) AS l WHERE a.id = l.id AND CASE WHEN a.id = :from THEN a.balance >= 1 ELSE a.balance <= 999999999999999 END;
WITH t AS (INSERT INTO transfers (from_id, to_id, amount) VALUES (:from, :to, 1) RETURNING id) INSERT INTO ledger (account_id, amount, kind, ref_id) SELECT :from::bigint, -1::bigint, 'transfer', id FROM t UNION ALL SELECT :to::bigint, 1::bigint, 'transfer', id FROM t RETURNING ref_id;
COMMIT;
SQL
}
write_pgbench 0 >"$WORK/low.sql"
write_pgbench 1 >"$WORK/hot.sql"
run_service() { # $1 hot(0/1) $2 clients -> "tps p99ms"
  local out line
  out=$(HOT_MODE=$1 "${ON_CLIENT_CPU[@]}" wrk -t "$THREADS" -c "$2" -d "${SECS}s" -s "$WORK/transfers.lua" "$BASE" 2>&1) \
    || { echo "service-vs-pgbench: wrk failed: $out" >&2; exit 2; }
  line=$(grep '^RESULT ' <<<"$out") || { echo "service-vs-pgbench: no wrk result: $out" >&2; exit 2; }
  read -r _ reqs usecs errors p99 <<<"$line"
  if [ "$errors" -ne 0 ]; then
    echo "service-vs-pgbench: $errors failed requests (non-2xx or socket errors)" >&2
    grep -E 'Non-2xx|Socket errors' <<<"$out" >&2 || true
    exit 2
  fi
  python3 -c "print(f'{$reqs / ($usecs / 1e6):.0f} $p99')"
}

run_pgbench() { # $1 script $2 clients -> "tps p99ms"
  local dir out
  dir=$(mktemp -d "$WORK/pgb.XXXX")
  out=$(cd "$dir" && "${ON_CLIENT_CPU[@]}" pgbench -n -M prepared -c "$2" -j "$THREADS" -T "$SECS" -l -f "$1" "$DB_URL" 2>&1) \
    || { echo "service-vs-pgbench: pgbench failed: $out" >&2; exit 2; }
  if grep -q 'number of failed transactions: [1-9]' <<<"$out"; then
    echo "service-vs-pgbench: pgbench had failed transactions: $out" >&2; exit 2
  fi
  local tps p99
  tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out" | head -1)
  p99=$(cat "$dir"/pgbench_log.* | awk '{print $3}' | sort -n | python3 -c '
import sys
v = [int(x) for x in sys.stdin if x.strip()]
print(f"{v[min(len(v) - 1, int(len(v) * 0.99))] / 1000:.3f}" if v else "nan")')
  rm -rf "$dir"
  printf '%.0f %s\n' "$tps" "$p99"
}


status=0
printf '\n%-8s %-15s %12s %10s %12s %10s %7s\n' clients workload "service tx/s" "p99 ms" "pgbench tx/s" "p99 ms" ratio
for clients in $CLIENT_COUNTS; do
  for mode in low hot; do
    hot=0; [ "$mode" = hot ] && hot=1
    : >"$WORK/svc"; : >"$WORK/pgb"; : >"$WORK/ratio"
    for round in $(seq 1 "$ROUNDS"); do
      # Which side goes first alternates, so neither always runs on a machine the other warmed.
      if [ $((round % 2)) = 1 ]; then
        read -r stps sp99 < <(run_service $hot "$clients")
        read -r ptps pp99 < <(run_pgbench "$WORK/$mode.sql" "$clients")
      else
        read -r ptps pp99 < <(run_pgbench "$WORK/$mode.sql" "$clients")
        read -r stps sp99 < <(run_service $hot "$clients")
      fi
      echo "$stps $sp99" >>"$WORK/svc"; echo "$ptps $pp99" >>"$WORK/pgb"
      python3 -c "print($stps / $ptps)" >>"$WORK/ratio"
    done
    stps=$(median $(cut -d' ' -f1 "$WORK/svc")); sp99=$(median $(cut -d' ' -f2 "$WORK/svc"))
    ptps=$(median $(cut -d' ' -f1 "$WORK/pgb")); pp99=$(median $(cut -d' ' -f2 "$WORK/pgb"))
    ratio=$(median $(cat "$WORK/ratio"))
    label=$([ "$mode" = low ] && echo "100 accounts" || echo "1 hot account")
    printf '%-8s %-15s %12.0f %10.2f %12.0f %10.2f %7.2f\n' "$clients" "$label" "$stps" "$sp99" "$ptps" "$pp99" "$ratio"
    python3 -c "import sys; sys.exit(0 if $ratio >= 0.8 else 1)" || status=1
  done
done

# The service's books still balance after everything (pgbench wrote through the same tables).
audit=$(curl -fs "$BASE/audit" -H "Authorization: Bearer $ADMIN")
echo "audit: $(jq -c '{accounts, total_balance, consistent}' <<<"$audit")"
[ "$(jq -r .consistent <<<"$audit")" = true ] || { echo "service-vs-pgbench: audit inconsistent: $audit" >&2; status=2; }
pinned=$([ "$PIN" = 1 ] && echo "PostgreSQL on CPU 0, clients on CPU 1" || echo "all processes share all CPUs")
echo "(service pool $POOL; $SECS s per run; medians of $ROUNDS alternating pairs; $pinned; target ratio >= 0.8)"
exit $status
