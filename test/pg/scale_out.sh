#!/bin/bash
# scale_out.sh: osv5m_enrich on a table sharded with postgres_fdw, against
# three real servers on this machine: a coordinator (port 54800) and two
# shard servers (54801, 54802), each with osv5m preloaded and the tiny-gelu
# test model.  The coordinator's table "photos" is partitioned: one local
# partition and one foreign partition on each shard server (foreign servers
# with extensions 'osv5m, postgis'; the second shard's table lives in
# another schema under another name, given by the foreign table's options).
# Every partition holds the test images and junk rows.  Checks:
#
#   - EXPLAIN VERBOSE: UPDATE ... SET loc = geolocate(img) is a Foreign
#     Update whose remote SQL calls geolocate, and a foreign table over a
#     view on a shard (SELECT id, geolocate(img)) computes it there;
#   - with dblink installed, CALL osv5m_enrich runs each shard's own
#     osv5m_enrich, both at once (pg_stat_activity sampled on each shard);
#   - a shard server stopped mid-job (pg_ctl stop -m immediate): the job
#     fails naming that server, the other shard and the local partition are
#     done, osv5m_remote_progress shows it unreachable; after a restart the
#     rerun completes;
#   - every row's location equals geolocate() of its own image computed
#     beforehand on the coordinator (1e-4 degrees), every junk row is in
#     its server's osv5m_errors exactly once (seen from the coordinator
#     through osv5m_remote_errors), nothing was written twice (a trigger
#     log on each shard);
#   - refusals: a model that differs on a shard, a shard without osv5m, a
#     foreign table of another wrapper (file_fdw).
#
# Nothing depends on timing: a slow trigger on the shards makes the remote
# runs last, and every wait polls what it waits for with a deadline of
# $SCALE_OUT_DEADLINE seconds (default 180); a wait that times out is a
# failed check.
#
#   test/pg/scale_out.sh        (after make install; about a minute)
#
# Directories under build/scale-out ($SCALE_OUT_DIR), ports
# $SCALE_OUT_PORT (54800) to +2.  Prints "ok N - ..." / "not ok N - ..." and
# ends with "scale-out: N passed, N failed"; exits 1 when a check failed.
set -u
cd "$(dirname "$0")/../.."
root=$(pwd)
source test/pg/cluster.sh

base=${SCALE_OUT_DIR:-$root/build/scale-out}
port0=${SCALE_OUT_PORT:-54800}
deadline=${SCALE_OUT_DEADLINE:-180}
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

# ---- three servers ---------------------------------------------------------
mkdir -p "$base"
for n in 0 1 2; do
	cluster_init "$(node_dir "$n")" $((port0 + n)) \
		"shared_preload_libraries = 'osv5m'" "osv5m.model_path = '$model'" \
		"osv5m.threads = 1" "max_worker_processes = 16" || exit 1
	cluster_start "$(node_dir "$n")" || exit 1
done
for n in 1 2; do
	q $n <<-SQL || exit 1
	SET client_min_messages = warning;
	CREATE EXTENSION osv5m CASCADE;
	CREATE SCHEMA "shard data";
	CREATE TABLE slow (secs float8 NOT NULL);
	INSERT INTO slow VALUES (0);
	CREATE TABLE writes (id int, at timestamptz DEFAULT clock_timestamp());
	CREATE FUNCTION slow_write() RETURNS trigger LANGUAGE plpgsql AS \$\$
	BEGIN PERFORM pg_sleep((SELECT secs FROM public.slow)); RETURN NEW; END \$\$;
	CREATE FUNCTION log_write() RETURNS trigger LANGUAGE plpgsql AS \$\$
	BEGIN INSERT INTO public.writes (id) VALUES (NEW.id); RETURN NULL; END \$\$;
	SQL
done
q 1 -c 'CREATE TABLE public.photos_s1 (id int PRIMARY KEY, name text, img bytea, loc geography)'
q 2 -c 'CREATE TABLE "shard data"."Photos" (id int PRIMARY KEY, name text, img bytea, loc geography)'
for n in 1 2; do
	t=public.photos_s1
	[ $n = 2 ] && t='"shard data"."Photos"'
	q $n -c "CREATE TRIGGER slow BEFORE UPDATE ON $t FOR EACH ROW EXECUTE FUNCTION slow_write()" \
		-c "CREATE TRIGGER logw AFTER UPDATE ON $t FOR EACH ROW
			WHEN (OLD.loc IS NULL AND NEW.loc IS NOT NULL) EXECUTE FUNCTION log_write()"
done
# a database on shard 2 without osv5m, for a refusal
q 2 -c 'CREATE DATABASE bare'
psql -X -q -h "$(node_sock 2)" -p $((port0 + 2)) -U postgres -d bare \
	-c 'CREATE TABLE bare_photos (id int, img bytea, loc bytea)'

