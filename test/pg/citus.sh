#!/bin/bash
# citus.sh: osv5m_enrich on a Citus distributed table, against three real
# servers on this machine: a Citus coordinator (port 54810) and two workers
# (54811, 54812), each with shared_preload_libraries = 'citus,osv5m' and
# the tiny-gelu test model.  Runs only where Citus is installed for
# PostgreSQL 15 (it is not packaged in Debian: build it from its source,
# see README, Scaling out); elsewhere it says plainly that it was skipped.
#
# The table "photos" is distributed by id over 4 shards (2 per worker) and
# holds the test images 3 times and junk rows.  Checks:
#
#   - CREATE EXTENSION osv5m CASCADE and ALTER EXTENSION osv5m UPDATE on the
#     coordinator reach the workers;
#     SELECT geolocate(img) and geolocate_topk run on the workers (EXPLAIN);
#   - refusals with a hint: a reference table, a table whose shards have 2
#     placements, a model that differs on one worker in one weight (the
#     weights' SHA-256), nothing written;
#   - CALL osv5m_enrich runs on both workers at once (pg_stat_activity
#     sampled on each), osv5m_citus_progress shows both running;
#   - a worker stopped mid-job (pg_ctl stop -m immediate): the job fails
#     naming that node, the other worker's shards are done,
#     osv5m_citus_progress shows the node unreachable; after a restart the
#     rerun (with 2 background workers per node) completes;
#   - every row's location equals geolocate() of its own image computed
#     beforehand on the coordinator, every junk row is in its worker's
#     osv5m_errors exactly once (osv5m_citus_errors), nothing was written
#     twice (a trigger log on each shard), and retry_errors retries them;
#   - a cancel of the coordinator's CALL, and its session terminated: the
#     runs on both workers stop, the job shows interrupted, a rerun
#     completes with every row written once.
#
# Nothing depends on timing: a slow trigger on the shards makes the runs
# last, and every wait polls what it waits for with a deadline of
# $CITUS_DEADLINE seconds (default 180).
#
#   test/pg/citus.sh        (after make install; about a minute)
#
# Directories under build/citus ($CITUS_DIR), ports $CITUS_PORT (54810) to
# +2.  Prints "ok N - ..." / "not ok N - ..." and ends with
# "citus: N passed, N failed".
set -u
cd "$(dirname "$0")/../.."
root=$(pwd)
source test/pg/cluster.sh

if [ ! -f "$(pg_config --sharedir)/extension/citus.control" ]; then
	echo "citus: SKIPPED: Citus is not installed for PostgreSQL 15 (not packaged in Debian; README, Scaling out)"
	echo "citus: 0 passed, 0 failed"
	exit 0
fi

base=${CITUS_DIR:-$root/build/citus}
port0=${CITUS_PORT:-54810}
deadline=${CITUS_DEADLINE:-180}
model=$root/test/models/tiny-gelu
images=$root/test/data/images
passed=0
failed=0

source test/pg/nodes.sh
cleanup() {
	[ -n "${call_pid:-}" ] && kill "$call_pid" 2>/dev/null
	stop_nodes 0 1 2
}
trap cleanup EXIT

# ---- three servers ----------------------------------------------------------------
stop_nodes 0 1 2	# a previous run's
rm -rf "$base"
mkdir -p "$base"
for n in 0 1 2; do
	cluster_init "$(node_dir $n)" $((port0 + n)) \
		"shared_preload_libraries = 'citus,osv5m'" "osv5m.model_path = '$model'" \
		"max_worker_processes = 16" "max_connections = 60" >/dev/null || exit 1
	cluster_start "$(node_dir $n)" >/dev/null || exit 1
	q $n -c 'CREATE EXTENSION citus' || exit 1
done
q 0 -c "SELECT citus_set_coordinator_host('$(node_sock 0)', $port0)" \
	-c "SELECT citus_add_node('$(node_sock 1)', $((port0 + 1)))" \
	-c "SELECT citus_add_node('$(node_sock 2)', $((port0 + 2)))" >/dev/null || exit 1
node1="$(node_sock 1):$((port0 + 1))"
node2="$(node_sock 2):$((port0 + 2))"
# installed at 0.2.0 and updated, as a user upgrading does: Citus runs
# both statements on the workers too
q 0 -c 'SET client_min_messages = warning' -c "CREATE EXTENSION osv5m VERSION '0.2.0' CASCADE" \
	-c 'ALTER EXTENSION osv5m UPDATE' || exit 1
