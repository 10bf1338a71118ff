# Sourced by the callgrind scripts (instructions.sh, footprint.sh) from the
# workspace's root: `bin`, the transport_compare to measure ($BIN, or this
# workspace's release build of it, built now), and `out`, a scratch
# directory removed on exit, holding a run directory of its own (another
# benchmark may run a cluster of the same name).
if [ -z "${BIN:-}" ]; then
    cargo build --quiet --release --example transport_compare
fi
bin=${BIN:-target/release/examples/transport_compare}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
mkdir -m 700 "$out/run"
export XDG_RUNTIME_DIR="$out/run"
