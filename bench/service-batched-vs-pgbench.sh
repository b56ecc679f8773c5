#!/usr/bin/env bash
# bench/service-batched-vs-pgbench.sh: the reference service's hot-account withdraw under `batched`,
# through HTTP, next to pgbench running the service's own withdraw transaction.
#
# One account (balance 10^15, so that no withdrawal of 1 is ever refused; refusals would show as
# non-2xx answers and fail the run). For each variant and client count, alternates in one run:
#   - wrk, N connections, `POST /accounts/ID/withdraw` `{"amount":1}` with the account's bearer
#     token and `X-Concurrency-Strategy: batched`, against the release binary's `contend serve
#     --strategy batched` (concurrent withdrawals of the account share one transaction and one
#     commit);
#   - pgbench, N clients, -M prepared, running what one withdraw costs the service when each
#     request has its own transaction (crates/contend-service/src/bank.rs, BalanceOp::atomic):
#       BEGIN; UPDATE accounts SET balance = balance - 1, version = version + 1
#              WHERE id = ID AND balance >= 1 RETURNING id, owner, balance, version;
#       INSERT INTO ledger (account_id, amount, kind, ref_id) VALUES (ID, -1, 'withdraw', NULL);
#       COMMIT;
#     (the service rereads the account with a SELECT after its UPDATE; pgbench gets it from
#     RETURNING, one round trip less: the stricter baseline).
# Variants (KEYS):
#   nokey  no Idempotency-Key;
#   key    every request with its own Idempotency-Key (wrk's Lua script numbers them per thread):
#          the service claims the key (one INSERT, autocommit) and stores the response in the
#          withdraw's transaction; pgbench runs the same: the claim INSERT, then the transaction
#          above with the `UPDATE idempotency_keys SET status_code, body` before COMMIT.
# Which side goes first alternates between rounds; prints the MEDIAN of each side over ROUNDS
# rounds with the spread (min-max), the ratio of the medians and the spread of the per-round
# ratios; then the service's batch counters (/metrics) and its books (/audit).
#
# Usage: bench/service-batched-vs-pgbench.sh [POSTGRES_URL] [SECONDS]
#   POSTGRES_URL  default $CONTEND_PG_URL; the script creates a database of its own on that server
#                 and drops it at the end
#   SECONDS       per run, default 5
#   ROUNDS=5  CLIENTS="64"  KEYS="nokey key"  POOL=16 (the service's --max-connections)
#   CONTEND_BIN   the contend binary to measure (default: build the release binary)
# Measured 2026-11-30 on the shared 2-core dev machine (other builds running, load average 5-9; test server:
# fsync=off, synchronous_commit=off; release build; 5 rounds of 5 s, 64 clients, pool 16; medians, spread min-max):
#   before (BalanceOp ran read+write per operation inside the batch, and an existence SELECT per request):
#     nokey  1,754 (1,410-1,934) vs pgbench 1,140 (1,111-1,242)   1.54x (rounds 1.19-1.63)
#     key    1,062 (939-1,251)   vs pgbench   741 (638-867)       1.43x (rounds 1.22-1.69)
#   after (BalanceOp/Keyed apply + write_state: one read, one UPDATE, one ledger INSERT per batch):
#     nokey 10,005 (7,968-12,626) vs pgbench 1,145 (870-1,170)    8.74x (rounds 7.02-10.80)
#     key    2,253 (1,697-2,708)  vs pgbench   678 (572-802)      3.32x (rounds 2.49-4.74)
#   With POOL=64 (3 rounds): nokey 11.50x, key 5.19x: the service lets at most --max-connections requests
#   hold a session at once, and a batched request holds it while it waits for its batch, so the pool size
#   caps the batch size (every request of the pool-16 run waited for a session).
#   Then a batched request gave its request session up while it waited for its batch (ReqSession::
#   give_up_turn), so the pool no longer caps the batch. Same script, 5 rounds of 3 s, 12:20 UTC, load
#   average 4-5, the two builds one after the other:
#     session held:   nokey 12,587 (11,124-13,150) vs 1,099   11.45x (rounds 10.26-13.79)
#                     key    4,107 (3,908-4,362)   vs 1,005    4.09x (rounds 3.93-4.14)
#                     (251,790 of 251,970 requests waited for a session)
#     session given up: nokey 22,497 (21,584-23,455) vs 1,341  16.77x (rounds 15.95-17.57), p99 6.5 ms
#                     key    5,051 (4,565-5,203)   vs   986    5.12x (rounds 4.78-5.28)
#                     (85 requests waited for a session)
# With keys, every request still costs one commit of its own (the claim's autocommit INSERT, as in pgbench's
# script) and one UPDATE of its key inside the batch's transaction (one statement per key, one after the
# other): the service process was mostly idle (perf: ~20% of a CPU, in socket sends), PostgreSQL busy.
# Needs: cargo, wrk, pgbench and psql (postgresql-client), curl, jq, python3.
# Exit status: 0 when every run succeeded and the books balance, 1 when the audit fails, 2 when a
# tool or a run fails (non-2xx answers included). The ratio is reported (target: 3x), not enforced.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