check "the extension reached both workers, updated" \
	"$(q 1 -c "SELECT extversion FROM pg_extension WHERE extname = 'osv5m'") $(q 2 -c "SELECT extversion FROM pg_extension WHERE extname = 'osv5m'")" \
	"$(q 0 -c "SELECT extversion || ' ' || extversion FROM pg_extension WHERE extname = 'osv5m'")"

# The source rows, with each image's location computed here, before
# distributing: the independent answer every enriched row must match.
q 0 -c "CREATE TABLE src (id int PRIMARY KEY, name text, img bytea, expected geography)" \
	-c "INSERT INTO src (id, name, img)
		SELECT 100 * c + row_number() OVER (PARTITION BY c ORDER BY f), f, pg_read_binary_file('$images/' || f)
		FROM pg_ls_dir('$images') AS f, generate_series(1, 3) AS c" \
	-c "INSERT INTO src (id, name, img) VALUES
		(901, 'junk', 'not an image'), (902, 'junk', substring(pg_read_binary_file('$images/jpeg_420_640x480.jpg') FOR 300)),
		(903, 'junk', '\\x89504e470d0a1a0a'), (904, 'junk', 'still not an image'), (905, 'junk', NULL)" \
	-c "SET client_min_messages = error" -c "CREATE FUNCTION pg_temp.try_geolocate(b bytea) RETURNS geography LANGUAGE plpgsql AS \$\$
		BEGIN RETURN geolocate(b); EXCEPTION WHEN OTHERS THEN RETURN NULL; END \$\$" \
	-c "UPDATE src SET expected = pg_temp.try_geolocate(img) WHERE img IS NOT NULL" || exit 1
good=$(q 0 -c 'SELECT count(expected) FROM src')
bad=$(q 0 -c 'SELECT count(*) FROM src WHERE img IS NOT NULL AND expected IS NULL')
q 0 -c "CREATE TABLE photos (id int PRIMARY KEY, name text, img bytea, loc geography)" \
	-c "SELECT create_distributed_table('photos', 'id', shard_count => 4)" \
	-c "INSERT INTO photos (id, name, img) SELECT id, name, img FROM src" >/dev/null || exit 1
check "4 shards, 2 on each worker" \
	"$(q 0 -c "SELECT string_agg(nodeport || ':' || n, ' ' ORDER BY nodeport) FROM
				(SELECT nodeport, count(*) n FROM citus_shards WHERE table_name = 'photos'::regclass GROUP BY 1) s")" \
	"$((port0 + 1)):2 $((port0 + 2)):2"

check "SELECT geolocate(img) runs on the workers (EXPLAIN)" \
	"$(q 0 -c "EXPLAIN (VERBOSE, COSTS OFF) SELECT id, geolocate(img) FROM photos" |
		grep -c 'Query: SELECT id, .*osv5m_geolocate_point(img).* FROM public.photos_[0-9]* photos')" 1
check "geolocate_topk in a lateral join runs on the workers (EXPLAIN)" \
	"$(q 0 -c "EXPLAIN (VERBOSE, COSTS OFF) SELECT p.id, t.cell FROM photos p CROSS JOIN LATERAL geolocate_topk(p.img, 3) t" |
		grep -c 'Query: .*FROM (public.photos_[0-9]* p CROSS JOIN LATERAL public.geolocate_topk(p.img, 3)')" 1

# On each worker: a log of the writes to its shards, and a trigger that
# can make them slow.
for n in 1 2; do
	# (Citus refuses DDL on a worker unless it is told not to propagate it)
	q $n -c 'SET citus.enable_ddl_propagation = off' \
		-c 'CREATE TABLE writes (shard text, id int, at timestamptz DEFAULT clock_timestamp())' \
		-c 'CREATE TABLE slow (secs float8 NOT NULL)' -c 'INSERT INTO slow VALUES (0)' \
		-c "CREATE FUNCTION log_write() RETURNS trigger LANGUAGE plpgsql AS \$\$
			BEGIN PERFORM pg_sleep((SELECT secs FROM public.slow));
			INSERT INTO public.writes (shard, id) VALUES (TG_TABLE_NAME, NEW.id); RETURN NEW; END \$\$" || exit 1
	for shard in $(q 0 -c "SELECT shard_name FROM citus_shards WHERE table_name = 'photos'::regclass AND nodeport = $((port0 + n))"); do
		q $n -c 'SET citus.enable_ddl_propagation = off' -c "CREATE TRIGGER log_write BEFORE UPDATE OF loc ON $shard FOR EACH ROW WHEN (NEW.loc IS NOT NULL) EXECUTE FUNCTION log_write()" || exit 1
	done
