#!/usr/bin/env bash
# bench/batched-vs-pgbench.sh: does the `batched` strategy beat one commit per request?
#
# Hot-row withdraw on PostgreSQL: the executor's withdraw operation under `batched`
# (crates/contend/examples/hot_row.rs, release build: N workers, one account, D seconds) next to
# pgbench running the single-statement conditional UPDATE
#   UPDATE t SET balance = balance - 1 WHERE id = 1 AND balance >= 1
# with the same client count (-c N -j 2 -T D), alternating one run of each per round, ROUNDS
# rounds per client count. Prints the median of each side with its spread (min..max) and the
# ratio of the medians (target of issue 11: batched >= 5 x pgbench at 32 and 64 clients, 0 lost
# updates), and the server's durability settings (fsync, synchronous_commit), which decide what
# one commit costs.
#
# Usage: bench/batched-vs-pgbench.sh [POSTGRES_URL] [SECONDS]
#   POSTGRES_URL  default $CONTEND_PG_URL, else postgres://postgres@127.0.0.1:55432/app
#   SECONDS       per run, default 10
#   ROUNDS=N      alternating rounds per client count (default 5, at least 1)
#   CLIENTS="32 64"  client counts
#   STRATEGY=batched  the executor strategy to measure (any strategy name: atomic, pessimistic...)
#   MAX_SIZE=256 MAX_WAIT_US=0  the batch settings (BatchOptions)
#   COMBINE=1     give the operation its in-memory form (Operation::apply/write_state), so that a
#                 batch reads the row once and writes it once (default 0: a read and a write per
#                 operation, each in the batch's one transaction)
#   PGBENCH_MODE  pgbench query protocol: prepared (default), simple or extended
# Measured 2026-11-30 on the shared 2-core dev machine (PostgreSQL 15, 5 alternating rounds,
# medians, ratio of medians; lost updates 0 in every run):
#   test servers (fsync=off, synchronous_commit=off), 10 s runs:
#     batched            32: 7,213 vs pgbench 14,647 (0.49x)   64: 10,117 vs 10,984 (0.92x)
#     batched+combine    32: 160,158 vs 18,811 (8.51x)         64: 198,539 vs 15,350 (12.93x)
#   private PostgreSQL with fsync=on, synchronous_commit=on, 5 s runs:
#     batched            32: 4,031 vs 1,522 (2.65x)            64: 7,229 vs 1,470 (4.92x)
#     batched+combine    32: 48,616 vs 2,762 (17.60x)          64: 36,762 vs 1,624 (22.63x)
# Without the in-memory form each operation still pays its own read and write round trips on
# the batch's one connection, so batching only amortises the commit: it wins where a commit is
# expensive (durability on) and loses to one conditional UPDATE where it is nearly free.
# Needs: cargo, pgbench and psql (postgresql-client).
# Exit status: 0 when every ratio reaches 5 with no lost update, 1 when one does not, 2 when a
# tool or run fails.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

