# Sourced by the callgrind scripts (instructions.sh, footprint.sh) from the
# workspace's root: `bin`, the transport_compare to measure ($BIN, or this
# workspace's release build of it, built now), and scratch.sh's `out`.
if [ -z "${BIN:-}" ]; then
    cargo build --quiet --release --example transport_compare
fi
bin=${BIN:-target/release/examples/transport_compare}
source benches/scratch.sh