done

# ---- refusals ------------------------------------------------------------------------
q 0 -c "CREATE TABLE ref_photos (id int PRIMARY KEY, img bytea, loc geography)" \
	-c "SELECT create_reference_table('ref_photos')" >/dev/null
out=$(q 0 -c "CALL osv5m_enrich('ref_photos', 'img', 'loc')" 2>&1)
check "a reference table: refused with a hint" \
	"$(printf '%s\n' "$out" | grep -c -e 'does not support this Citus table: public.ref_photos is a reference table' -e 'HINT:  Its rows are on every node')" 2
q 0 -c "CREATE TABLE twice (id int PRIMARY KEY, img bytea, loc geography)" \
	-c "SET citus.shard_replication_factor = 2" -c "SELECT create_distributed_table('twice', 'id', shard_count => 2)" >/dev/null
out=$(q 0 -c "CALL osv5m_enrich('twice', 'img', 'loc')" 2>&1)
check "shards with 2 placements: refused with a hint" \
	"$(printf '%s\n' "$out" | grep -c -e 'does not support this Citus table: shard [0-9]* of public.twice has 2 placements' -e 'HINT:  Writing one placement would make the copies differ')" 2
variant=$base/gelu-variant
cp -r "$model" "$variant"
python3 -c '
import sys
with open(sys.argv[1] + "/model.safetensors", "r+b") as f:
    f.seek(-2, 2)
    b = f.read(1)[0]
    f.seek(-2, 2)
    f.write(bytes([b ^ 1]))
' "$variant"
chmod -R a+rX "$variant"
q 2 -c "ALTER SYSTEM SET osv5m.model_path = '$variant'" -c 'SELECT pg_reload_conf()' >/dev/null
wait_for "worker 2 takes the variant" 2 'SHOW osv5m.model_path' "$variant"
out=$(q 0 -c "CALL osv5m_enrich('photos', 'img', 'loc')" 2>&1)
check "weights that differ in one value: refused, naming the node" \
	"$(printf '%s\n' "$out" | grep -c "the model differs on node(s) $node2\$")" 1
check "weights that differ in one value: nothing written" \
	"$(q 0 -c 'SELECT count(*) FROM photos WHERE loc IS NOT NULL')" 0
q 2 -c 'ALTER SYSTEM RESET osv5m.model_path' -c 'SELECT pg_reload_conf()' >/dev/null
wait_for "worker 2 takes the test model back" 2 'SHOW osv5m.model_path' "$model"

# ---- the job, a worker stopped in the middle ---------------------------------------
for n in 1 2; do q $n -c 'UPDATE slow SET secs = 0.3'; done
q 0 -c "CALL osv5m_enrich('photos', 'img', 'loc', batch_size => 4)" >"$base/call1.out" 2>&1 &
call_pid=$!
busy_sql="SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'CALL %osv5m_enrich_local_shards(%'"
both=no
end=$((SECONDS + deadline))
while [ $SECONDS -lt $end ]; do
	a=$(q 1 -c "$busy_sql" 2>/dev/null)
	b=$(q 2 -c "$busy_sql" 2>/dev/null)
	if [ "$a" = 1 ] && [ "$b" = 1 ]; then
		both=yes
		break
	fi
	sleep 0.1
done
check "both workers run osv5m_enrich at once" "$both" yes
wait_for "the coordinator sees both workers running" 0 \
	"SELECT string_agg(DISTINCT split_part(node, ':', 2) || ':' || status, ' ') FROM osv5m_citus_progress('photos') WHERE status = 'running'" \
	"$((port0 + 1)):running $((port0 + 2)):running" && check "the coordinator sees both workers running" ok ok
wait_for "worker 1 committed batches" 1 'SELECT count(*) >= 4 FROM writes' t
as_pguser "$PG_BINDIR/pg_ctl" -D "$(node_dir 1)/data" -m immediate -w stop >/dev/null
end=$((SECONDS + deadline))
while kill -0 "$call_pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.2; done
wait "$call_pid"
rc=$?
call_pid=
check "the job fails when a worker is lost" "$([ "$rc" -ne 0 ] && echo failed)" failed
check "its error names the node" \
	"$(grep -c "ERROR:  osv5m_enrich job [0-9]*: 1 Citus node(s) failed: node $node1" "$base/call1.out")" 1