s1=$(node_sock 1)
s2=$(node_sock 2)
q 0 <<-SQL || exit 1
SET client_min_messages = warning;
CREATE EXTENSION osv5m CASCADE;
CREATE EXTENSION postgres_fdw;
CREATE SERVER shard1 FOREIGN DATA WRAPPER postgres_fdw
	OPTIONS (host '$s1', port '$((port0 + 1))', dbname 'postgres', extensions 'osv5m, postgis');
CREATE SERVER shard2 FOREIGN DATA WRAPPER postgres_fdw
	OPTIONS (host '$s2', port '$((port0 + 2))', dbname 'postgres', extensions 'osv5m, postgis');
CREATE USER MAPPING FOR CURRENT_USER SERVER shard1;
CREATE USER MAPPING FOR CURRENT_USER SERVER shard2;
CREATE TABLE photos (id int, name text, img bytea, loc geography) PARTITION BY RANGE (id);
CREATE TABLE photos_local PARTITION OF photos (PRIMARY KEY (id)) FOR VALUES FROM (0) TO (1000);
CREATE FOREIGN TABLE photos_s1 PARTITION OF photos FOR VALUES FROM (1000) TO (2000) SERVER shard1;
CREATE FOREIGN TABLE photos_s2 PARTITION OF photos FOR VALUES FROM (2000) TO (3000)
	SERVER shard2 OPTIONS (schema_name 'shard data', table_name 'Photos');
-- every image on every partition, its location computed here beforehand
CREATE TABLE src (id int PRIMARY KEY, name text, img bytea, expected geography);
INSERT INTO src
SELECT p * 1000 + row_number() OVER (PARTITION BY p ORDER BY f), f,
	   pg_read_binary_file('$images/' || f), NULL
FROM pg_ls_dir('$images') f, generate_series(0, 2) p;
UPDATE src SET expected = geolocate(img);
-- junk: not an image, a truncated JPEG, an empty value
INSERT INTO src
SELECT p * 1000 + 900 + j, 'junk', v, NULL
FROM generate_series(0, 2) p,
	 (VALUES (1, '\xdeadbeef'::bytea), (2, '\xffd8ffe000104a4649'::bytea), (3, ''::bytea)) x(j, v);
INSERT INTO photos (id, name, img) SELECT id, name, img FROM src;
SQL
check "rows on each partition" \
	"$(q 0 -c "SELECT string_agg(tableoid::regclass || '=' || n, ' ' ORDER BY tableoid::regclass::text)
				FROM (SELECT tableoid, count(*) n FROM photos GROUP BY 1) s")" \
	"photos_local=57 photos_s1=57 photos_s2=57"
good=$(q 0 -c "SELECT count(*) FROM src WHERE expected IS NOT NULL AND id < 1000")

# ---- queries: geolocate shipped to the shard servers -----------------------
plan=$(q 0 -c 'EXPLAIN (VERBOSE, COSTS OFF) UPDATE photos SET loc = geolocate(img) WHERE loc IS NULL')
check "UPDATE ... geolocate(img): a Foreign Update on each shard" \
	"$(printf '%s\n' "$plan" | grep -c -- '->  Foreign Update on public.photos_s')" 2
# (geolocate is inlined: its C function osv5m_geolocate_point goes in the SQL)
check "UPDATE ... geolocate(img): the remote SQL calls geolocate" \
	"$(printf '%s\n' "$plan" | grep -c 'Remote SQL: UPDATE .* SET loc = .*public.osv5m_geolocate_point(img).* WHERE ((loc IS NULL))')" 2
q 1 -c 'CREATE VIEW photos_geo AS SELECT id, geolocate(img) AS loc FROM public.photos_s1'
q 0 -c 'CREATE FOREIGN TABLE photos_geo_s1 (id int, loc geography) SERVER shard1 OPTIONS (table_name $$photos_geo$$)'
plan=$(q 0 -c 'EXPLAIN (VERBOSE, COSTS OFF) SELECT id, loc FROM photos_geo_s1 WHERE id < 1010')
check "a foreign table over a shard's view: the images stay there" \
	"$(printf '%s\n' "$plan" | grep -c 'Remote SQL: SELECT id, loc FROM public.photos_geo WHERE ((id < 1010))')" 1
check "a foreign table over a shard's view: geolocate computed there is right" \
	"$(q 0 -c 'SELECT count(*) FILTER (WHERE ST_DWithin(g.loc::geometry, s.expected::geometry, 1e-4))
				FROM photos_geo_s1 g JOIN src s USING (id) WHERE g.id < 1010')" 9

