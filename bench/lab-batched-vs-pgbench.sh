#!/usr/bin/env bash
# bench/lab-batched-vs-pgbench.sh: the lab's `batched` strategy on its hot rows, next to pgbench.
#
# For each scenario (withdraw: one hot account; transfer: 4 accounts, transfers between pairs in
# both directions, each recorded in a ledger) and each client count, alternates in one run:
#   - `contend lab --scenario S --strategy batched --workers N --duration T` (release binary), where
#     concurrent operations on the same rows share one transaction and one commit, decided in
#     memory (Operation::apply / write_state);
#   - pgbench with N clients running what one request per commit costs at best:
#       withdraw: the single-statement conditional UPDATE
#                 (UPDATE t SET balance = balance - 1 WHERE id = 1 AND balance >= 1);
#       transfer: one transaction per transfer: both rows locked in id order and the payer's
#                 balance read in one statement, then both balances changed in one UPDATE
#                 and the two ledger rows inserted in one INSERT, each conditional on the
#                 balance read covering the amount
#                 (5 round trips with BEGIN and COMMIT; the lab's pessimistic needs 6).
# Which side goes first alternates between rounds; prints the MEDIAN of each side over ROUNDS
# rounds with the spread (min-max) and the ratio of the medians.
#
# Usage: bench/lab-batched-vs-pgbench.sh [POSTGRES_URL] [SECONDS]
#   POSTGRES_URL  default $CONTEND_PG_URL
#   SECONDS       per measurement, default 5
#   ROUNDS=5  CLIENTS="32 64"  SCENARIOS="withdraw transfer"
#   CONTEND_BIN   the contend binary to measure (default: build the release binary)
# Measured 2026-11-30 (11:45 UTC) on the shared 2-core dev machine while four builds ran beside it
# (release build; ROUNDS=5, 3 s per run; medians, spread min-max; 0 violations in every lab run;
# withdraw and transfer batches held 32.0 operations per commit at 32 workers, 46-64 at 64):
#   test server (scripts/services: fsync=off, synchronous_commit=off):
#     withdraw  32: 67,348 (49,537-96,738) vs pgbench 11,753 (10,578-13,235)   5.73x
#     withdraw  64: 109,482 (93,216-146,988) vs 9,481 (8,211-10,003)           11.55x
#     transfer  32: 14,191 (8,316-19,579) vs 1,013 (913-1,646)                 14.00x
#     transfer  64: 14,784 (12,622-16,736) vs 702 (538-851)                    21.07x
#   durable server (CONTEND_PG_DURABLE=1 scripts/services up pg: fsync, synchronous_commit and
#   full_page_writes on, ext4 on the VM's disk):
#     withdraw  32: 9,549 (6,117-10,210) vs 1,379 (1,026-1,442)                6.92x
#     withdraw  64: 11,863 (9,285-16,834) vs 1,016 (872-1,113)                 11.68x
#     transfer  32: 4,370 (3,325-5,402) vs 465 (297-729)                       9.39x
#     transfer  64: 7,355 (5,737-8,093) vs 289 (100-427)                       25.41x
# With a durable commit the batch size is what counts: each batch waits for its WAL flush, so at
# N workers a batch holds at most N operations and the lab's rate is about N per flush.
# Needs: cargo, pgbench and psql (postgresql-client), jq.
# Exit status: 0 when every lab run kept its invariants, 1 when one did not, 2 when a tool or run
# fails. (The ratio is reported, not enforced: it depends on the server's commit cost.)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

URL=${1:-${CONTEND_PG_URL:-}}
SECS=${2:-5}
ROUNDS=${ROUNDS:-5}
CLIENTS=${CLIENTS:-32 64}
SCENARIOS=${SCENARIOS:-withdraw transfer}
THREADS=2

[ -n "$URL" ] || { echo "lab-batched-vs-pgbench: give a PostgreSQL URL (or set CONTEND_PG_URL)" >&2; exit 2; }
require_tools lab-batched-vs-pgbench cargo pgbench psql jq
require_pg_url lab-batched-vs-pgbench "$URL"
[ "$ROUNDS" -ge 1 ] 2>/dev/null || { echo "lab-batched-vs-pgbench: ROUNDS must be a positive integer" >&2; exit 2; }
for s in $SCENARIOS; do
  case "$s" in withdraw|transfer) ;; *) echo "lab-batched-vs-pgbench: unknown scenario $s (withdraw, transfer)" >&2; exit 2 ;; esac
done

BIN=$(contend_bin)

