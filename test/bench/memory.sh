#!/bin/bash
# memory.sh: private and shared memory of backends busy with geolocate(),
# for one or more model directories side by side, on one cluster.
#
#   test/bench/memory.sh [BACKENDS] MODEL_DIR...
#       e.g. test/bench/memory.sh 4 models/full-random models/full-random-pt
#       (test/bench/make_full_model.py [--published]); needs make install,
#       and root or the server's OS user to read /proc/PID/smaps_rollup
#
# For each model in turn, BACKENDS sessions (default 4; 1 thread each) run
# geolocate() over a table of the same JPEG, row after row; once every one
# has answered a first row, each backend's /proc/PID/smaps_rollup is read
# every half second for 10 s.  Prints, per model, the median over all
# samples of: private memory (USS = Private_Clean + Private_Dirty),
# anonymous memory, RSS, its shared part and PSS, in MB.  The weights are
# mapped read-only from the page cache, so they show as shared: PSS falls
# as 1/BACKENDS of them, USS stays what one backend costs on its own.
set -eu
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
BACKENDS=4
if [[ ${1:-} =~ ^[0-9]+$ ]]; then
	BACKENDS=$1
	shift
fi
[ $# -ge 1 ] || { sed -n '2,9p' "$0"; exit 2; }
DIR=$ROOT/build/bench/memory
PORT=${MEMORY_PORT:-54399}
IMG=$ROOT/test/data/images/jpeg_420_640x480.jpg
. test/pg/cluster.sh
cluster_init "$DIR" "$PORT" "jit = off" >/dev/null
trap 'kill $(jobs -p) 2>/dev/null; cluster_stop "$DIR"' EXIT
cluster_start "$DIR" >/dev/null
q() { psql -X -q -At -v ON_ERROR_STOP=1 "$@"; }
q -c "SET client_min_messages = warning" -c "CREATE EXTENSION osv5m CASCADE" \
	-c "CREATE TABLE imgs AS SELECT i, pg_read_binary_file('$IMG') AS img FROM generate_series(1, 400) i"

# median of the numbers on stdin
median() { sort -n | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
mb() { awk '{printf "%.0f", $1 / 1024}'; }

printf '%-40s %8s %6s %6s %6s %6s %6s %7s\n' model backends USS anon RSS shared PSS samples
for model in "$@"; do
	model=$(cd "$model" && pwd)
	: >"$DIR/samples"
	for i in $(seq "$BACKENDS"); do
		q -c "SET osv5m.model_path = '$model'" -c "SET osv5m.threads = 1" \
			-c "SET application_name = 'memory-bench'" \
			-c "SELECT count(geolocate(img)) FROM imgs" >/dev/null 2>"$DIR/session-$i.log" &
	done
	# all sessions running, then 10 s: several inferences per backend, its
	# model loaded, run state allocated, every weight page touched
	pids=""
	for _ in $(seq 600); do
		pids=$(q -c "SELECT pid FROM pg_stat_activity WHERE application_name = 'memory-bench' AND state = 'active'")
		[ "$(printf '%s\n' "$pids" | grep -c .)" -eq "$BACKENDS" ] && break
		sleep 0.1
	done
	sleep 10
	for _ in $(seq 20); do
		for pid in $pids; do
			awk -v pid="$pid" '
				/^Rss:/ {rss = $2} /^Pss:/ {pss = $2}
				/^Shared_Clean:|^Shared_Dirty:/ {shared += $2}
				/^Private_Clean:|^Private_Dirty:/ {uss += $2}
				/^Anonymous:/ {anon = $2}
				END {if (rss) print uss, anon, rss, shared, pss}' "/proc/$pid/smaps_rollup" \
				2>/dev/null >>"$DIR/samples" || true
		done
		sleep 0.5
	done
	n=$(wc -l <"$DIR/samples")
	printf '%-40s %8s %6s %6s %6s %6s %6s %7s\n' "$(basename "$model")" "$BACKENDS" \
		"$(cut -d' ' -f1 "$DIR/samples" | median | mb)" "$(cut -d' ' -f2 "$DIR/samples" | median | mb)" \
		"$(cut -d' ' -f3 "$DIR/samples" | median | mb)" "$(cut -d' ' -f4 "$DIR/samples" | median | mb)" \
		"$(cut -d' ' -f5 "$DIR/samples" | median | mb)" "$n"
	q -c "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'memory-bench'" >/dev/null
	wait 2>/dev/null || true
done
