#!/bin/bash
# scale_out_bench.sh: rows per second of osv5m_enrich on one server, and on
# a postgres_fdw table over 1 and over 2 shard servers, on this machine,
# alternated run after run, median of RUNS.
#
#   test/bench/scale_out_bench.sh [MODEL_DIR [ROWS [RUNS]]]
#       default models/full-random (test/bench/make_full_model.py), 12
#       rows, 3 runs; needs make install
#
# Three servers with osv5m preloaded and the model (ports 54820-54822,
# build/bench/scale-out):
#   single    server 0's own table, workers => 2
#   1 shard   server 0's partitioned table, one foreign partition on
#             server 1 holding every row, workers => 2
#   2 shards  the same with two foreign partitions, half the rows each on
#             servers 1 and 2, workers => 1 on each
# All three share this machine's cores, so the table shows the cost of the
# machinery (dblink start, model check, one model load per server), not
# more cores; the README derives N machines from the single-server figure.
# Rows are real-size JPEGs (640x480 to 800x533) from test/data/images.
# Prints the CPU, its FMA peak (test/bench/fma_peak.c), and per setup the
# median seconds, rows/s and the ratio to the single server.
set -eu
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
MODEL=$(cd "${1:-models/full-random}" && pwd)
ROWS=${2:-12}
RUNS=${3:-3}
BASE=$ROOT/build/bench/scale-out
PORT0=${SCALE_OUT_BENCH_PORT:-54820}
. test/pg/cluster.sh

mkdir -p "$BASE"
cc -std=gnu11 -O3 -pthread -o "$BASE/fma_peak" test/bench/fma_peak.c
echo "cpu: $(lscpu | sed -nE 's/^Model name: *//p'), $(nproc) cores; fma peak: $("$BASE/fma_peak" "$(nproc)" 1)"

base=$BASE
port0=$PORT0
. test/pg/nodes.sh
cleanup() { stop_nodes 0 1 2; }
trap cleanup EXIT
cleanup
rm -rf "$BASE"/node*
for n in 0 1 2; do
	cluster_init "$(node_dir $n)" $((PORT0 + n)) "shared_preload_libraries = 'osv5m'" \
		"osv5m.model_path = '$MODEL'" "max_worker_processes = 16" "jit = off" >/dev/null
	cluster_start "$(node_dir $n)" >/dev/null
	q $n -c 'SET client_min_messages = warning' -c 'CREATE EXTENSION osv5m CASCADE'
done
imgs="'jpeg_420_640x480.jpg', 'jpeg_progressive_800x533.jpg', 'jpeg_q30_700x466.jpg', 'jpeg_restart_blocks_640x480.jpg'"
src="SELECT i AS id, pg_read_binary_file('$ROOT/test/data/images/' || (ARRAY[$imgs])[1 + i % 4]) AS img
	 FROM generate_series(1, $ROWS) AS i"
half=$((ROWS / 2))
q 0 -c "CREATE TABLE single AS $src" -c 'ALTER TABLE single ADD PRIMARY KEY (id), ADD loc geography'
q 1 -c "CREATE TABLE all_rows AS $src" -c 'ALTER TABLE all_rows ADD PRIMARY KEY (id), ADD loc geography' \
	-c "CREATE TABLE half_rows AS SELECT * FROM ($src) s WHERE id <= $half" \
	-c 'ALTER TABLE half_rows ADD PRIMARY KEY (id), ADD loc geography'
q 2 -c "CREATE TABLE half_rows AS SELECT * FROM ($src) s WHERE id > $half" \
	-c 'ALTER TABLE half_rows ADD PRIMARY KEY (id), ADD loc geography'
q 0 -c 'CREATE EXTENSION postgres_fdw' -c 'CREATE EXTENSION dblink'
for n in 1 2; do
	q 0 -c "CREATE SERVER s$n FOREIGN DATA WRAPPER postgres_fdw
			OPTIONS (host '$(node_sock $n)', port '$((PORT0 + n))', dbname 'postgres', extensions 'osv5m, postgis')" \
		-c "CREATE USER MAPPING FOR CURRENT_USER SERVER s$n OPTIONS (user 'postgres')"
done
q 0 -c 'CREATE TABLE one_shard (id int, img bytea, loc geography) PARTITION BY RANGE (id)' \
	-c "CREATE FOREIGN TABLE one_shard_1 PARTITION OF one_shard FOR VALUES FROM (1) TO ($((ROWS + 1)))
		SERVER s1 OPTIONS (table_name 'all_rows')" \
	-c 'CREATE TABLE two_shards (id int, img bytea, loc geography) PARTITION BY RANGE (id)' \
	-c "CREATE FOREIGN TABLE two_shards_1 PARTITION OF two_shards FOR VALUES FROM (1) TO ($((half + 1)))
		SERVER s1 OPTIONS (table_name 'half_rows')" \
	-c "CREATE FOREIGN TABLE two_shards_2 PARTITION OF two_shards FOR VALUES FROM ($((half + 1))) TO ($((ROWS + 1)))
		SERVER s2 OPTIONS (table_name 'half_rows')"

# time_call TABLE WORKERS: seconds of one full run on empty targets
time_call() {
	local t=$1 w=$2 t0 t1
	q 0 -c "UPDATE $t SET loc = NULL" -c 'TRUNCATE osv5m_errors'
	for n in 1 2; do q $n -c 'TRUNCATE osv5m_errors'; done
	t0=$(date +%s.%N)
	q 0 -c 'SET client_min_messages = warning' -c "CALL osv5m_enrich('$t', 'img', 'loc', batch_size => 4, workers => $w)"
	t1=$(date +%s.%N)
	[ "$(q 0 -c "SELECT count(loc) FROM $t")" = "$ROWS" ] || { echo "bench: $t: not every row located" >&2; exit 1; }
	awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}'
}
: >"$BASE/times"
for r in $(seq "$RUNS"); do
	echo "single $(time_call single 2)" >>"$BASE/times"
	echo "one_shard $(time_call one_shard 2)" >>"$BASE/times"
	echo "two_shards $(time_call two_shards 1)" >>"$BASE/times"
done
median() { sort -n | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
base_s=$(awk '$1 == "single" {print $2}' "$BASE/times" | median)
printf '%-10s %-44s %9s %8s %8s\n' setup layout "median s" "rows/s" "vs one"
for s in single one_shard two_shards; do
	m=$(awk -v s=$s '$1 == s {print $2}' "$BASE/times" | median)
	case $s in
		single) layout="1 server, workers => 2" ;;
		one_shard) layout="coordinator + 1 shard server, workers => 2" ;;
		two_shards) layout="coordinator + 2 shard servers, workers => 1" ;;
	esac
	printf '%-10s %-44s %9.2f %8.3f %7.2fx\n' "$s" "$layout" "$m" \
		"$(awk -v a="$ROWS" -v b="$m" 'BEGIN {print a / b}')" "$(awk -v a="$base_s" -v b="$m" 'BEGIN {print a / b}')"
done
echo "($ROWS rows, $RUNS runs each, alternated; every run: $(awk '{printf "%s %.2f; ", $1, $2}' "$BASE/times"))"