# ---- refusals ----------------------------------------------------------------
q 0 -c 'CREATE EXTENSION dblink'
# a foreign table of another wrapper
q 0 -c 'CREATE EXTENSION file_fdw' -c 'CREATE SERVER files FOREIGN DATA WRAPPER file_fdw' \
	-c "CREATE FOREIGN TABLE photos_file (id int, img bytea, loc geography) SERVER files OPTIONS (filename '/dev/null')"
out=$(q 0 -c "CALL osv5m_enrich('photos_file', 'img', 'loc')" 2>&1)
check "another wrapper: refused with a hint" \
	"$(printf '%s\n' "$out" | grep -c -e 'does not support foreign table public.photos_file' -e 'HINT:  Run osv5m_enrich on the server that holds its rows')" 2
# a server without osv5m
q 0 -c "CREATE SERVER bare FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host '$s2', port '$((port0 + 2))', dbname 'bare')" \
	-c 'CREATE USER MAPPING FOR CURRENT_USER SERVER bare' \
	-c 'CREATE TABLE photos_b (id int, img bytea, loc geography) PARTITION BY RANGE (id)' \
	-c 'CREATE FOREIGN TABLE photos_b_1 PARTITION OF photos_b FOR VALUES FROM (0) TO (10) SERVER bare OPTIONS (table_name $$bare_photos$$)'
out=$(q 0 -c "CALL osv5m_enrich('photos_b', 'img', 'loc')" 2>&1)
check "a server without osv5m: refused with a hint" \
	"$(printf '%s\n' "$out" | grep -c -e 'server bare (foreign table public.photos_b_1) has no osv5m extension' -e 'HINT:  Run CREATE EXTENSION osv5m CASCADE there')" 2
# another model on shard 2
q 2 -c "ALTER SYSTEM SET osv5m.model_path = '$root/test/models/tiny-quickgelu'" -c 'SELECT pg_reload_conf()' >/dev/null
wait_for "shard 2 takes the other model" 2 'SHOW osv5m.model_path' "$root/test/models/tiny-quickgelu"
out=$(q 0 -c "CALL osv5m_enrich('photos', 'img', 'loc')" 2>&1)
check "a model that differs: the job stops, naming the server" \
	"$(printf '%s\n' "$out" | grep -c 'the model differs on server(s) shard2$')" 1
check "a model that differs: nothing written" \
	"$(q 0 -c 'SELECT count(*) FROM photos WHERE loc IS NOT NULL')" 0
q 2 -c 'ALTER SYSTEM RESET osv5m.model_path' -c 'SELECT pg_reload_conf()' >/dev/null
wait_for "shard 2 takes the test model back" 2 'SHOW osv5m.model_path' "$model"
# the same architecture and file size, one weight different: only the
# weights' SHA-256 tells them apart
variant=$base/gelu-variant
rm -rf "$variant"
cp -r "$model" "$variant"
python3 -c '
import sys
path = sys.argv[1] + "/model.safetensors"
with open(path, "r+b") as f:
    f.seek(-2, 2)		# a mantissa byte of the last weight
    b = f.read(1)[0]
    f.seek(-2, 2)
    f.write(bytes([b ^ 1]))
' "$variant"
chmod -R a+rX "$variant"
q 2 -c "ALTER SYSTEM SET osv5m.model_path = '$variant'" -c 'SELECT pg_reload_conf()' >/dev/null
wait_for "shard 2 takes the variant" 2 'SHOW osv5m.model_path' "$variant"
out=$(q 0 -c "CALL osv5m_enrich('photos', 'img', 'loc')" 2>&1)
check "weights that differ in one value: the job stops, naming the server" \
	"$(printf '%s\n' "$out" | grep -c 'the model differs on server(s) shard2$')" 1
check "weights that differ in one value: nothing written" \
	"$(q 0 -c 'SELECT count(*) FROM photos WHERE loc IS NOT NULL')" 0
q 2 -c 'ALTER SYSTEM RESET osv5m.model_path' -c 'SELECT pg_reload_conf()' >/dev/null
wait_for "shard 2 takes the test model back" 2 'SHOW osv5m.model_path' "$model"

# ---- the job, a shard server stopped in the middle ---------------------------
for n in 1 2; do q $n -c 'UPDATE slow SET secs = 0.4'; done
q 0 -c "CALL osv5m_enrich('photos', 'img', 'loc', batch_size => 4)" >"$base/call1.out" 2>&1 &
call_pid=$!
# both shard servers busy at once: an active osv5m_enrich on each, in one sample
busy_sql="SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'CALL %osv5m_enrich(%'"
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
check "both shard servers run osv5m_enrich at once" "$both" yes
wait_for "the coordinator sees both servers running" 0 \
	"SELECT string_agg(server || ':' || status, ' ' ORDER BY server) FROM osv5m_remote_progress('photos')" \
	"shard1:running shard2:running" && check "the coordinator sees both servers running" ok ok
