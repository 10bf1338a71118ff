#!/usr/bin/env bash
# Where a process's start goes: the real example's tree started RUNS times
# (default 20) under `perf record`, and the first 6 ms of CPU of every
# process it started sorted into what ran then (the C library's CPU probing,
# the dynamic loader's relocations, exec, page faults, evilcluster's own
# code...). Beside it, what this machine charges any process: one `cpuid`
# instruction (a hypervisor may trap it), a process with no C library, and a
# static C program that only returns (glibc's start-up on its own).
#
#   bash benches/start_breakdown.sh [RUNS]
#   BIN=path/to/realapp bash benches/start_breakdown.sh   # another build of it (static_builds.sh's)
#
# Needs perf, python3 and gcc (apt-get install linux-perf python3 gcc), and
# the right to sample the whole system (root, or perf_event_paranoid <= 1).
# Sampling is by timer (cpu-clock): it works in virtual machines without
# hardware counters.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in perf python3 gcc; do
    command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 1; }
done
runs=${1:-20}
source benches/scratch.sh
bin=$(example_binary realapp)

cat >"$out/cpuid.c" <<'C'
#include <cpuid.h>
#include <stdio.h>
#include <time.h>
int main(void) {
    struct timespec a, b;
    unsigned eax, ebx, ecx, edx;
    const int n = 2000;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < n; i++) __cpuid_count(4, i & 3, eax, ebx, ecx, edx);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.2f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n / 1e3);
    return 0;
}
C
cat >"$out/nolibc.c" <<'C'
void _start(void) { __asm__ volatile("mov $60, %eax; xor %edi, %edi; syscall"); }
C
echo 'int main(void) { return 0; }' >"$out/static.c"
gcc -O2 -o "$out/cpuid" "$out/cpuid.c"
gcc -O2 -static -nostdlib -o "$out/nolibc" "$out/nolibc.c"
gcc -O2 -static -o "$out/static" "$out/static.c"
task_clock() { perf stat -r 200 "$1" 2>&1 | awk '/task-clock/ {print $1}'; }
echo "this machine: one cpuid $("$out/cpuid") us; a process with no C library $(task_clock "$out/nolibc") ms of CPU," \
    "a static glibc program that only returns $(task_clock "$out/static") ms"

RUST_LOG=warn perf record --quiet -e cpu-clock -F 20000 -g -o "$out/perf.data" -- \
    bash -c "for i in \$(seq $runs); do '$bin' >/dev/null 2>&1; done" >/dev/null 2>&1
perf script -i "$out/perf.data" -F pid,time,ip,sym,dso 2>/dev/null >"$out/samples.txt"

python3 - "$out/samples.txt" 20000 <<'PY'
import collections, re, sys

path, hz = sys.argv[1], int(sys.argv[2])
WINDOW = 0.006  # seconds of each process's life, from its first sample
# First match wins: a sample is put where the deepest frame named here is.
KINDS = [
    ("glibc's CPU probing (cpuid)", r"intel_check_word|handle_intel|handle_amd|handle_zhaoxin|init_cpu_features|get_common_|update_active|init_cacheinfo"),
    ("libgcc's CPU probing (cpuid)", r"__cpu_indicator_init"),
    ("Rust std's CPU probing (cpuid)", r"std_detect"),
    ("SHA-256's CPU probing (cpuid)", r"shani_cpuid|cpufeatures"),
    ("exec", r"execve|load_elf_binary|begin_new_exec"),
    ("dynamic loader: loading and relocating", r"_dl_relocate|_dl_map|dl_main|_dl_start"),
    ("process exit", r"do_exit|exit_mmap|do_group_exit"),
    ("page faults elsewhere", r"exc_page_fault"),
    ("fork and threads", r"copy_process|kernel_clone|ret_from_fork|clone3"),
]

samples, current = [], None
for line in open(path):
    head = re.match(r"\s*(\d+)\s+([\d.]+):", line)
    if head:
        current = (int(head.group(1)), float(head.group(2)), [])
        samples.append(current)
    elif line.strip() and current is not None:
        parts = line.strip().split(None, 1)
        current[2].append(parts[1] if len(parts) > 1 else "?")

first = {}
for pid, at, _ in samples:
    first.setdefault(pid, at)

def kind(stack):
    joined = " | ".join(stack)
    for name, pattern in KINDS:
        if re.search(pattern, joined):
            return name
    if any("evilcluster" in frame for frame in stack):
        return "evilcluster's own code"
    if any("realapp" in frame.split(" (")[0] for frame in stack):
        return "the example's own code"
    return "everything else"

counts = collections.Counter(kind(stack) for pid, at, stack in samples if at - first[pid] <= WINDOW)
total = sum(counts.values())
processes = len(first)
if not total:
    sys.exit("no samples: can perf sample the whole system here?")
per_process = lambda n: n / hz / processes * 1e3
print(f"{processes} processes; their first {WINDOW * 1e3:.0f} ms: {per_process(total):.2f} ms of CPU each")
for name, n in counts.most_common():
    print(f"  {n / total:6.1%} {per_process(n):6.3f} ms  {name}")
PY
