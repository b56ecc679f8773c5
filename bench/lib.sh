# bench/lib.sh: helpers the bench scripts source (not a script of its own).

# median V...: the median of the numbers given (the mean of the middle two for an even count).
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }

# spread V...: "min-max" of the numbers given, rounded.
spread() { printf '%s\n' "$@" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.0f-%.0f", lo, hi }'; }

# ratio A B: A / B with two decimals (0 when B is 0).
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }

# require_tools WHO TOOL...: exits 2 (as WHO) naming the first TOOL not on the PATH.
require_tools() {
  local who=$1 tool
  shift
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "$who: $tool not found" >&2; exit 2; }
  done
}

# require_pg_url WHO URL: exits 2 (as WHO) unless URL is a postgres:// or postgresql:// URL.
require_pg_url() {
  case "$2" in postgres://*|postgresql://*) ;; *) echo "$1: not a PostgreSQL URL: $2" >&2; exit 2 ;; esac
}

# stop_process PID: TERM to PID (a child of this shell) if it still runs, and waits for it.
stop_process() {
  if [ -n "$1" ] && kill -0 "$1" 2>/dev/null; then
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
  fi
}

# contend_bin: $CONTEND_BIN when set, else the release binary, built now.
contend_bin() {
  if [ -n "${CONTEND_BIN:-}" ]; then
    echo "$CONTEND_BIN"
  else
    echo "building the release binary..." >&2
    cargo build --release -q -p contend-cli
    echo "${CARGO_TARGET_DIR:-target}/release/contend"
  fi
}

# url_with_database URL NAME: URL with its database (path) replaced by NAME.
url_with_database() {
  python3 - "$1" "$2" <<'PY'
import sys, urllib.parse as u
p = u.urlsplit(sys.argv[1])
print(u.urlunsplit((p.scheme, p.netloc, "/" + sys.argv[2], p.query, p.fragment)))
PY
}

# free_port: a TCP port on 127.0.0.1 that was free a moment ago.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# wait_for_service WHO BASE PID LOG: waits up to 10 s for BASE/healthz to answer; exits 2 (as WHO,
# with the service's LOG) when the process PID ends first or the service never answers.
wait_for_service() {
  local who=$1 base=$2 pid=$3 log=$4
  for _ in $(seq 1 100); do
    curl -fs "$base/healthz" >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || { echo "$who: the service exited:" >&2; cat "$log" >&2; exit 2; }
    sleep 0.1
  done
  curl -fs "$base/healthz" >/dev/null || { echo "$who: the service did not come up" >&2; exit 2; }
}
