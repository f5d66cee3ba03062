#!/bin/bash
# shell-tests.sh: the tests of the extension that pg_regress cannot express,
# run by test/run against the throwaway cluster in DIR (test/pg/cluster.sh).
#
# Usage: test/pg/shell-tests.sh DIR
#
# Each test prints "ok - NAME" or "FAIL - NAME: why" (with its numbers), and
# the last line is "shell tests: N passed, N failed".  The client
# environment (PGHOST, PGPORT, PGUSER) comes from cluster_start.
#
#   postmaster_threads   the postmaster (osv5m in shared_preload_libraries)
#                        has 1 thread, even after backends ran inference
#   backend_threads      a backend starts no thread before its first call,
#                        exactly osv5m.threads - 1 compute threads beside its
#                        own when it computes, none again after
#                        osv5m.threads = 1, and its idle threads use no CPU
#                        (their utime + stime over 2 s of pg_sleep)
#   pack_cache           osv5m.pack_cache_dir gives the same results, reuses
#                        its file, and warns about a directory others may write
#   pack_cache_bf16      osv5m.precision = 'bf16' has a pack cache file of its
#                        own, written when a backend that loaded the model in
#                        fp32 first runs bf16, reused by a backend that loads
#                        it in bf16, with the results of no pack cache; an
#                        unusable directory warns once per precision
#   enrich_precision     an osv5m_enrich run records the caller's
#                        osv5m.precision, and its background workers compute
#                        in it whatever their database sets: each row equals
#                        geolocate() of its image in that precision
#   memory_growth        a backend's private memory does not grow over
#                        10,000 geolocate calls and 1,000 failing ones
#   cancel_latency       pg_cancel_backend stops an inference within 1 s
#                        (median of 3, measured on the server's clock
#                        from the signal, sent once the network runs)
#   terminate_latency    pg_terminate_backend likewise ends the backend
#   reload_on_replace    replacing or touching the model files reloads
#   server_log_clean     no crash, PANIC or assertion in the server log
#                        (test/pg/hostile_log.sh)
set -u
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
. test/pg/cluster.sh
DIR=$(cd "$1" && pwd)
DB=${OSV_TEST_DB:-postgres}

passed=0
failed=0
ok() { echo "ok - $1"; passed=$((passed + 1)); }
fail() { echo "FAIL - $1: $2"; failed=$((failed + 1)); }

# psql with the options every test uses: no psqlrc, stop at the first error
q() { psql -X -q -At -v ON_ERROR_STOP=1 -d "$DB" "$@"; }

# a field of /proc/PID/status, e.g. "Threads"
proc_status() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

# millisecond clock
now_ms() { date +%s%3N; }

GELU=$ROOT/test/models/tiny-gelu
QUICK=$ROOT/test/models/tiny-quickgelu
IMAGES=$ROOT/test/data/images
SMALL=$IMAGES/jpeg_small_50x37.jpg
MID=$IMAGES/jpeg_224x224.jpg

q -c "CREATE EXTENSION IF NOT EXISTS osv5m CASCADE" 2>/dev/null ||
	q -c "SET client_min_messages = warning; CREATE EXTENSION IF NOT EXISTS osv5m CASCADE"

# ---- postmaster_threads --------------------------------------------------
pm=$(cluster_postmaster_pid "$DIR")
q -c "SET osv5m.model_path = '$GELU'" -c "SET osv5m.threads = 2" \
	-c "SELECT ST_AsText(geolocate(pg_read_binary_file('$MID')))" >/dev/null
preload=$(q -c "SHOW shared_preload_libraries")
threads=$(proc_status "$pm" Threads)
if [ "$preload" = osv5m ] && [ "$threads" = 1 ]; then
	ok "postmaster_threads (shared_preload_libraries = $preload, Threads: $threads)"
else
	fail postmaster_threads "shared_preload_libraries = '$preload', postmaster Threads: $threads"
fi

