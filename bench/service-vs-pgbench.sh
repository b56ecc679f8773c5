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
# Prints throughput, p99 latency and the ratio service/pgbench for each (target: >= 0.8).
#
# Usage: bench/service-vs-pgbench.sh [POSTGRES_URL] [SECONDS]
#   POSTGRES_URL  default $CONTEND_PG_URL, else postgres://postgres@127.0.0.1:55432/app; the
#                 script creates a database of its own on that server and drops it at the end
#   SECONDS       per measurement, default 10
#   CLIENTS=N     concurrent HTTP connections = pgbench clients = service pool size (default 16)
#   ROUNDS=N      measure each pair N times, alternating (default 2); the best round of each
#                 side is compared (the machine is shared: the best round is the least disturbed)
# Needs: cargo, wrk, pgbench and psql (postgresql-client), curl, jq, python3.
# Exit status: 0 when both ratios reach 0.8, 1 when one does not, 2 when a tool or run fails.
#
# Where the service's time goes (measured on the dev machine: 2 shared cores, so PostgreSQL, the
# service and the load generator compete for CPU and the uncontended run is CPU-bound):
# per transfer the service sends 7 messages to PostgreSQL (the token lookup, then the same 6 as
# pgbench: BEGIN with SET LOCAL lock_timeout in one, 2 UPDATEs, 2 INSERTs, COMMIT), keeps its
# connection for the next request (no pool test round trip), and uses ~150 us of CPU per request
# (about half of it in the kernel's loopback send path, waking PostgreSQL), where pgbench uses
# ~60 us per transaction. That client CPU, taken from PostgreSQL's share of the 2 cores, is what
# separates the two at low contention; on the hot row both wait for the row lock instead.
#
# What pgbench runs is only the transaction (BEGIN, two conditional UPDATEs in id order, INSERT
# the transfer RETURNING id, one INSERT of both ledger rows, COMMIT). The service does that too, plus what a
# service must: HTTP parsing, the bearer token lookup (one indexed SELECT per request, so that a
# removed token stops working at once), JSON, metrics and logs.
set -euo pipefail
cd "$(dirname "$0")/.."

