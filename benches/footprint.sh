#!/usr/bin/env bash
# How much code one request runs through in each process: the distinct
# 64-byte cache lines and 4 KiB pages of code executed on (nearly) every
# request, counted by callgrind. A process that has not run for a while (a
# fork in a round robin over many) fetches each of those lines again and
# walks the page tables for each of those pages: this is the part of a cold
# request's cost that the code's layout decides, and unlike a timing it is
# the same on every run.
#
#   bash benches/footprint.sh [path ...]        # default: round-trip raw-round-trip
#   BIN=path/to/transport_compare bash benches/footprint.sh   # another build of it
#
# An instruction counts when it ran at least N/4 times in N messages: what
# runs on every request (or every other), not start-up or rare paths.
# Keep N large (20,000 by default): below a few thousand, loops run at
# start-up (the dynamic loader's) pass the mark too.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in valgrind python3; do
    command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 1; }
done
source benches/scratch.sh
bin=$(example_binary transport_compare)
N=${N:-20000}

paths=("$@")
[ ${#paths[@]} -gt 0 ] || paths=(round-trip raw-round-trip)
echo "code run through per message (callgrind; N=$N; lines of 64 bytes, pages of 4 KiB)"
for path in "${paths[@]}"; do
    dir="$out/$path"
    mkdir -p "$dir"
    RUST_LOG=warn TRANSPORT_COMPARE_ONLY=$path TRANSPORT_COMPARE_COUNT=$N \
        valgrind --tool=callgrind --dump-instr=yes --trace-children=yes --callgrind-out-file="$dir/%p" \
        "$bin" >/dev/null 2>"$dir.log" || { cat "$dir.log" >&2; exit 1; }
    python3 - "$path" "$N" "$dir"/* <<'EOF'
import collections, os, re, sys

path, n, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def executed(dump):
    """Instruction address -> times run, per object, from a callgrind dump
    made with --dump-instr=yes (the costs of calls, which are inclusive,
    left out)."""
    objects, runs = {}, collections.defaultdict(collections.Counter)
    positions, obj, address, after_calls = ["line"], None, 0, False
    for line in open(dump, errors="replace"):
        if line.startswith("positions:"):
            positions = line.split()[1:]
        elif line.startswith("ob="):
            m = re.match(r"\((\d+)\)(?: (.*))?", line[3:].strip())
            if m and m.group(2):
                objects[m.group(1)] = m.group(2)
            obj = objects.get(m.group(1)) if m else line[3:].strip()
        elif line.startswith("cob="):
            m = re.match(r"\((\d+)\) (.*)", line[4:].strip())
            if m:
                objects[m.group(1)] = m.group(2)
        elif line.startswith("calls="):
            after_calls = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            fields = line.split()
            first = fields[0]
            if first.startswith("+"):
                address += int(first[1:], 0)
            elif first.startswith("-"):
                address -= int(first[1:], 0)
            elif first != "*":
                address = int(first, 0)
            if after_calls:
                after_calls = False
                continue
            costs = fields[len(positions):]
            if costs:
                runs[obj][address] += int(costs[0])
    return runs

# The calling process is the first started (the lowest pid); the serving
# one is the busiest of the others.
dumps = sorted(files, key=lambda f: int(os.path.basename(f)))
def total(dump):
    for line in open(dump):
        if line.startswith("totals:"):
            return int(line.split()[1])
    return 0
client = dumps[0]
server = max(dumps[1:], key=total)
for side, dump in (("client", client), ("server", server)):
    lines = pages = 0
    parts = []
    for obj, counts in executed(dump).items():
        hot = [a for a, c in counts.items() if c >= n // 4]
        if not hot:
            continue
        l, p = len({a >> 6 for a in hot}), len({a >> 12 for a in hot})
        lines += l
        pages += p
        parts.append(f"{os.path.basename(obj or '?')} {l}/{p}")
    print(f"{path:16s} {side:6s} {lines:5d} lines ({lines * 64 / 1024:5.1f} KiB) {pages:4d} pages   "
          + ", ".join(sorted(parts)))
EOF
done