URL=${1:-${CONTEND_PG_URL:-postgres://postgres@127.0.0.1:55432/app}}
SECS=${2:-10}
ROUNDS=${ROUNDS:-5}
CLIENTS=${CLIENTS:-32 64}
STRATEGY=${STRATEGY:-batched}
MAX_SIZE=${MAX_SIZE:-256}
MAX_WAIT_US=${MAX_WAIT_US:-0}
COMBINE=${COMBINE:-0}
EXTRA=()
[ "$COMBINE" = 1 ] && EXTRA=(--combine)
MODE=${PGBENCH_MODE:-prepared}
THREADS=2
TARGET=5

require_tools batched-vs-pgbench cargo pgbench psql
require_pg_url batched-vs-pgbench "$URL"
[ "$ROUNDS" -ge 1 ] 2>/dev/null || { echo "batched-vs-pgbench: ROUNDS must be a positive integer" >&2; exit 2; }

echo "building the hot_row example (release)..." >&2
cargo build --release -q -p contend --example hot_row
BIN=${CARGO_TARGET_DIR:-target}/release/examples/hot_row

WORK=$(mktemp -d)
TABLE=bench_batched_$$
cleanup() {
  psql -q "$URL" -c "DROP TABLE IF EXISTS $TABLE" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

PGOPTIONS='-c client_min_messages=warning' psql -q -v ON_ERROR_STOP=1 "$URL" >/dev/null <<SQL
DROP TABLE IF EXISTS $TABLE;
CREATE TABLE $TABLE (id BIGINT PRIMARY KEY, balance BIGINT NOT NULL, version BIGINT NOT NULL);
INSERT INTO $TABLE VALUES (1, 1000000000000, 0);
SQL
cat > "$WORK/withdraw.sql" <<SQL
UPDATE $TABLE SET balance = balance - 1 WHERE id = 1 AND balance >= 1;
SQL

status=0

# Both runners set RESULT (not run in a subshell, so that they can fail the bench).
executor_ops() { # executor_ops CLIENTS: ops/s of one run; lost updates and errors fail the bench
  local out rc=0
  out=$("$BIN" "$URL" --strategy "$STRATEGY" --workers "$1" --seconds "$SECS" \
    --max-size "$MAX_SIZE" --max-wait-us "$MAX_WAIT_US" "${EXTRA[@]}") || rc=$?
  if [ $rc = 1 ]; then
    echo "batched-vs-pgbench: the executor run broke the invariant or had errors: $out" >&2
    status=1
  elif [ $rc != 0 ]; then
    echo "batched-vs-pgbench: the executor run failed (exit $rc)" >&2
    exit 2
  fi
  echo "$out" >>"$WORK/executor.log"
  RESULT=$(sed -n 's/.*ops_per_s=\([0-9.]*\).*/\1/p' <<<"$out")
}

pgbench_tps() { # pgbench_tps CLIENTS
  local out
  if ! out=$(pgbench -n -M "$MODE" -c "$1" -j $THREADS -T "$SECS" -f "$WORK/withdraw.sql" "$URL" 2>&1); then
    echo "batched-vs-pgbench: pgbench failed: $out" >&2
    exit 2
  fi
  RESULT=$(awk '/^tps = / { print $3; exit }' <<<"$out")
}


echo "server: $(psql -Atc "SELECT 'fsync=' || current_setting('fsync') || ' synchronous_commit=' || current_setting('synchronous_commit') || ' (' || version() || ')'" "$URL")"
printf '%-8s %-16s %14s %20s %14s %20s %7s\n' clients strategy "median ops/s" "spread" "pgbench median" "spread" ratio
LABEL=$STRATEGY
[ "$COMBINE" = 1 ] && LABEL="$STRATEGY+combine"
for clients in $CLIENTS; do
  ours=() pgs=()
  for _ in $(seq "$ROUNDS"); do
    executor_ops "$clients"
    ours+=("$RESULT")
    pgbench_tps "$clients"
    pgs+=("$RESULT")
  done
  a=$(median "${ours[@]}")
  b=$(median "${pgs[@]}")
  ratio=$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
  printf '%-8s %-16s %14.0f %20s %14.0f %20s %7s\n' "$clients" "$LABEL" "$a" "$(spread "${ours[@]}")" \
    "$b" "$(spread "${pgs[@]}")" "$ratio"
  echo "  rounds: $LABEL ${ours[*]}; pgbench ${pgs[*]}"
  awk -v r="$ratio" -v t=$TARGET 'BEGIN { exit !(r >= t) }' || status=1
done
echo "executor runs (batch counters, lost updates):"
sed 's/^/  /' "$WORK/executor.log"
[ $status = 0 ] && echo "target met: $LABEL >= ${TARGET}x pgbench, no lost update" \
  || echo "target missed: $LABEL < ${TARGET}x pgbench, or an invariant broke"
exit $status
