#!/usr/bin/env bash
# The real example under HTTP load while forks are SIGKILLed: read-only
# requests (`GET /profile/{user}`, idempotent calls) must all answer 2xx.
# Only connections the killed frontend fork had accepted may break (wrk
# counts those as socket errors, not as non-2xx responses).
#
#   bash benches/realapp_under_kill.sh            # 10 s of wrk, 2 kills
#   DURATION=30 CONNECTIONS=64 bash benches/realapp_under_kill.sh
#
# Needs wrk (Debian's package) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-32}
PORT=${PORT:-18$((RANDOM % 900 + 100))}
cargo build --release --example realapp -q
cargo build --release -p evilcluster-cli -q
tmp=$(mktemp -d)
app=
cleanup() {
  [ -n "$app" ] && kill -TERM "$app" 2>/dev/null && wait "$app" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
export TMPDIR=$tmp
RUST_LOG=warn target/release/examples/realapp --serve --port "$PORT" </dev/null >"$tmp/app.log" 2>&1 &
app=$!
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$PORT/profile/alice" >/dev/null 2>&1 && break
  sleep 0.1
done
pid_of() {
  target/release/evilcluster ps myapp --json | python3 -c "
import json, sys
for row in json.load(sys.stdin)['processes']:
    if row['path'] == '$1':
        print(row['pid'])
"
}
wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" "http://127.0.0.1:$PORT/profile/alice" >"$tmp/wrk.txt" &
load=$!
sleep $((DURATION / 3))
api=$(pid_of myapp/webserverApi/1)
echo "SIGKILL myapp/webserverApi/1 (pid $api)"
kill -9 "$api"
sleep $((DURATION / 3))
front=$(pid_of myapp/webserverFrontend/1)
echo "SIGKILL myapp/webserverFrontend/1 (pid $front)"
kill -9 "$front"
wait "$load"
cat "$tmp/wrk.txt"
if grep -q "Non-2xx" "$tmp/wrk.txt"; then
  echo "FAIL: some requests were not answered with 2xx"
  exit 1
fi
echo "ok: every response was 2xx"