URL=${1:-${CONTEND_PG_URL:-}}
SECS=${2:-5}
ROUNDS=${ROUNDS:-5}
CLIENTS=${CLIENTS:-64}
VARIANTS=${KEYS:-nokey key}
POOL=${POOL:-16}
THREADS=2
ADMIN=bench-admin-$$-$RANDOM

[ -n "$URL" ] || { echo "service-batched-vs-pgbench: give a PostgreSQL URL (or set CONTEND_PG_URL)" >&2; exit 2; }
require_tools service-batched-vs-pgbench cargo wrk pgbench psql curl jq python3
require_pg_url service-batched-vs-pgbench "$URL"
[ "$ROUNDS" -ge 1 ] 2>/dev/null || { echo "service-batched-vs-pgbench: ROUNDS must be a positive integer" >&2; exit 2; }
for v in $VARIANTS; do
  case "$v" in nokey|key) ;; *) echo "service-batched-vs-pgbench: unknown variant $v (nokey, key)" >&2; exit 2 ;; esac
done

BIN=$(contend_bin)

DBNAME=bench_sb_$$_$RANDOM
DB_URL=$(url_with_database "$URL" "$DBNAME")
PORT=$(free_port)
BASE=http://127.0.0.1:$PORT
WORK=$(mktemp -d)
PID=
cleanup() {
  stop_process "$PID"
  psql -q "$URL" -c "DROP DATABASE IF EXISTS $DBNAME WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

psql -q -v ON_ERROR_STOP=1 "$URL" -c "CREATE DATABASE $DBNAME" >/dev/null

echo "starting the service on $BASE (--strategy batched, pool of $POOL connections)..." >&2
RUST_LOG=warn "$BIN" serve --database-url "$DB_URL" --listen "127.0.0.1:$PORT" --strategy batched \
  --allow-strategy-header --admin-token "$ADMIN" --max-connections "$POOL" >"$WORK/service.log" 2>&1 &
PID=$!
wait_for_service service-batched-vs-pgbench "$BASE" "$PID" "$WORK/service.log"

read -r ID TOKEN < <(curl -fs -X POST "$BASE/accounts" -H "Authorization: Bearer $ADMIN" \
  -H 'Content-Type: application/json' -d '{"owner": "hot", "balance": 1000000000000000}' | jq -r '[.id, .token] | @tsv')
[ -n "$ID" ] && [ -n "$TOKEN" ] || { echo "service-batched-vs-pgbench: account creation failed" >&2; exit 2; }
SCOPE=$(printf '%s' "$TOKEN" | sha256sum | cut -d' ' -f1)

cat >"$WORK/withdraw.lua" <<LUA
local keyed = os.getenv("KEYED") == "1"
local counter, prefix = 0, ""
local threads = {}
function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end
function init(args)
  prefix = string.format("w%d-%d-%d-", os.time(), math.floor(os.clock() * 1e6), tid)
end
local base = {
  ["Authorization"] = "Bearer $TOKEN",
  ["Content-Type"] = "application/json",
  ["X-Concurrency-Strategy"] = "batched",
}
function request()
  local headers = base
  if keyed then
    counter = counter + 1
    headers = {}
    for k, v in pairs(base) do headers[k] = v end
    headers["Idempotency-Key"] = prefix .. counter
  end
  return wrk.format("POST", "/accounts/$ID/withdraw", headers, '{"amount":1}')
end
function done(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %.3f\n", summary.requests, summary.duration,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout, latency:percentile(99) / 1000))
end
LUA

# pgbench: the service's withdraw transaction (above); `key` adds the claim and the stored response.
# The stored body has the length of the service's answer.
BODY="{\"id\":$ID,\"owner\":\"hot\",\"balance\":999999999999999,\"version\":1}"
cat >"$WORK/nokey.sql" <<SQL
BEGIN;
UPDATE accounts SET balance = balance - 1, version = version + 1 WHERE id = $ID AND balance >= 1 RETURNING id, owner, balance, version;
INSERT INTO ledger (account_id, amount, kind, ref_id) VALUES ($ID, -1, 'withdraw', NULL);
COMMIT;
SQL
cat >"$WORK/key.sql" <<SQL
\set k random(1, 9000000000000000000)
INSERT INTO idempotency_keys (scope, idem_key, fingerprint, owner, status_code, body, lease_until) VALUES ('$SCOPE', 'pgb-' || :client_id || '-' || :k, '0000000000000000000000000000000000000000000000000000000000000000', '00000000000000000000000000000000', NULL, NULL, 0);
BEGIN;
UPDATE accounts SET balance = balance - 1, version = version + 1 WHERE id = $ID AND balance >= 1 RETURNING id, owner, balance, version;
INSERT INTO ledger (account_id, amount, kind, ref_id) VALUES ($ID, -1, 'withdraw', NULL);
UPDATE idempotency_keys SET status_code = 200, body = '$BODY' WHERE scope = '$SCOPE' AND idem_key = 'pgb-' || :client_id || '-' || :k AND owner = '00000000000000000000000000000000' AND status_code IS NULL;
COMMIT;
SQL

# Both runners set RESULT (not run in a subshell, so that they can fail the bench).
service_tps() { # service_tps VARIANT CLIENTS
  local out line reqs usecs errors p99
  keyed=0; [ "$1" = key ] && keyed=1
  out=$(KEYED=$keyed wrk -t "$THREADS" -c "$2" -d "${SECS}s" -s "$WORK/withdraw.lua" "$BASE" 2>&1) \
    || { echo "service-batched-vs-pgbench: wrk failed: $out" >&2; exit 2; }
  line=$(grep '^RESULT ' <<<"$out") || { echo "service-batched-vs-pgbench: no wrk result: $out" >&2; exit 2; }
  read -r _ reqs usecs errors p99 <<<"$line"
  if [ "$errors" -ne 0 ]; then
    echo "service-batched-vs-pgbench: $errors failed requests (non-2xx or socket errors)" >&2
    grep -E 'Non-2xx|Socket errors' <<<"$out" >&2 || true
    exit 2
  fi
  RESULT=$(python3 -c "print(round($reqs / ($usecs / 1e6)))")
  P99S+=("$p99")
}

pgbench_tps() { # pgbench_tps VARIANT CLIENTS
  local out
  if ! out=$(pgbench -n -M prepared -c "$2" -j $THREADS -T "$SECS" -f "$WORK/$1.sql" "$DB_URL" 2>&1); then
    echo "service-batched-vs-pgbench: pgbench failed: $out" >&2
    exit 2
  fi
  if grep -q 'number of failed transactions: [1-9]' <<<"$out"; then
    echo "service-batched-vs-pgbench: pgbench had failed transactions: $out" >&2; exit 2
  fi
  RESULT=$(awk '/^tps = / { print $3; exit }' <<<"$out")
}

echo "server: $(psql -Atc "SELECT 'fsync=' || current_setting('fsync') || ' synchronous_commit=' || current_setting('synchronous_commit') || ' (' || split_part(version(), ' on ', 1) || ')'" "$URL")"
echo "$SECS s per run, $ROUNDS alternating rounds, wrk -t $THREADS, pgbench -j $THREADS -M prepared, service pool $POOL"
printf '%-6s %-8s %12s %16s %9s %12s %16s %7s %12s\n' variant clients "service" "spread" "p99 ms" "pgbench" "spread" ratio "round ratios"
round=0
for variant in $VARIANTS; do
  for clients in $CLIENTS; do
    svcs=() pgs=() ratios=() P99S=()
    for _ in $(seq "$ROUNDS"); do
      round=$((round + 1))
      if [ $((round % 2)) = 1 ]; then
        service_tps "$variant" "$clients"; s=$RESULT
        pgbench_tps "$variant" "$clients"; p=$RESULT
      else
        pgbench_tps "$variant" "$clients"; p=$RESULT
        service_tps "$variant" "$clients"; s=$RESULT
      fi
      svcs+=("$s") pgs+=("$p") ratios+=("$(ratio "$s" "$p")")
    done
    a=$(median "${svcs[@]}")
    b=$(median "${pgs[@]}")
    lo_hi=$(printf '%s\n' "${ratios[@]}" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%s-%s", lo, hi }')
    printf '%-6s %-8s %12.0f %16s %9s %12.0f %16s %7s %12s\n' "$variant" "$clients" "$a" "$(spread "${svcs[@]}")" \
      "$(median "${P99S[@]}")" "$b" "$(spread "${pgs[@]}")" "$(ratio "$a" "$b")" "$lo_hi"
  done
done

status=0
audit=$(curl -fs "$BASE/audit" -H "Authorization: Bearer $ADMIN")
echo "audit: $(jq -c '{accounts, total_balance, consistent}' <<<"$audit")"
[ "$(jq -r .consistent <<<"$audit")" = true ] || { echo "service-batched-vs-pgbench: audit inconsistent: $audit" >&2; status=1; }
curl -fs "$BASE/metrics" | grep -E '^contend_(tx_runs_total|tx_attempts_total|session_wait_seconds_count)' | sed 's/^/  /' || true
exit $status
