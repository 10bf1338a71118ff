#!/usr/bin/env bash
# What the C library, and how it is linked, costs a starting process: the
# real example's tree built three ways, started in turn.
#
#   dynamic-glibc  this workspace's release build, the default
#   static-glibc   RUSTFLAGS="-C target-feature=+crt-static": no dynamic
#                  loader, no shared libraries to map and relocate; glibc
#                  still probes the CPU in every process
#   static-musl    --target x86_64-unknown-linux-musl: no loader and no CPU
#                  probing, but musl's own memcpy and malloc
#
#   bash benches/static_builds.sh      # RUNS=21 interleaved starts of each build
#
# For each build it prints: the median [min-max] of the tree's "ready in"
# and of the CPU its processes used until then, over RUNS starts, the
# builds taking turns; the tree's PSS and RSS summed over its processes
# while it serves; and the small-message half of transport_compare pinned
# to one CPU (round trip and send_all), each beside that build's own raw
# socket, which is built the same way.
#
# Linux on x86_64 with glibc; needs the musl target
# (rustup target add x86_64-unknown-linux-musl) and, for the pinned runs,
# taskset (util-linux).
set -euo pipefail
cd "$(dirname "$0")/.."
host=$(rustc -vV | awk '/^host:/ {print $2}')
[ "$host" = x86_64-unknown-linux-gnu ] || { echo "this compares builds for x86_64 Linux with glibc; the host is $host" >&2; exit 1; }
rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl || {
    echo "the musl target is needed: rustup target add x86_64-unknown-linux-musl" >&2
    exit 1
}
RUNS=${RUNS:-21}
examples=(--example realapp --example transport_compare)
builds=(dynamic-glibc static-glibc static-musl)
declare -A dir=(
    [dynamic-glibc]=target/release/examples
    [static-glibc]=target/crt-static/$host/release/examples
    [static-musl]=target/x86_64-unknown-linux-musl/release/examples
)
source benches/scratch.sh
export RUST_LOG=warn
serving=
cleanup() {
    [ -n "$serving" ] && kill -TERM "$serving" 2>/dev/null && wait "$serving" 2>/dev/null
    rm -rf "$out"
}
trap cleanup EXIT

cargo build --quiet --release "${examples[@]}"
# A target directory of its own: RUSTFLAGS would otherwise rebuild the default one.
RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=target/crt-static \
    cargo build --quiet --release --target "$host" "${examples[@]}"
cargo build --quiet --release --target x86_64-unknown-linux-musl "${examples[@]}"

# Prints "median [min-max]" of the numbers on standard input.
summary() {
    sort -n | awk '{v[NR] = $1} END { printf "%.1f [%.1f-%.1f]", v[int((NR + 1) / 2)], v[1], v[NR] }'
}

# Prints the pids of the descendants of $1.
descendants() {
    local child
    for child in $(pgrep -P "$1" || true); do
        echo "$child"
        descendants "$child"
    done
}

# Sets pss, rss (KiB) and count (processes) of the real example's tree of
# build $1, serving. Runs in this shell, so the exit trap knows the tree.
tree_memory() {
    local log="$out/serve.log" deadline=$((SECONDS + 60))
    "${dir[$1]}/realapp" --serve >"$log" 2>&1 &
    serving=$!
    until grep -q 'tree ready in' "$log"; do
        [ $SECONDS -lt $deadline ] || { echo "$1: the tree was not ready within 60 s" >&2; cat "$log" >&2; exit 1; }
        sleep 0.1
    done
    sleep 1 # let the tree settle: first requests, lifecycle events
    local pid p r
    pss=0 rss=0 count=0
    for pid in "$serving" $(descendants "$serving"); do
        read -r p r < <(awk '/^Pss:/ {p = $2} /^Rss:/ {r = $2} END {print p, r}' "/proc/$pid/smaps_rollup")
        pss=$((pss + p)) rss=$((rss + r)) count=$((count + 1))
    done
    kill -TERM "$serving"
    wait "$serving" || true
    serving=
}

echo "the real example's tree, $RUNS starts of each build, taking turns"
for _ in $(seq "$RUNS"); do
    for build in "${builds[@]}"; do
        # "tree ready in 16.4 ms (9 processes, 27.1 ms of CPU on 2 CPUs)"
        line=$("${dir[$build]}/realapp" 2>/dev/null | grep -o 'tree ready in [0-9.]* ms ([0-9]* processes, [0-9.]* ms of CPU' || true)
        [ -n "$line" ] || { echo "$build: the real example printed no 'tree ready in'" >&2; exit 1; }
        echo "$line" | awk '{print $4}' >>"$out/$build.starts"
        echo "$line" | awk '{print $8}' >>"$out/$build.cpu"
    done
done
printf '%-14s %22s %22s %8s %8s\n' build "ready ms" "CPU ms until ready" "PSS MiB" "RSS MiB"
for build in "${builds[@]}"; do
    tree_memory "$build"
    awk -v b="$build" -v s="$(summary <"$out/$build.starts")" -v c="$(summary <"$out/$build.cpu")" \
        -v p="$pss" -v r="$rss" -v n="$count" \
        'BEGIN { printf "%-14s %22s %22s %8.1f %8.1f   (%d processes)\n", b, s, c, p / 1024, r / 1024, n }'
done
echo "(medians [min-max] of the starts; memory while the tree serves)"

echo
echo "transport_compare, small messages, pinned to one CPU (each build against its own raw socket)"
for build in "${builds[@]}"; do
    echo "== $build"
    TRANSPORT_COMPARE_SECTIONS=small taskset -c 1 "${dir[$build]}/transport_compare" 2>/dev/null |
        grep -E '^(round trip|  one send_all|pipelined)'
done
