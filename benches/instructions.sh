#!/usr/bin/env bash
# Instructions per message on each side of one path, counted by callgrind:
# the same count whatever else the machine is doing, so a change of a few
# per cent shows. Each path runs twice (N1 and N2 messages); the difference
# divided by N2-N1 removes start-up and warm-up.
#
#   bash benches/instructions.sh [path ...]   # default: every path
#   BIN=path/to/transport_compare bash benches/instructions.sh   # another build of it
#
# "client" is the calling process (the master), "server" the busiest other
# process (the echo worker, or the raw echo server for raw-pipelined).
#
# One exception to "the same count": a caller's calls share a deadline timer
# per millisecond of wall clock (node/deadline.rs), and under callgrind a
# sequential round trip takes about 30 times as long, so a new timer task
# is started every ~4 calls instead of every ~100. The client's round-trip
# figure is inflated by that, and moves with the machine's speed (6,600 to
# 7,450 seen); the server's figures and the pipelined paths are not.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
source benches/scratch.sh
bin=$(example_binary transport_compare)
N1=${N1:-2000}
N2=${N2:-12000}

# Prints "client server" instruction totals of one run.
totals() {
    local path=$1 count=$2 dir="$out/$1.$2"
    mkdir -p "$dir"
    RUST_LOG=warn TRANSPORT_COMPARE_ONLY=$path TRANSPORT_COMPARE_COUNT=$count \
        valgrind --tool=callgrind --trace-children=yes --callgrind-out-file="$dir/%p" \
        "$bin" >/dev/null 2>"$dir.log" || { cat "$dir.log" >&2; exit 1; }
    local master
    master=$(ls "$dir" | sort -n | head -1)
    local client server=0
    client=$(awk '/^totals:/ {print $2}' "$dir/$master")
    for f in "$dir"/*; do
        [ "$(basename "$f")" = "$master" ] && continue
        local t
        t=$(awk '/^totals:/ {print $2}' "$f")
        [ "${t:-0}" -gt "$server" ] && server=$t
    done
    echo "$client $server"
}

paths=("$@")
[ ${#paths[@]} -gt 0 ] || paths=(pipelined send-all raw-pipelined raw-futures round-trip raw-round-trip do-send)
echo "instructions per message (callgrind; N1=$N1, N2=$N2)"
printf '%-16s %14s %14s %14s\n' "path" "client/msg" "server/msg" "total/msg"
for path in "${paths[@]}"; do
    read -r c1 s1 < <(totals "$path" "$N1")
    read -r c2 s2 < <(totals "$path" "$N2")
    awk -v p="$path" -v c1="$c1" -v s1="$s1" -v c2="$c2" -v s2="$s2" -v n="$((N2 - N1))" \
        'BEGIN { c = (c2 - c1) / n; s = (s2 - s1) / n; printf "%-16s %14.0f %14.0f %14.0f\n", p, c, s, c + s }'
done