# ---- backend_threads -------------------------------------------------------
# One session: its pid, its threads before any call, after a call with one
# thread, after a call with two, the CPU ticks its other threads used while
# it slept 2 s, and its threads after a call with one thread again.
out=$(q <<EOF
CREATE FUNCTION pg_temp.other_threads_ticks() RETURNS bigint LANGUAGE sql AS
\$\$ SELECT coalesce(sum(split_part(split_part(st, ') ', 2), ' ', 12)::bigint +
                     split_part(split_part(st, ') ', 2), ' ', 13)::bigint), 0)
   FROM (SELECT pg_read_file('/proc/self/task/' || t || '/stat') AS st
         FROM pg_ls_dir('/proc/self/task') AS t
         WHERE t::int <> pg_backend_pid()) AS s \$\$;
SELECT pg_backend_pid();
SELECT substring(pg_read_file('/proc/self/status') FROM 'Threads:\s*([0-9]+)');
SET osv5m.model_path = '$GELU';
SELECT count(geolocate(pg_read_binary_file('$MID')));
SELECT substring(pg_read_file('/proc/self/status') FROM 'Threads:\s*([0-9]+)');
SET osv5m.threads = 2;
SELECT count(geolocate(pg_read_binary_file('$MID') || ''::bytea));
SELECT substring(pg_read_file('/proc/self/status') FROM 'Threads:\s*([0-9]+)');
SELECT pg_temp.other_threads_ticks() AS before \gset
SELECT pg_sleep(2);
SELECT pg_temp.other_threads_ticks() - :before;
SET osv5m.threads = 1;
SELECT count(geolocate(pg_read_binary_file('$MID') || '\x00'::bytea));
SELECT substring(pg_read_file('/proc/self/status') FROM 'Threads:\s*([0-9]+)');
EOF
) || out=""
set -- $out
# pid, threads, 1, threads, 1, threads, idle ticks, 1, threads
if [ $# -eq 9 ] && [ "$2" = 1 ] && [ "$4" = 1 ] && [ "$6" = 2 ] && [ "$7" -le 1 ] &&
	[ "$9" = 1 ]; then
	ok "backend_threads (before: $2, after a call: $4, with osv5m.threads = 2: $6, CPU ticks of the idle thread in 2 s: $7, back to 1 thread: $9)"
else
	fail backend_threads "expected 1, 1, 2 threads, <= 1 idle tick, 1 thread; got: $(echo $out)"
fi

# ---- pack_cache ---------------------------------------------------------------
# osv5m.pack_cache_dir: a directory of the server's OS user, mode 0700.  A
# session that loads the model with it writes the packed weights there and
# returns exactly what a session without it returns; a second session reuses
# the file; a directory others may write gives a WARNING and the same result.
pack_dir=$DIR/pack-cache
rm -rf "$pack_dir"
mkdir -m 700 "$pack_dir"
[ "$(id -u)" -eq 0 ] && chown "$OSV_PGUSER_OS:" "$pack_dir"
plain=$(q -c "SET osv5m.model_path = '$QUICK'" \
	-c "SELECT ST_AsText(geolocate(pg_read_binary_file('$MID')))")
packed=$(q -c "SET osv5m.pack_cache_dir = '$pack_dir'" -c "SET osv5m.model_path = '$QUICK'" \
	-c "SELECT ST_AsText(geolocate(pg_read_binary_file('$MID')))" \
	-c "SELECT osv5m_model_info()->>'pack_cache_path'")
file1=$(ls "$pack_dir")
again=$(q -c "SET osv5m.pack_cache_dir = '$pack_dir'" -c "SET osv5m.model_path = '$QUICK'" \
	-c "SELECT ST_AsText(geolocate(pg_read_binary_file('$MID')))")
file2=$(ls -i "$pack_dir")
chmod 777 "$pack_dir"
open_dir=$(q -c "SET osv5m.pack_cache_dir = '$pack_dir'" -c "SET osv5m.model_path = '$QUICK'" \
	-c "SELECT ST_AsText(geolocate(pg_read_binary_file('$MID')))" 2>&1)
set -- $packed
if [ -n "$plain" ] && [ "$1 $2" = "$plain" ] && [ "$3" = "$pack_dir/$file1" ] &&
	[ "$again" = "$plain" ] && [ "$(echo "$file2" | wc -l)" = 1 ] &&
	echo "$open_dir" | grep -q "WARNING:  osv5m.pack_cache_dir is not used" &&
	echo "$open_dir" | grep -qF "$plain"; then
	ok "pack_cache (the same point with and without it: $plain; file $file1 reused; an open directory warned)"
else
	fail pack_cache "plain: $plain; packed: $packed; again: $again; files: $file2; open dir: $open_dir"
fi
rm -rf "$pack_dir"

# ---- pack_cache_bf16 ------------------------------------------------------------
# One backend loads the model in fp32, then runs bf16: the bf16 file is
# written at that first bf16 run.  A second backend loads the model in
# bf16: it reuses that file (same inode, no new file).  Each precision's
# points are those of a backend without a pack cache, bit for bit (EWKB).
# A directory others may write: one WARNING per precision, however many
# calls.
pack_dir=$DIR/pack-cache-bf16
rm -rf "$pack_dir"
mkdir -m 700 "$pack_dir"
[ "$(id -u)" -eq 0 ] && chown "$OSV_PGUSER_OS:" "$pack_dir"
point="encode(ST_AsEWKB(geolocate(pg_read_binary_file('$MID'))::geometry), 'hex')"
plain=$(q -c "SET osv5m.model_path = '$QUICK'" -c "SELECT $point" \
	-c "SET osv5m.precision = 'bf16'" -c "SELECT $point")
first=$(q -c "SET osv5m.pack_cache_dir = '$pack_dir'" -c "SET osv5m.model_path = '$QUICK'" \
	-c "SELECT $point" \
	-c "SELECT coalesce(osv5m_model_info()->>'pack_cache_path_bf16', 'none')" \
	-c "SET osv5m.precision = 'bf16'" -c "SELECT $point" \
	-c "SELECT osv5m_model_info()->>'pack_cache_path'" \
	-c "SELECT osv5m_model_info()->>'pack_cache_path_bf16'")
files1=$(cd "$pack_dir" && ls -i | sort)
second=$(q -c "SET osv5m.pack_cache_dir = '$pack_dir'" -c "SET osv5m.model_path = '$QUICK'" \
	-c "SET osv5m.precision = 'bf16'" -c "SELECT $point" \
	-c "SELECT osv5m_model_info()->>'pack_cache_path_bf16'" \
	-c "SELECT coalesce(osv5m_model_info()->>'pack_cache_path', 'none')")
files2=$(cd "$pack_dir" && ls -i | sort)
chmod 777 "$pack_dir"
open_dir=$(q -c "SET osv5m.pack_cache_dir = '$pack_dir'" -c "SET osv5m.model_path = '$QUICK'" \
	-c "SELECT $point" -c "SET osv5m.precision = 'bf16'" -c "SELECT $point" \
	-c "SELECT $point" -c "RESET osv5m.precision" -c "SELECT $point" 2>&1)
warnings=$(echo "$open_dir" | grep -c "WARNING:  osv5m.pack_cache_dir is not used")
set -- $plain
plain_fp32=${1:-} plain_bf16=${2:-}
set -- $first
# fp32 point, no bf16 file yet, bf16 point, the fp32 file, the bf16 file
if [ -n "$plain_fp32" ] && [ "$plain_fp32" != "$plain_bf16" ] && [ $# -eq 5 ] &&
	[ "$1" = "$plain_fp32" ] && [ "$2" = none ] && [ "$3" = "$plain_bf16" ] &&
	[ "$(dirname "$4")" = "$pack_dir" ] && [ "$(dirname "$5")" = "$pack_dir" ] && [ "$4" != "$5" ] &&
	[ "$(echo "$files1" | wc -l)" = 2 ] && [ "$files2" = "$files1" ] &&
	[ "$second" = "$(printf '%s\n%s\nnone' "$plain_bf16" "$5")" ] &&
	[ "$warnings" = 2 ] && echo "$open_dir" | grep -q "for osv5m.precision fp32" &&
	echo "$open_dir" | grep -q "for osv5m.precision bf16"; then
	ok "pack_cache_bf16 (files $(basename "$4") and $(basename "$5"); the bf16 one written at the first bf16 run, reused by a backend that loaded in bf16; points as without it; an open directory warned once per precision)"
else
	fail pack_cache_bf16 "plain: $plain; first backend: $(echo $first); files: $(echo $files1); second backend: $(echo $second); files after: $(echo $files2); warnings: $warnings: $open_dir"
fi
rm -rf "$pack_dir"

# ---- enrich_precision ------------------------------------------------------------
# Two runs with 2 background workers and several images per run, on a
# table whose rows are test images twice over: one with the session in
# bf16 while the database's setting (which the workers start with) is
# fp32, one the other way round.  Each run records its precision, both
# workers do rows, and every row equals geolocate() of its image in the
# run's precision, bit for bit; the bf16 run's rows are not all fp32's.
out=$(q 2>&1 <<EOF
SET client_min_messages = warning;
SET osv5m.model_path = '$GELU';
CREATE TABLE enrich_precision (id int PRIMARY KEY, img bytea, loc geography);
INSERT INTO enrich_precision
SELECT row_number() OVER (), pg_read_binary_file('$IMAGES/' || f)
FROM pg_ls_dir('$IMAGES') AS f, generate_series(1, 2)
WHERE f ~ '^(jpeg_[0-9]|jpeg_q30|jpeg_rgb|png_rgb8|png_gray8)';
CREATE FUNCTION pg_temp.check_run(want text) RETURNS text LANGUAGE plpgsql AS \$\$
DECLARE
	job bigint;
	r text;
BEGIN
	SELECT max(job_id) INTO job FROM osv5m_jobs WHERE tbl = 'enrich_precision'::regclass;
	PERFORM set_config('osv5m.precision', want, false);
	SELECT concat_ws(' ', (SELECT precision FROM osv5m_jobs WHERE job_id = job),
			(SELECT count(*) FROM osv5m_job_workers w WHERE w.job_id = job AND w.worker > 0 AND w.rows_done > 0),
			count(*), count(loc),
			count(*) FILTER (WHERE ST_AsEWKB(loc::geometry) = ST_AsEWKB(geolocate(img)::geometry)))
	  INTO r FROM enrich_precision;
	PERFORM set_config('osv5m.precision', 'fp32', false);
	RETURN r || ' ' || (SELECT count(*) FILTER (WHERE ST_AsEWKB(loc::geometry) <> ST_AsEWKB(geolocate(img)::geometry))
						FROM enrich_precision);
END \$\$;
ALTER DATABASE $DB SET osv5m.precision = 'fp32';
SET osv5m.precision = 'bf16';
CALL osv5m_enrich('enrich_precision', 'img', 'loc', batch_size => 4, workers => 2);
SELECT pg_temp.check_run('bf16');
UPDATE enrich_precision SET loc = NULL;
ALTER DATABASE $DB SET osv5m.precision = 'bf16';
SET osv5m.precision = 'fp32';
CALL osv5m_enrich('enrich_precision', 'img', 'loc', batch_size => 4, workers => 2);
SELECT pg_temp.check_run('fp32');
ALTER DATABASE $DB RESET osv5m.precision;
DROP TABLE enrich_precision;
EOF
)
set -- $out
# per run: precision, workers that did rows, rows, located, equal in the
# run's precision, differing from fp32
if [ $# -eq 12 ] && [ "$1" = bf16 ] && [ "$2" = 2 ] && [ "$3" -ge 20 ] && [ "$4" = "$3" ] &&
	[ "$5" = "$3" ] && [ "$6" -gt 0 ] &&
	[ "$7" = fp32 ] && [ "$8" = 2 ] && [ "$9" = "$3" ] && [ "${10}" = "$3" ] &&
	[ "${11}" = "$3" ] && [ "${12}" = 0 ]; then
	ok "enrich_precision (bf16 run with the database in fp32: $5 of $3 rows equal geolocate() in bf16, $6 differ from fp32; fp32 run with the database in bf16: ${11} of $9 equal geolocate() in fp32; both workers did rows each time)"
else
	fail enrich_precision "bf16 run: precision, workers with rows, rows, located, equal, differing from fp32; then the fp32 run: $(echo $out)"
	q -c "ALTER DATABASE $DB RESET osv5m.precision" -c "DROP TABLE IF EXISTS enrich_precision" >/dev/null 2>&1
fi

# ---- memory_growth ---------------------------------------------------------
# Private anonymous memory of one backend (smaps_rollup, read by the backend
# itself) after a warm-up, then after 10,000 calls and 1,000 failing calls.
# Bound: 2 MB, i.e. 200 bytes a call; a leak of the smallest decoded image
# (50 x 37 RGB) alone would be 55 MB.  JIT is off in this session: the high
# COST of the inference functions makes PostgreSQL JIT-compile queries over
# many rows, and PostgreSQL 15's LLVM context grows by some 300 kB per
# compiled query whatever the query calls (fixed in PostgreSQL 17), which
# would hide what this test is about.
out=$(q <<EOF
SET jit = off;
SET osv5m.model_path = '$QUICK';
CREATE TEMP TABLE one AS SELECT pg_read_binary_file('$SMALL') AS img;
CREATE TEMP TABLE bad AS SELECT substring(img FROM 1 FOR length(img) / 2) AS img FROM one;
ANALYZE one;
ANALYZE bad;
CREATE FUNCTION pg_temp.anon_kb() RETURNS bigint LANGUAGE sql AS
\$\$ SELECT substring(pg_read_file('/proc/self/smaps_rollup') FROM 'Anonymous:\s*([0-9]+) kB')::bigint \$\$;
CREATE FUNCTION pg_temp.failures(n int) RETURNS int LANGUAGE plpgsql AS \$\$
DECLARE
	failed int := 0;
BEGIN
	FOR i IN 1..n LOOP
		BEGIN
			PERFORM geolocate(img) FROM bad;
		EXCEPTION WHEN invalid_binary_representation THEN
			failed := failed + 1;
		END;
	END LOOP;
	RETURN failed;
END \$\$;
SELECT count(geolocate(img)) FROM one, generate_series(1, 2000);
SELECT pg_temp.failures(200);
SELECT pg_temp.anon_kb();
SELECT count(geolocate(img)) FROM one, generate_series(1, 10000);
SELECT pg_temp.failures(1000);
SELECT pg_temp.anon_kb();
EOF
) || out=""
set -- $out
if [ $# -eq 6 ] && [ "$3" -gt 0 ] && [ "$4" = 10000 ] && [ "$5" = 1000 ] &&
	[ $(($6 - $3)) -lt 2048 ]; then
	ok "memory_growth (anonymous memory $3 kB -> $6 kB over 10,000 calls and 1,000 errors)"
else
	fail memory_growth "expected growth < 2048 kB; got: $(echo $out)"
fi

# ---- cancel_latency / terminate_latency -------------------------------------
# A model whose single inference takes seconds (make-slow-model.pl), in a
# directory the server can read.
SLOW=$DIR/slow-model
if [ ! -f "$SLOW/model.safetensors" ]; then
	as_pguser mkdir -p "$SLOW"
	as_pguser perl test/pg/make-slow-model.pl "$SLOW" "$ROOT/test/models/tiny-f16/quadtree_10_1000.csv" 40 ||
		fail make_slow_model "test/pg/make-slow-model.pl failed"
fi

# Time one whole inference (ms), loading the model first.
full_ms=$(q <<EOF
SET osv5m.model_path = '$SLOW';
SELECT osv5m_model_info() IS NOT NULL;
SELECT round(1000 * extract(epoch FROM clock_timestamp() - now()))
FROM (SELECT geolocate(pg_read_binary_file('$MID'))) AS s;
EOF
) || full_ms=""
full_ms=$(echo "$full_ms" | tail -n 1)

# CPU time (clock ticks) process PID has used: utime + stime.
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null; }
TICKS=$(getconf CLK_TCK 2>/dev/null || echo 100)

# One measurement: start an inference in the background, wait until it is
# really inside the forward pass, signal it with pg_cancel_backend or
# pg_terminate_backend, and print the milliseconds from the signal to the
# end of the call, both read on the server's clock (so that starting psql
# on a busy machine does not count):
#   - "inside": the calling function renames its session (application_name,
#     visible at once in pg_stat_activity) just before geolocate(), and the
#     backend has then used another 0.1 s of CPU (/proc/PID/stat): the image
#     is decoded and the network is running;
#   - cancel: the function catches query_canceled and returns the time it
#     did; the signal's time is clock_timestamp() just before
#     pg_cancel_backend;
#   - terminate: pg_terminate_backend(pid, timeout) returns once the backend
#     has exited, with clock_timestamp() read before and after (it checks
#     every 100 ms, so this can overstate by up to 100 ms).
# Prints the milliseconds, or "error: why".  Every wait has a 60 s deadline.
interrupt_once() {
	local how=$1 try=$2 app=osv_$1_$$_$2 out=$DIR/$1.$2.out
	local pid="" c0 c r t0 t1 end client
	PGAPPNAME=$app q >"$out" 2>&1 <<EOF &
SET osv5m.model_path = '$SLOW';
SELECT osv5m_model_info() IS NOT NULL;
CREATE FUNCTION pg_temp.interrupted(img bytea) RETURNS text LANGUAGE plpgsql AS \$\$
BEGIN
	PERFORM set_config('application_name', '${app}_inside', false);
	PERFORM geolocate(img);
	RETURN 'finished';
EXCEPTION WHEN query_canceled THEN
	RETURN 'canceled at ' || extract(epoch FROM clock_timestamp());
END \$\$;
SELECT pg_temp.interrupted(pg_read_binary_file('$MID'));
EOF
	client=$!
	end=$((SECONDS + 60))
	while [ $SECONDS -lt $end ] && kill -0 $client 2>/dev/null; do
		pid=$(q -c "SELECT pid FROM pg_stat_activity WHERE application_name = '${app}_inside' AND state = 'active'")
		[ -n "$pid" ] && break
		sleep 0.02
	done
	if [ -z "$pid" ]; then
		kill $client 2>/dev/null; wait $client
		echo "error: the inference did not start within 60 s: $(tail -n 3 "$out")"
		return
	fi
	c0=$(cpu_ticks "$pid")
	c=$c0
	while [ $SECONDS -lt $end ] && kill -0 $client 2>/dev/null; do
		c=$(cpu_ticks "$pid")
		[ "${c:-0}" -ge $((c0 + TICKS / 10)) ] && break
		sleep 0.02
	done
	if [ "${c:-0}" -lt $((c0 + TICKS / 10)) ]; then
		wait $client
		echo "error: the inference ran only $((c - c0)) ticks of CPU before it ended or 60 s passed: $(tail -n 3 "$out")"
		return
	fi
	if [ "$how" = pg_cancel_backend ]; then
		t0=$(q -F ' ' -c "SELECT extract(epoch FROM clock_timestamp()), pg_cancel_backend($pid)")
		wait $client
		t1=$(sed -n 's/^canceled at //p' "$out")
		if [ -z "$t1" ] || [ "${t0#* }" != t ]; then
			echo "error: not canceled (pg_cancel_backend: '$t0'): $(tail -n 3 "$out")"
			return
		fi
		t0=${t0%% *}
	else
		r=$(q -F ' ' -c "SELECT extract(epoch FROM clock_timestamp()), pg_terminate_backend($pid, 60000),
			extract(epoch FROM clock_timestamp())")
		wait $client
		set -- $r
		if [ $# -ne 3 ] || [ "$2" != t ] ||
			! grep -q "terminating connection due to administrator command" "$out"; then
			echo "error: not terminated (pg_terminate_backend: '$r'): $(tail -n 3 "$out")"
			return
		fi
		t0=$1 t1=$3
	fi
	awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%d\n", (b - a) * 1000 + 0.5 }'
}

# Three measurements; passes when each interrupted the inference and their
# median is under the bound.  Why three and the median: a measurement is
# the extension's reaction plus the scheduler's, and on a machine where
# other processes compete for the cores the signalled backend may wait for
# a CPU before it runs again; that is not what the test is about.  The
# median needs two of the three within the bound, so one try that was
# unlucky with the scheduler does not decide, while an abort that comes too
# late (which every try would show) still fails.  Prints "MEDIAN ms (tries:
# A, B, C ms)" or "error: ...".
interrupt_latency() {
	local how=$1 i r all="" err=""
	for i in 1 2 3; do
		r=$(interrupt_once "$how" "$i")
		case $r in
			error:*) err="$err try $i: ${r#error: };" ;;
			*) all="$all $r" ;;
		esac
	done
	if [ -n "$err" ]; then
		echo "error:$err"
		return
	fi
	echo "$(printf '%s\n' $all | sort -n | sed -n 2p) ms (tries: $(echo $all | sed 's/ /, /g') ms)"
}

r=$(interrupt_latency pg_cancel_backend)
ms=${r%% *}
if [ "${r#error}" = "$r" ] && [ "$ms" -lt 1000 ]; then
	ok "cancel_latency (median ${r} from pg_cancel_backend to the end of the call; a whole inference takes ${full_ms:-?} ms)"
else
	fail cancel_latency "median ${r} from pg_cancel_backend to the end of the call, bound 1000 ms (whole inference ${full_ms:-?} ms)"
fi
r=$(interrupt_latency pg_terminate_backend)
ms=${r%% *}
if [ "${r#error}" = "$r" ] && [ "$ms" -lt 1000 ]; then
	ok "terminate_latency (median ${r} from pg_terminate_backend to the backend's exit)"
else
	fail terminate_latency "median ${r} from pg_terminate_backend to the backend's exit, bound 1000 ms"
fi
if [ -n "$full_ms" ] && [ "$full_ms" -lt 1000 ]; then
	echo "note: the slow model ran in ${full_ms} ms on this machine; the cancel tests above may not have caught it mid-inference"
fi

# ---- reload_on_replace ---------------------------------------------------------
# One session keeps its backend while the model directory changes under it:
# the model is replaced by another (rename, as a deploy would), then only
# touched (same bytes, new mtime).
COPY=$DIR/model-copy
as_pguser rm -rf "$COPY"
as_pguser mkdir -p "$COPY"
as_pguser cp "$GELU"/model.safetensors "$GELU"/config.json "$GELU"/quadtree_10_1000.csv "$COPY"/
out=$(q <<EOF
SET osv5m.model_path = '$COPY';
SELECT osv5m_model_info()->>'num_cells';
SELECT osv5m_model_info()->>'loaded_at' AS first \gset
\! cp $QUICK/model.safetensors $COPY/.new.safetensors && cp $QUICK/config.json $COPY/.new.json && cp $QUICK/quadtree_10_1000.csv $COPY/.new.csv && mv $COPY/.new.safetensors $COPY/model.safetensors && mv $COPY/.new.json $COPY/config.json && mv $COPY/.new.csv $COPY/quadtree_10_1000.csv
SELECT osv5m_model_info()->>'num_cells';
SELECT osv5m_model_info()->>'loaded_at' AS second \gset
SELECT osv5m_model_info()->>'loaded_at' = :'second';
\! sleep 0.01; touch $COPY/quadtree_10_1000.csv
SELECT osv5m_model_info()->>'loaded_at' <> :'second';
EOF
) || out=""
set -- $out
if [ "$*" = "100 37 t t" ]; then
	ok "reload_on_replace (100 cells, replaced: 37 cells; unchanged: kept; touched: reloaded)"
else
	fail reload_on_replace "expected '100 37 t t'; got: '$(echo $out)'"
fi

# ---- server_log_clean -------------------------------------------------------
# test/pg/hostile_log.sh knows what a crashed or aborted backend leaves in
# the log; this checks the whole log of the run (pg_regress included).
log=$DIR/server.log
if out=$(sh test/pg/hostile_log.sh "$log" 2>&1) && [ -s "$log" ]; then
	ok "server_log_clean ($(wc -l <"$log") lines, no crash)"
else
	fail server_log_clean "$out"
fi

echo "shell tests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
