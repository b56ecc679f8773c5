#!/usr/bin/env bash
# bench/sqlite-scaling.sh: does the embedded SQLite default keep its throughput under contention?
#
# Runs the lab on its default database (a temporary SQLite file) at 1 and at 16 workers,
# alternating the two in every round (1 then 16, then 16 then 1 on odd rounds), and reports per
# scenario x strategy:
#   ops/s at 1 and at 16 workers: median over the rounds (min-max);
#   16/1: the median of the rounds' ratios (each round's 16-worker run over its own 1-worker run,
#         neighbouring runs seeing the same machine), with the spread of those ratios;
#   p99 at 16 workers in ms: median (min-max).
# The target (issue 11): every safe strategy at 16 workers keeps at least 0.8 of its 1-worker
# throughput with p99 at most 5 ms. Then the default `contend lab` (every scenario and strategy,
# 16 workers, 1,000 operations per run) runs LAB_ROUNDS times: its wall time (median, spread) and
# the largest p99 of its safe runs; the target is under 30 s.
#
# Usage: bench/sqlite-scaling.sh
#   CONTEND_BIN=PATH   the contend binary (default: $CARGO_TARGET_DIR/release/contend, else
#                      target/release/contend; build it with `cargo build --release -p contend-cli`)
#   ROUNDS=N           alternating rounds (default 5)
#   DURATION=T         time per lab run (default 2s; a 1,000-operation run at 16 workers lasts
#                      well under 100 ms, too short to measure on a shared machine)
#   SCENARIOS=LIST     default transfer,order,withdraw
#   STRATEGIES=LIST    default atomic,pessimistic,optimistic,serializable,batched
#   LAB_ROUNDS=N       runs of the default `contend lab` afterwards (default 1; 0 skips it)
#   CPUS=auto|one|all  the lab's --cpus (default auto: one CPU on SQLite; bench/lab-cpus.sh
#                      compares one against all)
# Needs: jq, awk. Exit status: 0 when every row meets the target, 1 when one does not, 2 when a
# run fails.
#
# Last measured (2026-11-30 17:51 UTC, `ROUNDS=5 DURATION=1s LAB_ROUNDS=3`, release build, shared 2-core
# machine, load average 1.9 at the start and the end): the lab on one CPU (--cpus auto), the library's
# autocommit writes in the writer's turn, the idle catch-up checkpoint. Every row met the target: 16/1
# medians 0.91-1.11 for atomic, pessimistic, optimistic and serializable on transfer, order and withdraw,
# p99 at 16 workers 0.7-3.3 ms (the largest spread 2.4-5.4 ms, transfer atomic); batched 4.4-11.8x with
# p99 0.09-0.58 ms. Default `contend lab`: 3.3 s (2.9-3.4), its largest safe-run p99 5.2 ms (median over
# the 3 runs of the largest of 40 runs).
#
# Before (same day, load average 4.9 to 2.0): both CPUs, get_or_create's record write beside the writer
# queue, the catch-up checkpoint in mid-run (background checkpoints every 1,000 writes, taking the
# write turn only past 4,096 WAL frames). 16/1 medians: transfer 0.91-1.32, order 0.79-1.19, withdraw 0.60-1.54 (atomic, pessimistic, optimistic,
# serializable); p99 at 16 workers: transfer 10.6-11.1 ms, order 1.5-11.3 ms, withdraw 1.5-6.2 ms;
# batched 4.5-10.3x with p99 0.3-2.2 ms. Met: withdraw atomic, order serializable and the three
# batched rows; not met: the other 10 (p99 above 5 ms; the spreads run from 0.7 to 15 ms, so a
# quiet round meets it and a loaded one does not). Default `contend lab`: 7.2 s (7.1-7.3), its
# largest safe-run p99 35 ms (get_or_create). Against the previous checkpoints (every 200 writes,
# always with the turn held), the same binary pair alternated in 5 rounds of the 12 non-batched
# rows: median p99 over the rows 5.8 ms vs 7.9 ms, lower in each of the 5 rounds; 16/1 ratios
# unchanged within the noise.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
. "$here/lib.sh"

