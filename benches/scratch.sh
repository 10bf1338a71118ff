# Sourced by the benchmark scripts from the workspace's root: `out`, a
# scratch directory removed on exit, with a run directory of its own in it
# (XDG_RUNTIME_DIR), so the clusters a benchmark starts never meet another
# benchmark's cluster of the same name. A script with more to undo on exit
# replaces the trap and removes "$out" itself.
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
mkdir -m 700 "$out/run"
export XDG_RUNTIME_DIR="$out/run"

# Prints the absolute path of example $1 to measure: $BIN when set (another
# build of it, such as static_builds.sh's or pgo.sh's), else this
# workspace's release build of it, built now.
example_binary() {
    if [ -z "${BIN:-}" ]; then
        cargo build --quiet --release --example "$1" || return 1
    fi
    realpath "${BIN:-target/release/examples/$1}"
}