check "its hint says to run it again" \
	"$(grep -c 'HINT:  The other nodes finished their shards' "$base/call1.out")" 1
check "the job's nodes" \
	"$(q 0 -c "SELECT string_agg(split_part(server, ':', 2) || ':' || status, ' ' ORDER BY server) FROM osv5m_job_remotes
				WHERE job_id = (SELECT max(job_id) FROM osv5m_jobs)")" "$((port0 + 1)):failed $((port0 + 2)):done"
check "worker 2 is done meanwhile" \
	"$(q 2 -c "SELECT count(*) FROM writes") $(q 2 -c "SELECT count(*) FROM osv5m_errors")" \
	"$(q 0 -c "SELECT count(*) FILTER (WHERE s.expected IS NOT NULL) || ' ' || count(*) FILTER (WHERE s.expected IS NULL AND s.img IS NOT NULL)
				FROM src s JOIN citus_shards c ON c.shardid = get_shard_id_for_distribution_column('photos', s.id)
				WHERE c.nodeport = $((port0 + 2))")"
check "a stopped worker shows as unreachable" \
	"$(q 0 -c "SELECT string_agg(DISTINCT split_part(node, ':', 2) || ':' || status, ' ') FROM osv5m_citus_progress('photos')" 2>/dev/null)" \
	"$((port0 + 1)):unreachable $((port0 + 2)):done"

