#!/bin/bash
# first_call.sh: what the first geolocate() of a fresh backend costs beyond
# an inference, step by step, median of RUNS fresh sessions.
#
#   test/bench/first_call.sh [MODEL_DIR [RUNS [THREADS]]]
#       default models/full-random (test/bench/make_full_model.py), 5 runs,
#       1 thread; needs `make install`
#
# Each run opens a new session and times, with psql's \timing:
#   postgis    a first geography value (loads PostGIS, as any query using
#              it does; not osv5m's cost)
#   library    a first osv5m C function (loads osv5m.so)
#   first      the first geolocate() (opens the model, starts the threads,
#              allocates the run state, first touch of the weights' pages)
#   second     the second geolocate() on the same image
# and overhead = first - second.  The weights are in the page cache (a
# warm-up session runs first), as they are on a server in use.
set -eu
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
MODEL=$(cd "${1:-models/full-random}" && pwd)
RUNS=${2:-5}
THREADS=${3:-1}
DIR=$ROOT/build/bench/first-call
PORT=${FIRST_CALL_PORT:-54398}
IMG=$ROOT/test/data/images/jpeg_224x224.jpg
. test/pg/cluster.sh
cluster_init "$DIR" "$PORT" "osv5m.model_path = '$MODEL'" "jit = off" >/dev/null
trap 'cluster_stop "$DIR"' EXIT
cluster_start "$DIR" >/dev/null
psql -X -q -c "SET client_min_messages = warning" -c "CREATE EXTENSION osv5m CASCADE"
psql -X -q -At -c "SELECT ST_AsText(geolocate(pg_read_binary_file('$IMG')))" >/dev/null

: >"$DIR/times"
for i in $(seq 1 "$RUNS"); do
	psql -X -q -At -v ON_ERROR_STOP=1 <<SQL | sed -nE 's/^Time: ([0-9.]+) ms.*/\1/p' | paste -sd' ' >>"$DIR/times"
SET osv5m.threads = $THREADS;
\timing on
SELECT 'SRID=4326;POINT(0 0)'::geography IS NOT NULL;
SELECT haversine_km('SRID=4326;POINT(0 0)', 'SRID=4326;POINT(1 0)') > 0;
SELECT geolocate(pg_read_binary_file('$IMG')) IS NOT NULL;
SELECT geolocate(pg_read_binary_file('$IMG')) IS NOT NULL;
SQL
done
awk -v runs="$RUNS" -v threads="$THREADS" '
	{ for (j = 1; j <= 4; j++) v[j, NR] = $j; over[NR] = $3 - $4 }
	function median(a, j,    n, i, k, t, s) {
		n = 0
		for (i = 1; i <= runs; i++) s[++n] = (j ? a[j, i] : over[i])
		for (i = 1; i <= n; i++) for (k = i + 1; k <= n; k++) if (s[k] < s[i]) { t = s[i]; s[i] = s[k]; s[k] = t }
		return (n % 2) ? s[(n + 1) / 2] : (s[n / 2] + s[n / 2 + 1]) / 2
	}
	END {
		printf "fresh backend, %d thread(s), median of %d sessions (ms): postgis %.1f, library %.1f, first geolocate %.1f, second %.1f; overhead of the first call %.1f ms\n",
			threads, runs, median(v, 1), median(v, 2), median(v, 3), median(v, 4), median(v, 0)
	}' "$DIR/times"
