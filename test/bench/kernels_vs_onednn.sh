#!/bin/bash
# kernels_vs_onednn.sh: our kernels (gemm_rate) against oneDNN's matmul
# (onednn_rate) on the products of one CLIP ViT-L/14 block, fp32, bf16 and
# int8, 1 and 2 threads, each against the register-only peak of the same
# instructions (fma_peak) measured in the same rounds.
#
#   test/bench/kernels_vs_onednn.sh [--runs N] [--reps R]
#       N rounds (default 3) of every configuration; R reps per run
#       (default 5; each program prints the median of its R)
#
# The three programs run one after the other for each configuration, and
# the configurations one after the other in each round, so that a change
# in the machine's load over the run touches all of them alike; the table
# gives the median over the rounds.  Needs oneDNN's headers and library
# (Debian: apt-get install -y libdnnl-dev).
#
# The environment passes through unchanged.  OMP_WAIT_POLICY matters:
# Debian's oneDNN runs on GNU OpenMP, whose threads spin a while at each
# barrier by default; on a machine with more runnable threads than cores
# that spinning takes the core from the thread being waited for, and
# OMP_WAIT_POLICY=passive can change oneDNN's 2-thread figures several fold.
set -eu
cd "$(dirname "$0")/../.."

RUNS=3
REPS=5
while [ $# -gt 0 ]; do
	case "$1" in
	--runs) RUNS=$2; shift 2 ;;
	--reps) REPS=$2; shift 2 ;;
	*) echo "usage: $0 [--runs N] [--reps R]" >&2; exit 2 ;;
	esac
done

if [ ! -f /usr/include/oneapi/dnnl/dnnl.h ]; then
	echo "kernels_vs_onednn: oneDNN is not installed (no /usr/include/oneapi/dnnl/dnnl.h)." >&2
	echo "Install it with: apt-get install -y libdnnl-dev" >&2
	exit 1
fi

make -s build/gemm_rate
cc -std=gnu11 -O2 -fopenmp -o build/onednn_rate test/bench/onednn_rate.c -ldnnl -lm || {
	echo "kernels_vs_onednn: building onednn_rate failed; is libdnnl-dev complete? apt-get install -y libdnnl-dev" >&2
	exit 1
}
cc -std=gnu11 -O3 -pthread -o build/fma_peak test/bench/fma_peak.c

echo "# osv5m kernels vs oneDNN $(dpkg-query -W -f='${Version}' libdnnl-dev 2>/dev/null || echo '?')"
echo
lscpu | grep "Model name"
echo "CPUs: $(nproc); flags: $(grep -o -w -E 'avx512f|avx512_bf16|avx512_vnni|amx_bf16|amx_int8' /proc/cpuinfo | sort -u | tr '\n' ' ')"
# Nothing is unset: neither side uses OpenBLAS (OPENBLAS_* do not apply).
# oneDNN runs on GNU OpenMP; onednn_rate sets its thread count itself.
echo "Environment: nothing unset (neither side uses OpenBLAS, so OPENBLAS_* do not apply);" \
	"onednn_rate sets OpenMP's thread count itself; OMP_* set: $(env | grep '^OMP_' | tr '\n' ' ' || true)"
echo "Load before: $(uptime)"
echo

OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
for round in $(seq 1 "$RUNS"); do
	for threads in 1 2; do
		for prec in fp32 bf16 int8; do
			echo "round $round/$RUNS: $threads thread(s), $prec" >&2
			echo "osv5m $threads $prec $(build/gemm_rate --threads "$threads" --reps "$REPS" --precision "$prec")" >>"$OUT"
			echo "onednn $threads $prec $(build/onednn_rate --threads "$threads" --reps "$REPS" --precision "$prec")" >>"$OUT"
			echo "peak $threads $prec $(build/fma_peak "$threads" 1 "$prec")" >>"$OUT"
		done
	done
done

echo "Load after: $(uptime)"
echo

/usr/bin/python3 - "$OUT" "$RUNS" <<'PY'
import json
import statistics
import sys

runs = {}
for line in open(sys.argv[1]):
    who, threads, prec, doc = line.split(" ", 3)
    runs.setdefault((who, int(threads), prec), []).append(json.loads(doc))


def med(who, threads, prec, shape=None):
    docs = runs[(who, threads, prec)]
    if shape is None:
        return statistics.median(d["gflops"] for d in docs)
    return statistics.median(s["gflops"] for d in docs for s in d["shapes"] if s["name"] == shape)


configs = sorted({(t, p) for (_, t, p) in runs}, key=lambda c: (c[0], ["fp32", "bf16", "int8"].index(c[1])))
print(f"Median of {sys.argv[2]} rounds; GFLOP/s (int8: GOP/s), 2*M*N*K per product, M=257, 4 layers.")
print()
print("| threads | precision | osv5m kernels | oneDNN | peak | osv5m % peak | oneDNN % peak | osv5m / oneDNN |")
print("|---:|---|---:|---:|---:|---:|---:|---:|")
for t, p in configs:
    o, d, k = med("osv5m", t, p), med("onednn", t, p), med("peak", t, p)
    print(f"| {t} | {p} | {o:.1f} | {d:.1f} | {k:.1f} | {100 * o / k:.0f}% | {100 * d / k:.0f}% | {o / d:.2f} |")
print()
print("Per shape (median GFLOP/s, osv5m / oneDNN):")
print()
print("| threads | precision | qkv | out | fc1 | fc2 |")
print("|---:|---|---:|---:|---:|---:|")
for t, p in configs:
    cells = [f"{med('osv5m', t, p, s):.0f} / {med('onednn', t, p, s):.0f}" for s in ("qkv", "out", "fc1", "fc2")]
    print(f"| {t} | {p} | " + " | ".join(cells) + " |")
print()
print("Spread over the rounds (min-max of each run's overall GFLOP/s):")
for t, p in configs:
    spread = []
    for who in ("osv5m", "onednn", "peak"):
        v = [d["gflops"] for d in runs[(who, t, p)]]
        spread.append(f"{who} {min(v):.0f}-{max(v):.0f}")
    print(f"  {t} thread(s) {p}: " + ", ".join(spread))
print()
print("oneDNN implementations, largest check error, CPU ms of the other threads after a call (0-10, 10-100, 100-300, 300-1000 ms):")
for t, p in configs:
    docs = runs[("onednn", t, p)]
    impls = sorted({s["impl"] for d in docs for s in d["shapes"]})
    err = max(s["max_rel_err"] for d in docs for s in d["shapes"])
    idle = [max(d["idle_cpu_ms"][i] for d in docs) for i in range(4)]
    print(f"  {t} thread(s) {p}: {', '.join(impls)}; max rel err {err:.2e}; idle CPU ms (worst run) {idle}")
print()
print("osv5m kernel paths: " + ", ".join(sorted({d["kernels"] for (w, _, _), docs in runs.items() if w == "osv5m" for d in docs})))
PY
