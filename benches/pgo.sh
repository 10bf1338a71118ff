#!/usr/bin/env bash
# What a profile-guided build (PGO) of the program gives the cold paths:
# a request to a fork that has not run for a while (round robin over 256
# forks, a broadcast to all of them), where every cache line of code the
# request runs through is fetched again.
#
#   bash benches/pgo.sh            # RUNS=10 interleaved runs of each build
#
# Builds the examples twice, as this workspace's release profile does and
# with PGO (cargo-pgo: rustc's -Cprofile-generate, then -Cprofile-use).
# The profile is gathered from the small-message half of transport_compare
# and the real example, never from `scale`, the program measured: what it
# learns is the runtime's request path, not the benchmark. Then both builds
# of `scale 256` run pinned to one CPU, alternately, and the medians (with
# the min-max) are printed. Each build's raw echo, the same binary's
# baseline, is printed beside it: PGO speeds it up too.
#
# With valgrind at hand, it then counts the code and the instructions a
# round trip runs through in each build (benches/footprint.sh and
# benches/instructions.sh; the PGO build's profile came from that very
# program there, so read those as an upper bound).
#
# Needs `cargo install cargo-pgo` and `rustup component add llvm-tools`.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-pgo >/dev/null || {
    echo "cargo-pgo is needed: cargo install cargo-pgo && rustup component add llvm-tools" >&2
    exit 1
}
RUNS=${RUNS:-10}
examples=(--example scale --example transport_compare --example realapp)
triple=$(rustc -vV | awk '/^host:/ {print $2}')
source benches/scratch.sh
export RUST_LOG=warn

cargo build --quiet --release "${examples[@]}"
cp target/release/examples/scale "$out/scale.plain"

cargo pgo build -- --quiet "${examples[@]}" >/dev/null
pgo=target/$triple/release/examples
echo "gathering the profile (transport_compare, small messages; the real example)" >&2
TRANSPORT_COMPARE_SECTIONS=small "$pgo/transport_compare" >/dev/null 2>"$out/training.log" ||
    { cat "$out/training.log" >&2; exit 1; }
"$pgo/realapp" >/dev/null 2>"$out/training.log" || { cat "$out/training.log" >&2; exit 1; }
cargo pgo optimize build -- --quiet "${examples[@]}" >/dev/null
cp "$pgo/scale" "$out/scale.pgo"
cp "$pgo/transport_compare" "$out/transport_compare.pgo"

for _ in $(seq "$RUNS"); do
    for build in plain pgo; do
        printf '%s ' "$build"
        taskset -c 1 "$out/scale.$build" 256 2>/dev/null | tail -1 | awk -F'|' '{
            split($5, b, " "); split($6, r, " "); split($7, w, " ")
            print b[1], r[1], r[2], r[3], w[3], w[4], w[5] }'
    done
done >"$out/runs"

echo "scale 256, pinned to one CPU: median [min-max] of $RUNS runs of each build"
python3 - "$out/runs" <<'EOF'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    build, *figures = line.split()
    runs.setdefault(build, []).append([float(f) for f in figures])
names = ["bcast us", "rr us", "one us", "rr/1", "raw bcast", "raw one", "raw rr/1"]
print(f"{'build':6s}" + "".join(f"{n:>20s}" for n in names))
for build, rows in runs.items():
    cells = []
    for i in range(len(names)):
        column = [row[i] for row in rows]
        cells.append(f"{statistics.median(column):.1f} [{min(column):.1f}-{max(column):.1f}]")
    print(f"{build:6s}" + "".join(f"{c:>20s}" for c in cells))
EOF

if command -v valgrind >/dev/null; then
    for build in plain pgo; do
        echo
        echo "== $build build"
        if [ "$build" = plain ]; then bin=target/release/examples/transport_compare; else bin=$out/transport_compare.pgo; fi
        BIN=$bin bash benches/footprint.sh round-trip raw-round-trip
        BIN=$bin bash benches/instructions.sh round-trip raw-round-trip send-all
    done
fi