# shard 1 has committed some batches: stop it
wait_for "shard 1 committed batches" 1 'SELECT count(*) >= 4 FROM writes' t
as_pguser "$PG_BINDIR/pg_ctl" -D "$(node_dir 1)/data" -m immediate -w stop >/dev/null
end=$((SECONDS + deadline))
while kill -0 "$call_pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.2; done
wait "$call_pid"
rc=$?
call_pid=
check "the job fails when a server is lost" "$([ "$rc" -ne 0 ] && echo failed)" failed
check "its error names the server" \
	"$(grep -c 'ERROR:  osv5m_enrich job [0-9]*: 1 server run(s) failed: server shard1 (foreign table public.photos_s1): server closed the connection unexpectedly' "$base/call1.out")" 1
check "its hint says to run it again" \
	"$(grep -c 'HINT:  The rest of the table was enriched' "$base/call1.out")" 1
check "the job's servers" \
	"$(q 0 -c "SELECT string_agg(server || ':' || status, ' ' ORDER BY server) FROM osv5m_job_remotes
				WHERE job_id = (SELECT max(job_id) FROM osv5m_jobs)")" "shard1:failed shard2:done"
check "the local partition is done meanwhile" \
	"$(q 0 -c 'SELECT count(*) FROM photos_local WHERE loc IS NOT NULL')" "$good"
check "shard 2 is done meanwhile" "$(q 2 -c 'SELECT count(*) FROM "shard data"."Photos" WHERE loc IS NOT NULL')" "$good"
check "a stopped server shows as unreachable" \
	"$(q 0 -c "SELECT string_agg(server || ':' || status, ' ' ORDER BY server) FROM osv5m_remote_progress('photos')")" \
	"shard1:unreachable shard2:done"

# ---- restarted, run again ------------------------------------------------------
cluster_start "$(node_dir 1)" || exit 1
for n in 1 2; do q $n -c 'UPDATE slow SET secs = 0'; done
check "shard 1 was stopped before its end" \
	"$(q 1 -c "SELECT count(*) < $good FROM photos_s1 WHERE loc IS NOT NULL")" t
q 0 -c "CALL osv5m_enrich('photos', 'img', 'loc', batch_size => 4, workers => 2)" >"$base/call2.out" 2>&1
check "the rerun completes" "$?" 0
check "every photo located as geolocate() of its own image" \
	"$(q 0 -c 'SELECT count(*) FILTER (WHERE ST_DWithin(p.loc::geometry, s.expected::geometry, 1e-4))
				|| $$ of $$ || count(*) FROM photos p JOIN src s USING (id) WHERE s.expected IS NOT NULL')" \
	"$((3 * good)) of $((3 * good))"
check "no junk row located" "$(q 0 -c "SELECT count(*) FROM photos WHERE name = 'junk' AND loc IS NOT NULL")" 0
check "junk rows of the shards, each once in its server's osv5m_errors" \
	"$(q 0 -c "SELECT string_agg(foreign_table || ':' || row_key || 'x' || n, ' ' ORDER BY foreign_table::text, row_key)
				FROM (SELECT foreign_table, row_key, count(*) n FROM osv5m_remote_errors('photos') GROUP BY 1, 2) e")" \
	"photos_s1:1901x1 photos_s1:1902x1 photos_s1:1903x1 photos_s2:2901x1 photos_s2:2902x1 photos_s2:2903x1"
check "junk rows of the local partition, each once in osv5m_errors" \
	"$(q 0 -c "SELECT string_agg(row_key || 'x' || n, ' ' ORDER BY row_key)
				FROM (SELECT row_key, count(*) n FROM osv5m_errors GROUP BY 1) e")" "901x1 902x1 903x1"
for n in 1 2; do
	check "shard $n: every photo written exactly once" \
		"$(q $n -c 'SELECT count(*) || $$ writes, $$ || count(DISTINCT id) || $$ rows$$ FROM writes')" \
		"$good writes, $good rows"
done
check "the coordinator sees both servers done" \
	"$(q 0 -c "SELECT string_agg(server || ':' || status || ':' || rows_left, ' ' ORDER BY server) FROM osv5m_remote_progress('photos')")" \
	"shard1:done:0 shard2:done:0"
check "the last job is done on both servers" \
	"$(q 0 -c "SELECT j.status || ' ' || string_agg(r.server || ':' || r.status, ' ' ORDER BY r.server)
				FROM osv5m_jobs j JOIN osv5m_job_remotes r USING (job_id)
				WHERE j.job_id = (SELECT max(job_id) FROM osv5m_jobs) GROUP BY j.status")" \
	"done shard1:done shard2:done"

echo "scale-out: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
