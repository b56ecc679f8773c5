#!/usr/bin/env bash
# bench/sqlite-autocommit-writers.sh: do the building blocks' autocommit writes on SQLite queue
# for the writer's turn, or sleep in SQLite's busy handler?
#
# TASKS tokio tasks (default 16) call `Counter::try_sub_now(&db, 1, 1)` on one hot row of one
# SQLite file (`Db::connect`, default settings: writer queue on, busy timeout 5 s) for DURATION
# seconds, in a release build, with the contend of OLD_REV (default b93c5ef, before the writes
# took the turn) and the contend of this worktree (NEW), alternated in every round (old first
# on even rounds, new first on odd ones). Per round and version: ops/s, p99 latency of one call,
# and, in a second run of the same length under
# `strace -f -c --seccomp-bpf -e trace=clock_nanosleep`, the number of clock_nanosleep calls
# (SQLite's busy handler sleeps with usleep: 1, 2, 5, 10, 15, 20, 25 ... ms). Reports medians
# over the rounds (min-max). Every run checks that the row lost
# exactly one unit per successful call.
#
# The two versions are built into one throwaway binary (a crate in a temporary folder, outside
# the repository, depending on `git archive OLD_REV` unpacked there and on this worktree's
# crates/contend; the baseline's package is renamed contend-old, one lockfile cannot hold two
# packages of one name and version), with the workspace's Cargo.lock, offline.
#
# Usage: bench/sqlite-autocommit-writers.sh
#   ROUNDS=N      alternating rounds (default 5)
#   DURATION=S    seconds per run (default 3)
#   TASKS=N       concurrent tasks (default 16)
#   OLD_REV=REV   the baseline (default b93c5ef)
#   CARGO_TARGET_DIR  where the bench binary is built (default: a folder in the temporary one)
# Needs: git, cargo, strace, awk.
#
# Last measured (2026-11-30, `ROUNDS=5 DURATION=3`, shared 2-core machine, load average 4.9 at the
# start, 6.4 at the end), old = b93c5ef, new = try_sub_now through Session::write_autocommit:
#   old: 14,332 ops/s (12,957-16,646), p99 9.53 ms (9.11-10.52), clock_nanosleep 5,227 (3,910-6,106)
#   new: 38,079 ops/s (29,341-44,384), p99 3.19 ms (1.54-4.72),  clock_nanosleep 0 (0-0)
# No errors in either (the 5 s busy timeout never ran out). Under strace both run slower (old
# 5,800-11,600 ops/s, new 740-3,700: its every write is a hand-over to the one writer
# connection's thread), so the traced runs count sleeps and are not compared for speed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
require_tools sqlite-autocommit-writers git cargo strace awk

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-3}
TASKS=${TASKS:-16}
OLD_REV=${OLD_REV:-b93c5ef}

