#!/bin/bash
# upgrade.sh: ALTER EXTENSION osv5m UPDATE from an earlier version (the first
# released one, 0.1.0, or UPGRADE_FROM=0.2.0 or 0.3.0)
# to the installed default version keeps the user's data, and the
# new version works on it.
#
#   test/pg/upgrade.sh                (after make install; about 20 s)
#
# On a fresh cluster of its own (shared_preload_libraries = 'osv5m';
# build/upgrade, or UPGRADE_DIR; port UPGRADE_PORT, default 55444):
#   1. CREATE EXTENSION osv5m VERSION '0.1.0' CASCADE; osv5m.model_path is
#      the test model tiny-gelu;
#   2. two tables with primary keys (one of them composite): every test
#      image, and junk rows (not an image, a truncated JPEG, a truncated
#      PNG, a NULL image); osv5m_enrich on both, so that locations are
#      written, bad rows are recorded in osv5m_errors and osv5m_jobs /
#      osv5m_job_workers hold the runs (osv5m.images_per_run = 1, so that
#      each location is exactly what geolocate() returns); then a third
#      table with 2 background workers: between make install and
#      ALTER EXTENSION UPDATE the new library runs with 0.1.0's SQL, and
#      must either work or refuse with an error that names
#      ALTER EXTENSION osv5m UPDATE;
#   3. a snapshot: each row's location (EWKB in hex), and every row of
#      osv5m_errors, osv5m_jobs and osv5m_job_workers in the columns these
#      tables have in 0.1.0 (a new version may add columns), and each run's
#      status and counts in osv5m_progress;
#   4. ALTER EXTENSION osv5m UPDATE, in a new session;
# then checks that the version is the control file's default_version, that
# the snapshot is unchanged, and that the new version works on the old
# data: geolocate() equals every stored location, geolocate_topk() and
# osv5m_cells() answer, and a new osv5m_enrich run on new NULL rows of the
# same table locates them, records the new bad row, and leaves the rows
# 0.1.0 recorded as bad alone.  Since 0.4.0 a run records its
# osv5m.precision: the runs made before the update say fp32 (what they ran
# in), in osv5m_jobs and osv5m_progress, and a new run in bf16 says bf16
# and writes what geolocate() gives in bf16.
# Fails at once, saying so, when no version newer than 0.1.0 is installed.
# Prints "ok - NAME" / "FAIL - NAME: why" and ends with
# "upgrade: N passed, N failed".
set -u
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
MODEL=$ROOT/test/models/tiny-gelu
IMAGES=$ROOT/test/data/images
DIR=${UPGRADE_DIR:-$ROOT/build/upgrade}
PORT=${UPGRADE_PORT:-55444}
OLD=${UPGRADE_FROM:-0.1.0}
export PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
. test/pg/cluster.sh

passed=0
failed=0
ok() { echo "ok - $1"; passed=$((passed + 1)); }
fail() { echo "FAIL - $1: $2"; failed=$((failed + 1)); }
finish() {
	echo "upgrade: $passed passed, $failed failed"
	[ "$failed" -eq 0 ]
	exit $?
}
q() { psql -X -q -At -v ON_ERROR_STOP=1 -d upgrade "$@"; }

# ---- the versions ----------------------------------------------------------
control=$($PG_CONFIG --sharedir)/extension/osv5m.control
default=$(sed -nE "s/^default_version *= *'([^']*)'.*/\1/p" "$control" 2>/dev/null)
tree=$(sed -nE "s/^default_version *= *'([^']*)'.*/\1/p" osv5m.control)
if [ -z "$default" ]; then
	fail versions "no installed osv5m.control ($control): run make install"
	finish
fi
if [ "$default" != "$tree" ]; then
	fail versions "the installed default_version is $default, this tree's is $tree: run make install"
	finish
fi
if [ "$default" = "$OLD" ]; then
	fail versions "there is no newer version than $OLD: default_version is $OLD, so ALTER EXTENSION osv5m UPDATE has nothing to do (an upgrade script osv5m--$OLD--<new>.sql and a new default_version are missing)"
	finish
fi

cluster_init "$DIR" "$PORT" "shared_preload_libraries = 'osv5m'" "max_worker_processes = 8" ||
	{ fail cluster "initdb"; finish; }
DIR=$(cd "$DIR" && pwd)
trap 'cluster_stop "$DIR"' EXIT
cluster_start "$DIR" || { fail cluster "the server did not start"; finish; }
psql -X -q -d postgres -c "CREATE DATABASE upgrade" || { fail cluster "CREATE DATABASE"; finish; }