URL=${1:-${CONTEND_PG_URL:-postgres://postgres@127.0.0.1:55432/app}}
SECS=${2:-10}
CLIENTS=${CLIENTS:-16}
ROUNDS=${ROUNDS:-2}
THREADS=2
ACCOUNTS=100
ADMIN=bench-admin-$$-$RANDOM

for tool in cargo wrk pgbench psql curl jq python3; do
  command -v "$tool" >/dev/null || { echo "service-vs-pgbench: $tool not found" >&2; exit 2; }
done
case "$URL" in postgres://*|postgresql://*) ;; *) echo "service-vs-pgbench: not a PostgreSQL URL: $URL" >&2; exit 2 ;; esac

echo "building the release binary..." >&2
cargo build --release -q -p contend-cli
BIN=target/release/contend

# A database of our own on the same server: URL with the database name replaced.
DBNAME=bench_svc_$$_$RANDOM
DB_URL=$(python3 - "$URL" "$DBNAME" <<'PY'
import sys, urllib.parse as u
p = u.urlsplit(sys.argv[1])
print(u.urlunsplit((p.scheme, p.netloc, "/" + sys.argv[2], p.query, p.fragment)))
PY
)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE=http://127.0.0.1:$PORT
WORK=$(mktemp -d)
PID=
cleanup() {
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
    kill -TERM "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  psql -q "$URL" -c "DROP DATABASE IF EXISTS $DBNAME WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

psql -q -v ON_ERROR_STOP=1 "$URL" -c "CREATE DATABASE $DBNAME" >/dev/null

echo "starting the service on $BASE (pool of $CLIENTS connections)..." >&2
RUST_LOG=warn "$BIN" serve --database-url "$DB_URL" --listen "127.0.0.1:$PORT" \
  --admin-token "$ADMIN" --max-connections "$CLIENTS" >"$WORK/service.log" 2>&1 &
PID=$!
for _ in $(seq 1 100); do
  curl -fs "$BASE/healthz" >/dev/null 2>&1 && break
  kill -0 "$PID" 2>/dev/null || { echo "service-vs-pgbench: the service exited:" >&2; cat "$WORK/service.log" >&2; exit 2; }
  sleep 0.1
done
curl -fs "$BASE/healthz" >/dev/null || { echo "service-vs-pgbench: the service did not come up" >&2; exit 2; }

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

# pgbench: the service's transfer transaction for the `atomic` strategy
# (crates/contend-service/src/bank.rs, TransferOp::atomic and TransferOp::record): both UPDATEs
# in id order, each with its own condition; the transfer row; both ledger rows in one INSERT.
# The service sends `BEGIN; SET LOCAL lock_timeout = '5000ms'` as one simple query; pgbench sends
# BEGIN alone (the same round trip count).
write_pgbench() { # $1 file, $2 hot(0/1)
  if [ "$2" = 1 ]; then
    echo "\\set from random($((FIRST + 1)), $LAST)"
    echo "\\set to $HOT"
  else
    echo "\\set from random($FIRST, $LAST)"
    echo "\\set d random(1, $((ACCOUNTS - 1)))"
    echo "\\set to $FIRST + ((:from - $FIRST + :d) % $ACCOUNTS)"
  fi
  cat <<'SQL'
BEGIN;
\if :from < :to
UPDATE accounts SET balance = balance - 1, version = version + 1 WHERE id = :from AND balance >= 1;
UPDATE accounts SET balance = balance + 1, version = version + 1 WHERE id = :to AND balance <= 999999999999999;
\else
UPDATE accounts SET balance = balance + 1, version = version + 1 WHERE id = :to AND balance <= 999999999999999;
UPDATE accounts SET balance = balance - 1, version = version + 1 WHERE id = :from AND balance >= 1;
\endif
INSERT INTO transfers (from_id, to_id, amount) VALUES (:from, :to, 1) RETURNING id \gset
INSERT INTO ledger (account_id, amount, kind, ref_id) VALUES (:from, -1, 'transfer', :id), (:to, 1, 'transfer', :id);
COMMIT;
SQL
} 
write_pgbench "$WORK/low.sql" 0 >"$WORK/low.sql"
write_pgbench "$WORK/hot.sql" 1 >"$WORK/hot.sql"

run_service() { # $1 hot(0/1) -> "tps p99ms"
  local out line
  out=$(HOT_MODE=$1 wrk -t "$THREADS" -c "$CLIENTS" -d "${SECS}s" -s "$WORK/transfers.lua" "$BASE" 2>&1) \
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

run_pgbench() { # $1 script -> "tps p99ms"
  local dir out
  dir=$(mktemp -d "$WORK/pgb.XXXX")
  out=$(cd "$dir" && pgbench -n -M prepared -c "$CLIENTS" -j "$THREADS" -T "$SECS" -l -f "$1" "$DB_URL" 2>&1) \
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

best() { sort -n -k1 | tail -1; }

status=0
printf '\n%-15s %12s %10s %12s %10s %7s\n' workload "service tx/s" "p99 ms" "pgbench tx/s" "p99 ms" ratio
for mode in low hot; do
  hot=0; [ "$mode" = hot ] && hot=1
  : >"$WORK/svc.$mode"; : >"$WORK/pgb.$mode"
  for _ in $(seq 1 "$ROUNDS"); do
    run_service $hot >>"$WORK/svc.$mode"
    run_pgbench "$WORK/$mode.sql" >>"$WORK/pgb.$mode"
  done
  read -r stps sp99 < <(best <"$WORK/svc.$mode")
  read -r ptps pp99 < <(best <"$WORK/pgb.$mode")
  ratio=$(python3 -c "print(f'{$stps / $ptps:.2f}')")
  label=$([ "$mode" = low ] && echo "100 accounts" || echo "1 hot account")
  printf '%-15s %12s %10s %12s %10s %7s\n' "$label" "$stps" "$sp99" "$ptps" "$pp99" "$ratio"
  python3 -c "import sys; sys.exit(0 if $stps / $ptps >= 0.8 else 1)" || status=1
done

# The service's books still balance after everything (pgbench wrote through the same tables).
audit=$(curl -fs "$BASE/audit" -H "Authorization: Bearer $ADMIN")
echo "audit: $(jq -c '{accounts, total_balance, consistent}' <<<"$audit")"
[ "$(jq -r .consistent <<<"$audit")" = true ] || { echo "service-vs-pgbench: audit inconsistent: $audit" >&2; status=2; }
echo "(clients $CLIENTS, $SECS s per run, best of $ROUNDS rounds; target ratio >= 0.8)"
exit $status
