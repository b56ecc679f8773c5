#!/usr/bin/env bash
# bench/lab-compare.sh: two builds of `contend` side by side on the same lab runs (a change's
# before and after), alternating A and B in every round, reporting per run the median ops/s of each
# side over the rounds with the spread (min-max), and the ratio of the medians B/A.
#
# Usage: bench/lab-compare.sh A_BIN B_BIN [LAB FLAGS...]
#   e.g. bench/lab-compare.sh /tmp/old/contend target/release/contend \
#          --database-url "$CONTEND_PG_URL" --scenario withdraw --strategy atomic,pessimistic --workers 32 --duration 3s
#   ROUNDS=N  rounds (default 5; each runs A then B, or B then A on odd rounds)
# Needs: python3. Exit status 2 when a run fails to produce JSON.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,11p' "$0" >&2; exit 2; }
A=$1 B=$2
shift 2
ROUNDS=${ROUNDS:-5}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for ((r = 0; r < ROUNDS; r++)); do
  order="A B"
  [ $((r % 2)) = 1 ] && order="B A"
  for side in $order; do
    bin=$A
    [ "$side" = B ] && bin=$B
    echo "round $((r + 1))/$ROUNDS: $side" >&2
    "$bin" lab "$@" --json >"$out/$side.$r.json" 2>/dev/null || [ -s "$out/$side.$r.json" ] || {
      echo "lab-compare: $side failed in round $r" >&2
      exit 2
    }
  done
done
python3 - "$out" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def runs(side):
    table = {}
    for r in range(rounds):
        for run in json.load(open(f"{out}/{side}.{r}.json"))["runs"]:
            key = (run["backend"], run["scenario"], run["strategy"], run["workers"])
            table.setdefault(key, []).append(run["throughput_ops_s"])
    return table
a, b = runs("A"), runs("B")
print(f"{'backend':9} {'scenario':13} {'strategy':13} {'w':>3}  {'A median (min-max)':>26}  {'B median (min-max)':>26}  {'B/A':>5}")
for key in sorted(set(a) & set(b)):
    ma, mb = statistics.median(a[key]), statistics.median(b[key])
    fa = f"{ma:.0f} ({min(a[key]):.0f}-{max(a[key]):.0f})"
    fb = f"{mb:.0f} ({min(b[key]):.0f}-{max(b[key]):.0f})"
    print(f"{key[0]:9} {key[1]:13} {key[2]:13} {key[3]:>3}  {fa:>26}  {fb:>26}  {mb / ma:5.2f}")
PY