path=$(q -c "SELECT path FROM pg_extension_update_paths('osv5m') WHERE source = '$OLD' AND target = '$default'")
if [ -n "$path" ]; then
	ok "versions (installed default_version $default; update path $path)"
else
	fail versions "no update path from $OLD to $default (is osv5m--$OLD--$default.sql installed?)"
	finish
fi

# ---- 1, 2. version 0.1.0 and its data ---------------------------------------
out=$(q 2>&1 <<EOF
SET client_min_messages = warning;
CREATE EXTENSION osv5m VERSION '$OLD' CASCADE;
ALTER DATABASE upgrade SET osv5m.model_path = '$MODEL';
CREATE TABLE photos (id int PRIMARY KEY, name text, img bytea, loc geography);
INSERT INTO photos (id, name, img)
SELECT row_number() OVER (ORDER BY f), f, pg_read_binary_file('$IMAGES/' || f)
  FROM pg_ls_dir('$IMAGES') AS f;
INSERT INTO photos (id, name, img) VALUES
	(1001, 'not an image', '\x00010203'),
	(1002, 'truncated jpeg', '\xffd8ffe000104a46'),
	(1003, 'truncated png', '\x89504e470d0a1a0a0000000d49484452'),
	(1004, 'no image', NULL);
CREATE TABLE shots (camera text, n int, img bytea, loc geography, PRIMARY KEY (camera, n));
INSERT INTO shots SELECT 'cam ' || (i % 2), i, img, NULL FROM photos p, generate_series(1, 3) i
 WHERE p.name = 'jpeg_224x224.jpg';
INSERT INTO shots VALUES ('cam 9', 1, '\x474946383961', NULL);
CREATE TABLE more (id int PRIMARY KEY, img bytea, loc geography);
INSERT INTO more SELECT i, img, NULL FROM photos p, generate_series(1, 6) i
 WHERE p.name = 'jpeg_224x224.jpg';
EOF
)
[ -z "$out" ] && [ "$(q -c "SELECT extversion FROM pg_extension WHERE extname = 'osv5m'")" = "$OLD" ] &&
	ok "install $OLD (CREATE EXTENSION osv5m VERSION '$OLD' and the tables)" ||
	{ fail "install $OLD" "$out"; finish; }

out=$(q 2>&1 <<EOF
SET osv5m.images_per_run = 1;
CALL osv5m_enrich('photos', 'img', 'loc', batch_size => 7);
CALL osv5m_enrich('shots', 'img', 'loc', batch_size => 2);
EOF
) || { fail "enrich $OLD" "$out"; finish; }
# Between make install and ALTER EXTENSION UPDATE, the new library runs
# with the old version's SQL and tables: background workers too, or else
# they refuse with an error that says to run ALTER EXTENSION osv5m UPDATE.
out=$(q -c "SET osv5m.images_per_run = 1" \
	-c "CALL osv5m_enrich('more', 'img', 'loc', batch_size => 2, workers => 2)" 2>&1)
if [ "$(q -c "SELECT count(loc) FROM more")" = 6 ]; then
	ok "enrich $OLD with 2 workers (the new library on $OLD's SQL, before the update)"
elif printf '%s' "$out" | grep -q '^ERROR' && printf '%s' "$out" | grep -q 'ALTER EXTENSION osv5m UPDATE'; then
	ok "enrich $OLD with 2 workers (the new library on $OLD's SQL refuses clearly: $(printf '%s' "$out" | grep -m1 '^ERROR'))"
else
	fail "enrich $OLD with 2 workers" "the new library on $OLD's SQL, before the update: $(printf '%s' "$out" | grep -v NOTICE | head -n 4)"