BIN=${CONTEND_BIN:-${CARGO_TARGET_DIR:-$here/../target}/release/contend}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-2s}
SCENARIOS=${SCENARIOS:-transfer,order,withdraw}
STRATEGIES=${STRATEGIES:-atomic,pessimistic,optimistic,serializable,batched}
CPUS=${CPUS:-auto}
LAB_ROUNDS=${LAB_ROUNDS:-1}
[ -x "$BIN" ] || { echo "sqlite-scaling: no binary at $BIN (cargo build --release -p contend-cli)" >&2; exit 2; }
command -v jq >/dev/null || { echo "sqlite-scaling: needs jq" >&2; exit 2; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# lab W FILE: one lab run at W workers; its runs as "scenario strategy ops_s p99_ms" lines.
lab() {
  local json="$out/run.json"
  if ! "$BIN" lab --no-progress --cpus "$CPUS" --scenario "$SCENARIOS" --strategy "$STRATEGIES" --workers "$1" \
    --duration "$DURATION" --json >"$json" 2>"$out/stderr"; then
    [ -s "$json" ] || { echo "sqlite-scaling: lab at $1 workers failed:" >&2; cat "$out/stderr" >&2; exit 2; }
  fi
  jq -r '.runs[] | select(.expected_safe) | "\(.scenario) \(.strategy) \(.throughput_ops_s) \(.latency_ms.p99) \(.verdict)"' \
    "$json" >"$2"
}

echo "sqlite-scaling: $BIN --cpus $CPUS, $ROUNDS rounds of $DURATION runs, load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for ((r = 0; r < ROUNDS; r++)); do
  order="1 16"
  [ $((r % 2)) = 1 ] && order="16 1"
  for w in $order; do
    echo "round $((r + 1))/$ROUNDS: $w workers" >&2
    lab "$w" "$out/w$w.r$r"
  done
done

fail=0
printf '%-9s %-13s %24s %24s %18s %22s  %s\n' scenario strategy "ops/s 1w med (min-max)" \
  "ops/s 16w med (min-max)" "16/1 med (min-max)" "p99 16w ms med (min-max)" target
while read -r scenario strategy; do
  one=() sixteen=() ratios=() p99=() verdicts=""
  for ((r = 0; r < ROUNDS; r++)); do
    a=$(awk -v s="$scenario" -v t="$strategy" '$1 == s && $2 == t { print $3 }' "$out/w1.r$r")
    b=$(awk -v s="$scenario" -v t="$strategy" '$1 == s && $2 == t { print $3, $4, $5 }' "$out/w16.r$r")
    read -r b_ops b_p99 b_verdict <<<"$b"
    one+=("$a") sixteen+=("$b_ops") p99+=("$b_p99") ratios+=("$(ratio "$b_ops" "$a")")
    verdicts+="$b_verdict "
  done
  rmed=$(median "${ratios[@]}")
  pmed=$(median "${p99[@]}")
  rlo=$(printf '%s\n' "${ratios[@]}" | sort -g | head -1)
  rhi=$(printf '%s\n' "${ratios[@]}" | sort -g | tail -1)
  plo=$(printf '%s\n' "${p99[@]}" | sort -g | head -1)
  phi=$(printf '%s\n' "${p99[@]}" | sort -g | tail -1)
  verdict=met
  if ! awk -v r="$rmed" -v p="$pmed" 'BEGIN { exit !(r >= 0.8 && p <= 5) }'; then
    verdict="NOT met"
    fail=1
  fi
  case "$verdicts" in *FAIL*) verdict="$verdict; a run failed: $verdicts" fail=1 ;; esac
  printf '%-9s %-13s %24s %24s %18s %22s  %s\n' "$scenario" "$strategy" \
    "$(printf '%.0f (%s)' "$(median "${one[@]}")" "$(spread "${one[@]}")")" \
    "$(printf '%.0f (%s)' "$(median "${sixteen[@]}")" "$(spread "${sixteen[@]}")")" \
    "$(printf '%.2f (%.2f-%.2f)' "$rmed" "$rlo" "$rhi")" \
    "$(printf '%.2f (%.2f-%.2f)' "$pmed" "$plo" "$phi")" "$verdict"
done < <(awk '{ print $1, $2 }' "$out/w1.r0")

if [ "$LAB_ROUNDS" -gt 0 ]; then
  secs=() worst=()
  for ((r = 0; r < LAB_ROUNDS; r++)); do
    echo "default lab $((r + 1))/$LAB_ROUNDS" >&2
    started=$(date +%s.%N)
    status=0
    "$BIN" lab --no-progress --cpus "$CPUS" --json >"$out/default.json" 2>"$out/stderr" || status=$?
    ended=$(date +%s.%N)
    [ "$status" = 0 ] || { echo "sqlite-scaling: the default lab exited with $status" >&2; fail=1; }
    secs+=("$(awk -v a="$started" -v b="$ended" 'BEGIN { printf "%.1f", b - a }')")
    worst+=("$(jq '[.runs[] | select(.expected_safe) | .latency_ms.p99] | max' "$out/default.json")")
  done
  smed=$(median "${secs[@]}")
  echo "default contend lab: ${smed} s median ($(printf '%s\n' "${secs[@]}" | sort -g | head -1)-$(printf '%s\n' "${secs[@]}" | sort -g | tail -1)) over $LAB_ROUNDS run(s), largest safe-run p99 $(median "${worst[@]}") ms (median over runs)"
  awk -v s="$smed" 'BEGIN { exit !(s < 30) }' || { echo "default lab: NOT under 30 s"; fail=1; }
fi
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
exit "$fail"