WORK=$(mktemp -d)
P=bench_lb_$$
cleanup() {
  psql -q "$URL" -c "DROP TABLE IF EXISTS ${P}_withdraw, ${P}_acc, ${P}_ledger" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# pgbench's tables, shaped as the lab's (crates/contend-lab/src/scenario/{withdraw,transfer}.rs).
# The transfer accounts start with the lab's opening balance (20), so refusals happen as in the lab.
setup_pgbench_tables() {
  PGOPTIONS='-c client_min_messages=warning' psql -q -v ON_ERROR_STOP=1 "$URL" >/dev/null <<SQL
DROP TABLE IF EXISTS ${P}_withdraw, ${P}_acc, ${P}_ledger;
CREATE TABLE ${P}_withdraw (id BIGINT PRIMARY KEY, balance BIGINT NOT NULL, version BIGINT NOT NULL);
INSERT INTO ${P}_withdraw VALUES (1, 1000000000000, 0);
CREATE TABLE ${P}_acc (id BIGINT PRIMARY KEY, balance BIGINT NOT NULL, version BIGINT NOT NULL);
INSERT INTO ${P}_acc SELECT g, 20, 0 FROM generate_series(1, 4) g;
CREATE TABLE ${P}_ledger (account BIGINT NOT NULL, delta BIGINT NOT NULL);
INSERT INTO ${P}_ledger SELECT g, 20 FROM generate_series(1, 4) g;
SQL
}
setup_pgbench_tables

cat >"$WORK/withdraw.sql" <<SQL
UPDATE ${P}_withdraw SET balance = balance - 1 WHERE id = 1 AND balance >= 1;
SQL
cat >"$WORK/transfer.sql" <<SQL
\set from random(1, 4)
\set off random(1, 3)
\set to (:from + :off - 1) % 4 + 1
\set amt random(1, 5)
BEGIN;
SELECT sum(CASE WHEN id = :from::bigint THEN balance END) AS bal FROM (SELECT id, balance FROM ${P}_acc WHERE id IN (:from::bigint, :to::bigint) ORDER BY id FOR UPDATE) l \gset
UPDATE ${P}_acc SET balance = balance + CASE WHEN id = :to::bigint THEN :amt::bigint ELSE -:amt::bigint END WHERE id IN (:from::bigint, :to::bigint) AND :bal::bigint >= :amt::bigint;
INSERT INTO ${P}_ledger (account, delta) SELECT :from::bigint, -:amt::bigint WHERE :bal::bigint >= :amt::bigint UNION ALL SELECT :to::bigint, :amt::bigint WHERE :bal::bigint >= :amt::bigint;
END;
SQL

status=0

# Both runners set RESULT (not run in a subshell, so that they can fail the bench).
lab_ops() { # lab_ops SCENARIO CLIENTS
  local json
  if ! json=$("$BIN" lab --database-url "$URL" --scenario "$1" --strategy batched --workers "$2" \
    --operations 100000000 --duration "${SECS}s" --json --no-progress 2>"$WORK/lab.err"); then
    if jq -e '.runs[0]' >/dev/null 2>&1 <<<"$json"; then
      echo "lab-batched-vs-pgbench: the lab's $1 run failed its checks: $(jq -c '.runs[0] | {violations, errors, invariants}' <<<"$json")" >&2
      status=1
    else
      echo "lab-batched-vs-pgbench: the lab failed: $(cat "$WORK/lab.err")" >&2
      exit 2
    fi
  fi
  jq -c '.runs[0] | {scenario, workers, ops: .operations, violations, batch}' <<<"$json" >>"$WORK/lab.log"
  RESULT=$(jq -r '.runs[0].throughput_ops_s' <<<"$json")
}

pgbench_tps() { # pgbench_tps SCENARIO CLIENTS
  local out
  if ! out=$(pgbench -n -M prepared -c "$2" -j $THREADS -T "$SECS" -f "$WORK/$1.sql" "$URL" 2>&1); then
    echo "lab-batched-vs-pgbench: pgbench failed: $out" >&2
    exit 2
  fi
  RESULT=$(awk '/^tps = / { print $3; exit }' <<<"$out")
}

echo "server: $(psql -Atc "SELECT 'fsync=' || current_setting('fsync') || ' synchronous_commit=' || current_setting('synchronous_commit') || ' (' || split_part(version(), ' on ', 1) || ')'" "$URL")"
echo "$SECS s per run, $ROUNDS alternating rounds, pgbench -j $THREADS -M prepared"
printf '%-9s %-8s %14s %16s %14s %16s %7s\n' scenario clients "lab batched" "spread" "pgbench" "spread" ratio
round=0
for scenario in $SCENARIOS; do
  for clients in $CLIENTS; do
    labs=() pgs=()
    for _ in $(seq "$ROUNDS"); do
      round=$((round + 1))
      if [ $((round % 2)) = 1 ]; then
        lab_ops "$scenario" "$clients"; labs+=("$RESULT")
        pgbench_tps "$scenario" "$clients"; pgs+=("$RESULT")
      else
        pgbench_tps "$scenario" "$clients"; pgs+=("$RESULT")
        lab_ops "$scenario" "$clients"; labs+=("$RESULT")
      fi
    done
    a=$(median "${labs[@]}")
    b=$(median "${pgs[@]}")
    printf '%-9s %-8s %14.0f %16s %14.0f %16s %7s\n' "$scenario" "$clients" "$a" "$(spread "${labs[@]}")" \
      "$b" "$(spread "${pgs[@]}")" "$(ratio "$a" "$b")"
  done
done
echo "lab runs (batches: commits and operations per commit):"
sed 's/^/  /' "$WORK/lab.log"
exit $status