fi
counts=$(q -c "SELECT (SELECT count(loc) FROM photos) || ' ' || (SELECT count(*) FROM osv5m_errors) || ' ' ||
	(SELECT count(*) FROM osv5m_jobs) || ' ' || (SELECT count(*) FROM osv5m_job_workers) || ' ' ||
	(SELECT count(loc) FROM shots)")
set -- $counts
images=$(ls "$IMAGES" | wc -l)
if [ $# -eq 5 ] && [ "$1" -ge $((images - 2)) ] && [ "$2" -ge 4 ] && [ "$3" -ge 2 ] && [ "$4" -ge 2 ] && [ "$5" -eq 3 ]; then
	ok "enrich $OLD ($1 of $images photos located, $5 shots; $2 errors recorded; $3 jobs, $4 job workers)"
else
	fail "enrich $OLD" "located photos, errors, jobs, job workers, located shots: $counts"
fi

# ---- 3. the snapshot --------------------------------------------------------
# The columns of a table in version 0.1.0, in order.
columns() {
	q -c "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute
		WHERE attrelid = '$1'::regclass AND attnum > 0 AND NOT attisdropped"
}
errors_cols=$(columns osv5m_errors)
jobs_cols=$(columns osv5m_jobs)
workers_cols=$(columns osv5m_job_workers)
declare -A SNAP=(
	[locations]="SELECT id, name, coalesce(encode(ST_AsEWKB(loc::geometry), 'hex'), '-') FROM photos ORDER BY id"
	[shots]="SELECT camera, n, coalesce(encode(ST_AsEWKB(loc::geometry), 'hex'), '-') FROM shots ORDER BY camera, n"
	[more]="SELECT id, coalesce(encode(ST_AsEWKB(loc::geometry), 'hex'), '-') FROM more ORDER BY id"
	[errors]="SELECT ROW($errors_cols) FROM osv5m_errors ORDER BY error_id"
	[jobs]="SELECT ROW($jobs_cols) FROM osv5m_jobs ORDER BY job_id"
	[job_workers]="SELECT ROW($workers_cols) FROM osv5m_job_workers ORDER BY job_id, worker"
	[progress]="SELECT job_id, table_name, status, rows_done, rows_failed, rows_left FROM osv5m_progress ORDER BY job_id"
)
snapshot() {
	local d=$DIR/$1 k
	mkdir -p "$d"
	for k in "${!SNAP[@]}"; do
		q -c "${SNAP[$k]}" >"$d/$k" 2>&1
	done
}
snapshot before
echo "# the $OLD columns compared: osv5m_errors ($errors_cols); osv5m_jobs ($jobs_cols); osv5m_job_workers ($workers_cols)"

# ---- 4. the upgrade ---------------------------------------------------------
out=$(q -c "ALTER EXTENSION osv5m UPDATE" 2>&1)
version=$(q -c "SELECT extversion FROM pg_extension WHERE extname = 'osv5m'")
if [ -z "$out" ] && [ "$version" = "$default" ]; then
	ok "update (ALTER EXTENSION osv5m UPDATE: $OLD -> $version)"
else
	fail update "version $version after ALTER EXTENSION osv5m UPDATE (want $default): $out"
	finish
fi

# ---- the data survived ------------------------------------------------------
snapshot after
for k in locations shots more errors jobs job_workers progress; do
	n=$(wc -l <"$DIR/before/$k")
	if [ "$n" -gt 0 ] && ! grep -q ERROR "$DIR/before/$k" &&
		diff "$DIR/before/$k" "$DIR/after/$k" >"$DIR/$k.diff" 2>&1; then
		ok "kept $k ($n rows identical)"
	else
		fail "kept $k" "$n rows before; differences (build/upgrade/$k.diff): $(head -n 6 "$DIR/$k.diff" "$DIR/after/$k" | tr '\n' ' ' | cut -c1-400)"
	fi
done

# ---- the precision of the runs (0.4.0) -------------------------------------------
old_jobs=$(wc -l <"$DIR/before/jobs")
out=$(q -F ' ' -c "SELECT (SELECT count(*) FILTER (WHERE precision = 'fp32') FROM osv5m_jobs),
	(SELECT count(*) FILTER (WHERE precision = 'fp32') FROM osv5m_progress),
	(SELECT count(*) FROM osv5m_jobs)" 2>&1)
if [ "$out" = "$old_jobs $old_jobs $old_jobs" ]; then
	ok "precision of the old runs (all $old_jobs fp32, in osv5m_jobs and osv5m_progress)"
else
	fail "precision of the old runs" "expected '$old_jobs $old_jobs $old_jobs' (fp32 in osv5m_jobs, in osv5m_progress, jobs), got: $out"
fi

# ---- the new version on the old data ------------------------------------------
out=$(q -F ' ' -c "SELECT count(*), count(*) FILTER (WHERE ST_AsEWKB(geolocate(img)::geometry) = ST_AsEWKB(loc::geometry))
	FROM photos WHERE loc IS NOT NULL" 2>&1)
set -- $out
[ $# -eq 2 ] && [ "$1" -gt 0 ] && [ "$1" = "$2" ] &&
	ok "geolocate (equals the stored location for all $1 located photos)" ||
	fail geolocate "located, equal: $out"
out=$(q -F ' ' -c "SELECT (SELECT count(*) FROM photos p, geolocate_topk(p.img, 3) t WHERE p.id = 1),
	(SELECT count(*) FROM osv5m_cells())" 2>&1)
[ "$out" = "3 100" ] && ok "geolocate_topk and osv5m_cells (3 cells, 100 cells)" ||
	fail "geolocate_topk and osv5m_cells" "expected '3 100', got: $out"

# new rows, without a location: a new run with 2 workers locates the good
# ones, records the bad one, and leaves the rows 0.1.0 recorded alone
out=$(q 2>&1 <<EOF
INSERT INTO photos (id, name, img)
SELECT 2000 + id, 'again ' || name, img FROM photos WHERE id <= 5;
INSERT INTO photos (id, name, img) VALUES (2100, 'junk after the upgrade', '\x0badbeef');
SET osv5m.images_per_run = 1;
CALL osv5m_enrich('photos', 'img', 'loc', batch_size => 2, workers => 2);
EOF
) || fail "enrich $default" "$out"
out=$(q -F ' ' 2>&1 <<'EOF'
SELECT count(*) FILTER (WHERE loc IS NOT NULL),
       count(*) FILTER (WHERE ST_AsEWKB(geolocate(img)::geometry) = ST_AsEWKB(loc::geometry)),
       count(*) FILTER (WHERE ST_AsEWKB(loc::geometry) =
                        (SELECT ST_AsEWKB(o.loc::geometry) FROM photos o WHERE o.id = n.id - 2000))
  FROM photos n WHERE id BETWEEN 2001 AND 2005;
SELECT count(*) FROM osv5m_errors WHERE tbl = 'photos'::regclass AND row_key = '2100';
SELECT status FROM osv5m_progress ORDER BY job_id DESC LIMIT 1;
EOF
)
want_new=$(q -c "SELECT count(loc) FROM photos WHERE id <= 5")
if [ "$(echo $out)" = "$want_new $want_new $want_new 1 done" ]; then
	ok "enrich $default ($want_new new rows located as geolocate() does and as their copies were by $OLD, the new bad row recorded, job done)"
else
	fail "enrich $default" "expected '$want_new $want_new $want_new 1 done', got: $(echo $out)"
fi
q -c "${SNAP[errors]}" >"$DIR/errors.new" 2>&1
if head -n "$(wc -l <"$DIR/before/errors")" "$DIR/errors.new" | diff -q - "$DIR/before/errors" >/dev/null &&
	[ "$(q -c "SELECT count(loc) FROM photos WHERE id > 1000 AND id < 2000")" = 0 ]; then
	ok "old errors kept by the new run (the rows $OLD recorded as bad were not retried)"
else
	fail "old errors kept by the new run" "the errors recorded by $OLD changed: $(diff "$DIR/before/errors" "$DIR/errors.new" | head -n 6 | tr '\n' ' ')"
fi

# a run in bf16 after the update: recorded as such, its rows (2 background
# workers) what geolocate() gives in bf16
out=$(q -F ' ' 2>&1 <<EOF
SET client_min_messages = warning;
INSERT INTO photos (id, name, img)
SELECT 3000 + id, 'bf16 ' || name, img FROM photos WHERE id <= 5;
SET osv5m.precision = 'bf16';
CALL osv5m_enrich('photos', 'img', 'loc', batch_size => 2, workers => 2);
SELECT (SELECT precision FROM osv5m_jobs ORDER BY job_id DESC LIMIT 1),
       (SELECT precision FROM osv5m_progress ORDER BY job_id DESC LIMIT 1),
       count(loc),
       count(*) FILTER (WHERE ST_AsEWKB(geolocate(img)::geometry) = ST_AsEWKB(loc::geometry))
  FROM photos WHERE id BETWEEN 3001 AND 3005;
EOF
)
if [ "$(echo $out)" = "bf16 bf16 $want_new $want_new" ]; then
	ok "enrich $default in bf16 (recorded as bf16; $want_new rows as geolocate() gives them in bf16)"
else
	fail "enrich $default in bf16" "expected 'bf16 bf16 $want_new $want_new', got: $(echo $out)"
fi

if out=$(sh test/pg/hostile_log.sh "$DIR/server.log" 2>&1); then
	ok "server_log_clean"
else
	fail server_log_clean "$out"
fi
finish