# ---- restarted, run again ------------------------------------------------------------
cluster_start "$(node_dir 1)" >/dev/null || exit 1
for n in 1 2; do q $n -c 'UPDATE slow SET secs = 0'; done
n1_good=$(q 0 -c "SELECT count(*) FROM src s JOIN citus_shards c ON c.shardid = get_shard_id_for_distribution_column('photos', s.id)
				 WHERE c.nodeport = $((port0 + 1)) AND s.expected IS NOT NULL")
check "worker 1 was stopped before its end" "$(q 1 -c "SELECT count(*) < $n1_good FROM writes")" t
q 0 -c "CALL osv5m_enrich('photos', 'img', 'loc', batch_size => 4, workers => 2)" >"$base/call2.out" 2>&1
check "the rerun completes" "$?" 0
q 0 -c "CREATE TABLE got AS SELECT id, loc FROM photos" >/dev/null
check "every photo located as geolocate() of its own image" \
	"$(q 0 -c 'SELECT count(*) FILTER (WHERE ST_DWithin(g.loc::geometry, s.expected::geometry, 1e-4))
				|| $$ of $$ || count(*) FROM got g JOIN src s USING (id) WHERE s.expected IS NOT NULL')" \
	"$good of $good"
check "no junk row located" "$(q 0 -c "SELECT count(*) FROM got g JOIN src s USING (id) WHERE s.name = 'junk' AND g.loc IS NOT NULL")" 0
check "junk rows, each once in its worker's osv5m_errors" \
	"$(q 0 -c "SELECT string_agg(row_key || 'x' || n, ' ' ORDER BY row_key) FROM
				(SELECT row_key, count(*) n FROM osv5m_citus_errors('photos') GROUP BY 1) e")" \
	"901x1 902x1 903x1 904x1"
check "every photo written exactly once" \
	"$(($(q 1 -c 'SELECT count(*) FROM writes') + $(q 2 -c 'SELECT count(*) FROM writes'))) writes, $(($(q 1 -c 'SELECT count(DISTINCT id) FROM writes') + $(q 2 -c 'SELECT count(DISTINCT id) FROM writes'))) rows" \
	"$good writes, $good rows"
check "the coordinator sees every shard done" \
	"$(q 0 -c "SELECT count(*) || ' ' || string_agg(DISTINCT status || ':' || rows_left, ' ') FROM osv5m_citus_progress('photos')")" \
	"4 done:0"
check "the last job is done on both workers" \
	"$(q 0 -c "SELECT j.status || ' ' || string_agg(split_part(r.server, ':', 2) || ':' || r.status, ' ' ORDER BY r.server)
				FROM osv5m_jobs j JOIN osv5m_job_remotes r USING (job_id)
				WHERE j.job_id = (SELECT max(job_id) FROM osv5m_jobs) GROUP BY j.status")" \
	"done $((port0 + 1)):done $((port0 + 2)):done"
check "the background workers on worker 1 wrote its rows left" \
	"$(q 1 -c "SELECT count(*) > 0 FROM osv5m_job_workers WHERE worker > 0 AND rows_done > 0")" t

# ---- retrying the errors -----------------------------------------------------------------
q 0 -c "CALL osv5m_enrich('photos', 'img', 'loc', retry_errors => true)" >"$base/call3.out" 2>&1
check "retry_errors: tried again, recorded again once each" \
	"$(q 0 -c "SELECT string_agg(row_key || 'x' || n, ' ' ORDER BY row_key) FROM
				(SELECT row_key, count(*) n FROM osv5m_citus_errors('photos') GROUP BY 1) e") $(grep -c 'the Citus nodes are done: 0 rows done, 4 failed' "$base/call3.out")" \
	"901x1 902x1 903x1 904x1 1"

# ---- the coordinator's call cancelled, and its session killed ---------------------------
# start_slow_job NAME: all locations cleared, the shards' writes slow, the
# job started in the background as application NAME, both workers busy
start_slow_job() {
	q 0 -c 'UPDATE photos SET loc = NULL' >/dev/null
	for n in 1 2; do q $n -c 'TRUNCATE writes' -c 'UPDATE slow SET secs = 0.3'; done
	q 0 -c "SET application_name = '$1'" -c "CALL osv5m_enrich('photos', 'img', 'loc', batch_size => 4)" \
		>"$base/$1.out" 2>&1 &
	call_pid=$!
	wait_for "both workers busy ($1)" 0 \
		"SELECT count(*) FROM osv5m_citus_progress('photos') WHERE status = 'running'" 2
}
# stopped_then_rerun WHY: no run left on the workers; a rerun completes
# with every photo located and written once
stopped_then_rerun() {
	wait_for "the workers stop ($1)" 0 \
		"SELECT string_agg(r.result, ' ') FROM run_command_on_workers(
			\$\$SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'CALL %osv5m_enrich_local_shards(%'\$\$) r" \
		"0 0" && check "the workers stop ($1)" ok ok
	for n in 1 2; do q $n -c 'UPDATE slow SET secs = 0'; done
	q 0 -c "CALL osv5m_enrich('photos', 'img', 'loc')" >"$base/rerun-$1.out" 2>&1
	check "after the $1, a rerun completes" "$?" 0
	q 0 -c 'DROP TABLE got' -c 'CREATE TABLE got AS SELECT id, loc FROM photos' >/dev/null
	check "after the $1: every photo located, each written once" \
		"$(q 0 -c 'SELECT count(*) FILTER (WHERE ST_DWithin(g.loc::geometry, s.expected::geometry, 1e-4))
					FROM got g JOIN src s USING (id) WHERE s.expected IS NOT NULL') $(($(q 1 -c 'SELECT count(*) FROM writes') + $(q 2 -c 'SELECT count(*) FROM writes')))" \
		"$good $good"
}

start_slow_job citus-cancel
wait_for "worker 2 committed batches before the cancel" 2 'SELECT count(*) >= 4 FROM writes' t
q 0 -c "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'citus-cancel'" >/dev/null
end=$((SECONDS + deadline))
while kill -0 "$call_pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.2; done
wait "$call_pid"
call_pid=
check "a cancel on the coordinator ends the call" \
	"$(grep -c 'ERROR:  canceling statement due to user request' "$base/citus-cancel.out")" 1
check "the cancelled job and its nodes" \
	"$(q 0 -c "SELECT j.status || ' ' || string_agg(r.status, ' ' ORDER BY r.server)
				FROM osv5m_jobs j JOIN osv5m_job_remotes r USING (job_id)
				WHERE j.job_id = (SELECT max(job_id) FROM osv5m_jobs) GROUP BY j.status")" \
	"interrupted cancelled cancelled"
stopped_then_rerun cancel

start_slow_job citus-kill
q 0 -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'citus-kill'" >/dev/null
wait "$call_pid"
call_pid=
# (once the killed backend has left pg_stat_activity)
wait_for "the killed session's job shows as interrupted" 0 \
	"SELECT status FROM osv5m_progress WHERE job_id = (SELECT max(job_id) FROM osv5m_jobs)" interrupted &&
	check "the killed session's job shows as interrupted" ok ok
stopped_then_rerun kill

echo "citus: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