work=$(mktemp -d /tmp/contend-autocommit-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/old" "$work/bench/src"
git -C "$repo" archive "$OLD_REV" | tar -x -C "$work/old"
sed -i 's/^name = "contend"$/name = "contend-old"/' "$work/old/crates/contend/Cargo.toml"
cp "$repo/Cargo.lock" "$work/bench/Cargo.lock"
cat > "$work/bench/Cargo.toml" <<EOF
[package]
name = "contend-autocommit-bench"
version = "0.0.0"
edition = "2024"
publish = false

[dependencies]
contend_old = { package = "contend-old", path = "$work/old/crates/contend" }
contend_new = { package = "contend", path = "$repo/crates/contend" }
tokio = { version = "1", features = ["rt-multi-thread", "macros", "time"] }

[profile.release]
debug = false

[workspace]
EOF
cat > "$work/bench/src/main.rs" <<'EOF'
//! One run: TASKS tasks call `Counter::try_sub_now` on one row for DURATION seconds.
use std::time::{Duration, Instant};

const START: i64 = 1_000_000_000_000;

macro_rules! run {
    ($c:ident, $path:expr, $tasks:expr, $duration:expr) => {{
        let db = $c::Db::connect(&format!("sqlite:{}", $path)).await.expect("connect");
        db.execute_script(&format!(
            "CREATE TABLE account (id INTEGER PRIMARY KEY, balance BIGINT NOT NULL); \
             INSERT INTO account VALUES (1, {START})"
        ))
        .await
        .expect("schema");
        let counter = $c::strategy::atomic::Counter::new("account", "id", "balance").unwrap();
        let started = Instant::now();
        let deadline = started + $duration;
        let mut tasks = Vec::new();
        for _ in 0..$tasks {
            let (db, counter) = (db.clone(), counter.clone());
            tasks.push(tokio::spawn(async move {
                let (mut latencies, mut errors) = (Vec::new(), 0_u64);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match counter.try_sub_now(&db, 1_i64, 1).await {
                        Ok(true) => latencies.push(t.elapsed()),
                        Ok(false) => panic!("the row ran out"),
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors)
            }));
        }
        let (mut latencies, mut errors) = (Vec::new(), 0);
        for t in tasks {
            let (l, e) = t.await.expect("task");
            latencies.extend(l);
            errors += e;
        }
        let elapsed = started.elapsed();
        let left: i64 = db
            .query_scalar("SELECT balance FROM account WHERE id = 1")
            .fetch_one(db.pool())
            .await
            .expect("balance");
        db.close().await;
        (latencies, errors, elapsed, START - left)
    }};
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (version, path) = (args[1].as_str(), args[2].as_str());
    let tasks: usize = args[3].parse().expect("tasks");
    let duration = Duration::from_secs_f64(args[4].parse().expect("seconds"));
    let (mut latencies, errors, elapsed, applied) = match version {
        "old" => run!(contend_old, path, tasks, duration),
        "new" => run!(contend_new, path, tasks, duration),
        other => panic!("old or new, not {other}"),
    };
    let ops = latencies.len();
    assert_eq!(applied, ops as i64, "every successful call took exactly one unit");
    latencies.sort();
    let p99 = latencies
        .get((ops * 99 / 100).min(ops.saturating_sub(1)))
        .copied()
        .unwrap_or_default();
    println!(
        "ops={ops} ops_s={:.0} p99_ms={:.2} errors={errors}",
        ops as f64 / elapsed.as_secs_f64(),
        p99.as_secs_f64() * 1e3
    );
}
EOF

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$work/target}
echo "building (release, offline)..." >&2
cargo build --release --offline -q --manifest-path "$work/bench/Cargo.toml"
bin=$CARGO_TARGET_DIR/release/contend-autocommit-bench

field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p" <<<"$2"; }
declare -A ops p99 sleeps
for ((round = 0; round < ROUNDS; round++)); do
  if ((round % 2 == 0)); then order="old new"; else order="new old"; fi
  for v in $order; do
    rm -f "$work"/db*
    line=$("$bin" "$v" "$work/db.sqlite" "$TASKS" "$DURATION")
    rm -f "$work"/db*
    traced=$(strace -f -c --seccomp-bpf -e trace=clock_nanosleep -o "$work/strace.txt" \
      "$bin" "$v" "$work/db.sqlite" "$TASKS" "$DURATION")
    n=$(awk '$NF == "clock_nanosleep" { print $4 }' "$work/strace.txt")
    n=${n:-0}
    echo "round $((round + 1)) $v: $line clock_nanosleep=$n (traced run: $traced)"
    ops[$v]+="$(field ops_s "$line") "
    p99[$v]+="$(field p99_ms "$line") "
    sleeps[$v]+="$n "
  done
done
echo
echo "TASKS=$TASKS DURATION=${DURATION}s ROUNDS=$ROUNDS, old=$OLD_REV new=worktree; median (min-max)"
for v in old new; do
  # shellcheck disable=SC2086
  printf '%s: ops/s %s (%s)  p99 ms %s (%s)  clock_nanosleep %s (%s)\n' "$v" \
    "$(median ${ops[$v]})" "$(spread ${ops[$v]})" \
    "$(median ${p99[$v]})" "$(printf '%s\n' ${p99[$v]} | sort -g | awk 'NR==1{lo=$1}{hi=$1}END{printf "%s-%s", lo, hi}')" \
    "$(median ${sleeps[$v]})" "$(spread ${sleeps[$v]})"
done
