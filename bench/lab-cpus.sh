#!/usr/bin/env bash
# bench/lab-cpus.sh: the default `contend lab` (embedded SQLite) on one CPU against every CPU.
#
# Runs the default lab (every scenario and strategy, 16 workers, 1,000 operations each) with
# `--cpus one` and with `--cpus all`, alternating (which side goes first alternates too), ROUNDS
# times, and reports per side the wall time and, per scenario x strategy of the safe runs, the
# median ops/s and p99 with the spread; then how many rows meet issue 11's SQLite target
# (p99 <= 5 ms) on each side, and whether the unsafe baseline broke in every round on both sides.
#
# Usage: bench/lab-cpus.sh
#   CONTEND_BIN=PATH   the contend binary (default: build the release binary)
#   ROUNDS=N           alternating rounds (default 5)
#   ARGS="..."         extra lab flags for both sides, e.g. "--workers 1,16 --duration 1s"
# Needs: cargo (unless CONTEND_BIN), jq, awk. Exit status: 0, or 2 when a run fails.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

ROUNDS=${ROUNDS:-5}
require_tools lab-cpus jq awk
BIN=$(contend_bin)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

run() { # run SIDE ROUND
  local started ended status=0
  started=$(date +%s.%N)
  # shellcheck disable=SC2086 # ARGS is a list of flags
  "$BIN" lab --no-progress --json --cpus "$1" ${ARGS:-} >"$out/$1.$2.json" 2>"$out/stderr" || status=$?
  ended=$(date +%s.%N)
  if [ "$status" != 0 ] && [ "$status" != 3 ]; then
    echo "lab-cpus: contend lab --cpus $1 exited with $status:" >&2
    cat "$out/stderr" >&2
    exit 2
  fi
  awk -v a="$started" -v b="$ended" 'BEGIN { printf "%.2f\n", b - a }' >"$out/$1.$2.secs"
}

echo "lab-cpus: $BIN, $ROUNDS alternating rounds, load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for ((r = 0; r < ROUNDS; r++)); do
  if ((r % 2 == 0)); then sides="one all"; else sides="all one"; fi
  for side in $sides; do
    echo "round $((r + 1))/$ROUNDS: --cpus $side" >&2
    run "$side" "$r"
  done
done

printf '%-28s %-30s %-30s\n' "" "--cpus one" "--cpus all"
col() { # col VALUES...: "median (min-max)"
  printf '%s (%s)' "$(median "$@")" "$(spread "$@")"
}
declare -A met=([one]=0 [all]=0)
rows=0
while read -r scenario strategy workers; do
  rows=$((rows + 1))
  line=$(printf '%-28s' "$scenario/$strategy/${workers}w")
  for side in one all; do
    ops=() p99=()
    for ((r = 0; r < ROUNDS; r++)); do
      read -r o p < <(jq -r --arg s "$scenario" --arg g "$strategy" --argjson w "$workers" \
        '.runs[] | select(.scenario == $s and .strategy == $g and .workers == $w) | "\(.throughput_ops_s) \(.latency_ms.p99)"' \
        "$out/$side.$r.json" | head -1)
      ops+=("$o") p99+=("$p")
    done
    pmed=$(median "${p99[@]}")
    awk -v p="$pmed" 'BEGIN { exit !(p <= 5) }' && met[$side]=$((met[$side] + 1))
    line+=$(printf ' %-30s' "$(printf '%.0f ops/s, p99 %.1f ms' "$(median "${ops[@]}")" "$pmed")")
  done
  echo "$line"
done < <(jq -r '.runs[] | select(.expected_safe) | "\(.scenario) \(.strategy) \(.workers)"' "$out/one.0.json")

for side in one all; do
  secs=() broke=yes
  for ((r = 0; r < ROUNDS; r++)); do
    secs+=("$(cat "$out/$side.$r.secs")")
    jq -e '[.runs[] | select(.expected_safe | not) | select(.workers > 1) | .violations > 0] | all' \
      "$out/$side.$r.json" >/dev/null || broke=no
  done
  echo "--cpus $side: wall time $(median "${secs[@]}") s median ($(printf '%s\n' "${secs[@]}" | sort -g | head -1)-$(printf '%s\n' "${secs[@]}" | sort -g | tail -1)); ${met[$side]} of $rows safe rows with median p99 <= 5 ms; unsafe baseline broke in every round: $broke"
done
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
