#!/bin/bash
# coretype.sh: OpenBLAS SGEMM on the model's shapes with its AVX2 kernels
# (Haswell) and its AVX-512 kernels (SkylakeX), alternated, median of RUNS.
# It shows what osv5m's choice of kernels (src/core/blas.c) is worth on a
# CPU that OpenBLAS 0.3.21 does not recognise.  ROWS is the row count of
# the products: 257 for one image, 1028 for a run of 4 (osv5m_enrich's
# default osv5m.images_per_run).
#
#   test/bench/coretype.sh [THREADS [RUNS [ROWS]]]   default 1 thread, 3 runs, 257 rows
set -eu
cd "$(dirname "$0")/../.."
threads=${1:-1}
runs=${2:-3}
rows=${3:-257}
prog=build/sgemm_rate
mkdir -p build
[ -x "$prog" ] || cc -std=gnu11 -O2 -o "$prog" test/bench/sgemm_rate.c -lopenblas -lm
if ! grep -qw avx512f /proc/cpuinfo; then
	echo "this CPU has no AVX-512: nothing to compare"
	exit 0
fi
rate() { OPENBLAS_CORETYPE=$1 "$prog" --threads "$threads" --tokens "$rows" | sed -nE 's/.*"gflops":([0-9.]+)\}$/\1/p'; }
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
: >build/coretype.haswell
: >build/coretype.skylakex
for i in $(seq 1 "$runs"); do
	rate Haswell >>build/coretype.haswell
	rate SkylakeX >>build/coretype.skylakex
done
h=$(median <build/coretype.haswell)
s=$(median <build/coretype.skylakex)
echo "threads $threads, $rows rows, median of $runs: Haswell (AVX2) $h GFLOP/s, SkylakeX (AVX-512) $s GFLOP/s, ratio $(awk -v a="$s" -v b="$h" 'BEGIN { printf "%.2f", a / b }')"
