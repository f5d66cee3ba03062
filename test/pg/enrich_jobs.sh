#!/bin/bash
# enrich_jobs.sh: osv5m_enrich() against a live cluster, where pg_regress
# cannot go: a cancel from another session while background workers run,
# and kill -9 of the calling backend and of a worker in the middle of a run.
# After each, the server must recover, the workers must be gone, a rerun
# must finish the table, every row must have been written exactly once
# (an AFTER UPDATE trigger logs each write; a rolled-back batch takes its
# log rows with it) and every bad row must be recorded exactly once.
#
# Nothing depends on timing.  A gate holds each run in the middle: a
# BEFORE UPDATE trigger lets the first G writes of a run through and makes
# every later write wait for an advisory lock that a session of this
# script holds (the gate is closed), so that when a run is interrupted it
# has committed some batches (the script waits until osv5m_progress shows
# them) and cannot have finished.  A process has at most batch_size - 1
# uncommitted writes when it blocks, so G = 12 guarantees 12 - 2 x 2 = 8
# committed rows with 2 workers and batches of 3, and 12 - 3 = 9 with one
# process and batches of 4.  Every wait polls what it waits for (job rows,
# pg_stat_activity, pg_locks) with a deadline of $ENRICH_DEADLINE seconds
# (default 120), and a wait that times out is a failed check.
#
#   test/pg/enrich_jobs.sh            (after make install; about 30 s)
#
# Uses its own throwaway cluster (build/enrich-jobs, port 54397, or
# $ENRICH_TEST_DIR / $ENRICH_TEST_PORT) and the tiny-gelu test model.
# Prints "ok N - ..." / "not ok N - ..." and ends with
# "enrich_jobs: N passed, N failed"; exits 1 when a check failed.
set -u
cd "$(dirname "$0")/../.."
root=$(pwd)
source test/pg/cluster.sh

dir=${ENRICH_TEST_DIR:-$root/build/enrich-jobs}
port=${ENRICH_TEST_PORT:-54397}
deadline=${ENRICH_DEADLINE:-120}
gate_after=12
passed=0
failed=0

# Record one check: ok NAME when the two values are equal.
check() {
	local name=$1 got=$2 want=$3
	if [ "$got" = "$want" ]; then
		passed=$((passed + 1))
		echo "ok $((passed + failed)) - $name"
	else
		failed=$((failed + 1))
		echo "not ok $((passed + failed)) - $name: got '$got', want '$want'"
	fi
}

q() { psql -X -q -At -v ON_ERROR_STOP=1 -d enrich "$@"; }

# Wait until query SQL prints WANT, polling, for at most $deadline s; a
# wait that times out is a failed check named NAME.
wait_for() {
	local name=$1 sql=$2 want=$3 got="" end=$((SECONDS + deadline))
	while :; do
		got=$(q -c "$sql" 2>/dev/null)
		[ "$got" = "$want" ] && return 0
		[ $SECONDS -ge $end ] && break
		sleep 0.1
	done
	failed=$((failed + 1))
	echo "not ok $((passed + failed)) - $name: still '$got' after $deadline s, want '$want'"
	return 1
}

# Wait until the server accepts queries again (after a crash).
wait_ready() {
	wait_for "$1: the server accepts queries again" "SELECT 1" 1
}

# Wait until the running job has committed at least $2 rows.
wait_rows() {
	wait_for "$1: the run committed $2 rows" \
		"SELECT coalesce(max(rows_done), 0) >= $2 FROM osv5m_progress WHERE status = 'running'" t
}

# Wait until no enrichment worker is left.
wait_no_workers() {
	wait_for "$1: the workers are gone" \
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'osv5m enrich worker'" 0
}

# Close the gate: from now on the first $gate_after writes pass, the next
# ones wait until gate_open.  The lock is held by a session of its own,
# which ends when the file gate-open appears.
gate_pid=
gate_close() {
	q -c "UPDATE gate SET after = $gate_after" -c "SELECT setval('written', 1, false)" >/dev/null
	rm -f "$dir/gate-open"
	(
		echo "SELECT pg_advisory_lock(42);"
		while [ ! -e "$dir/gate-open" ]; do sleep 0.1; done
	) | PGAPPNAME=gate psql -X -q -d enrich >/dev/null 2>&1 &
	gate_pid=$!
	wait_for "the gate is closed" "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
		AND objid = 42 AND mode = 'ExclusiveLock' AND granted" 1
}

# Open the gate (its session may already be gone, after a crash).
gate_open() {
	touch "$dir/gate-open"
	[ -n "$gate_pid" ] && wait "$gate_pid" 2>/dev/null
	gate_pid=
	q -c "UPDATE gate SET after = 1000000000" >/dev/null
}

# The state of the table: located rows, writes, distinct rows written,
# errors, distinct rows in errors, and rows whose location is geolocate()
# of their own image (computed one row at a time before any run).
state() {
	q -c "SELECT (SELECT count(loc) FROM photos) || ' ' || (SELECT count(*) FROM log) || ' ' ||
				 (SELECT count(DISTINCT id) FROM log) || ' ' ||
				 (SELECT count(*) FROM osv5m_errors) || ' ' ||
				 (SELECT count(DISTINCT row_key) FROM osv5m_errors) || ' ' ||
				 (SELECT count(*) FROM photos p JOIN expected e USING (id)
				   WHERE ST_DWithin(p.loc::geometry, e.loc::geometry, 1e-4))"
}

# Put the table back to "nothing done".
reset_table() {
	q -c "ALTER TABLE photos DISABLE TRIGGER gate; UPDATE photos SET loc = NULL;
		  ALTER TABLE photos ENABLE TRIGGER gate;
		  TRUNCATE log; DELETE FROM osv5m_errors; DELETE FROM osv5m_jobs"
}

# synchronous_commit on: with it off (cluster.sh's default, for speed) a
# kill -9, which makes the postmaster reset shared memory, loses commits
# whose WAL the WAL writer had not flushed yet, which a loaded machine
# delays; then "the run committed N rows" would not hold after the crash.
cluster_init "$dir" "$port" "max_worker_processes = 8" "synchronous_commit = on" >/dev/null || exit 1
cluster_start "$dir" || exit 1
trap 'touch "$dir/gate-open"; [ -n "$gate_pid" ] && wait "$gate_pid"; cluster_stop "$dir"' EXIT

q -d postgres -c "CREATE DATABASE enrich"
q -c "ALTER DATABASE enrich SET osv5m.model_path = '$root/test/models/tiny-gelu'"
q <<EOF
SET client_min_messages = warning;
CREATE EXTENSION osv5m CASCADE;
-- 40 good rows (test images, some repeated), 2 bad ones, 1 without image
CREATE TABLE photos (id serial PRIMARY KEY, img bytea, loc geography);
INSERT INTO photos (img)
SELECT pg_read_binary_file('$root/test/data/images/' || f)
  FROM pg_ls_dir('$root/test/data/images') AS f, generate_series(1, 3)
 WHERE f ~ '^(jpeg_[0-9]|png_rgb|png_gray8|jpeg_rgb|jpeg_q30)' ORDER BY f LIMIT 40;
INSERT INTO photos (img) VALUES ('\x00010203'), ('\xffd8ffe000104a46'), (NULL);
CREATE TABLE log (id int, pid int);
CREATE FUNCTION log_write() RETURNS trigger LANGUAGE plpgsql AS \$\$
BEGIN
	IF NEW.loc IS NOT NULL AND OLD.loc IS NULL THEN
		INSERT INTO log VALUES (NEW.id, pg_backend_pid());
	END IF;
	RETURN NEW;
END \$\$;
CREATE TRIGGER log_write AFTER UPDATE ON photos FOR EACH ROW EXECUTE FUNCTION log_write();
-- the gate (gate_close, gate_open): writes after the first gate.after
-- wait for advisory lock 42 while another session holds it
CREATE SEQUENCE written;
CREATE TABLE gate (after bigint);
INSERT INTO gate VALUES (1000000000);
CREATE FUNCTION gate() RETURNS trigger LANGUAGE plpgsql AS \$\$
BEGIN
	IF nextval('written') > (SELECT after FROM gate) THEN
		PERFORM pg_advisory_xact_lock_shared(42);
	END IF;
	RETURN NEW;
END \$\$;
CREATE TRIGGER gate BEFORE UPDATE ON photos FOR EACH ROW EXECUTE FUNCTION gate();
-- what each row's own image gives, one call per row
CREATE TABLE expected AS SELECT id, geolocate(img) AS loc FROM photos WHERE id <= 40;
EOF
good=$(q -c "SELECT count(*) FROM photos WHERE id <= 40")
check "fixture has 40 good rows" "$good" 40
done_state="40 40 40 2 2 40"

# ---- 1. cancel of the caller while 2 workers run ----
reset_table
gate_close
q -c "CALL osv5m_enrich('photos', 'img', 'loc', batch_size => 3, workers => 2)" >"$dir/call1.out" 2>&1 &
call=$!
wait_rows cancel 6
leader=$(q -c "SELECT leader_pid FROM osv5m_jobs WHERE status = 'running'")
workers_before=$(q -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'osv5m enrich worker'")
check "cancel: 2 workers were running" "$workers_before" 2
q -c "SELECT pg_cancel_backend($leader)" >/dev/null
wait $call
check "cancel: the CALL failed with the cancel" \
	"$(grep -c 'canceling statement due to user request' "$dir/call1.out")" 1
wait_no_workers cancel && check "cancel: the workers are gone" \
	"$(q -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'osv5m enrich worker'")" 0
wait_for "cancel: the caller's backend is gone" \
	"SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'CALL osv5m_enrich%'" 0
check "cancel: the run shows as interrupted" \
	"$(q -c "SELECT status FROM osv5m_progress")" interrupted
partial=$(q -c "SELECT count(loc) >= 6 AND count(loc) <= $gate_after FROM photos")
check "cancel: some rows but not all were done" "$partial" t
gate_open
q -c "CALL osv5m_enrich('photos', 'img', 'loc', batch_size => 3, workers => 2)" >/dev/null 2>&1
check "cancel: the rerun finished, each row written once with its own image's location, bad rows recorded once" "$(state)" "$done_state"

# ---- 2. kill -9 of the calling backend (workers => 1) ----
reset_table
gate_close
q -c "CALL osv5m_enrich('photos', 'img', 'loc', batch_size => 4)" >"$dir/call2.out" 2>&1 &
call=$!
wait_rows "kill -9 caller" 8
leader=$(q -c "SELECT leader_pid FROM osv5m_jobs WHERE status = 'running'")
kill -9 "$leader"
wait $call
wait_ready "kill -9 caller"
gate_open
check "kill -9 caller: the server recovered" "$(q -c 'SELECT 1')" 1
check "kill -9 caller: the run shows as interrupted" \
	"$(q -c "SELECT status FROM osv5m_progress")" interrupted
check "kill -9 caller: whole batches only (rows done is a multiple of 4)" \
	"$(q -c "SELECT (count(loc) + (SELECT count(*) FROM osv5m_errors)) % 4 FROM photos")" 0
check "kill -9 caller: some rows but not all were done" \
	"$(q -c "SELECT count(loc) >= 8 AND count(loc) <= $gate_after FROM photos")" t
q -c "CALL osv5m_enrich('photos', 'img', 'loc', batch_size => 4)" >/dev/null 2>&1
check "kill -9 caller: the rerun finished, each row written once, bad rows recorded once" \
	"$(state)" "$done_state"
check "kill -9 caller: the rerun marked the old run interrupted" \
	"$(q -c "SELECT string_agg(status, ',' ORDER BY job_id) FROM osv5m_jobs")" "interrupted,done"

# ---- 3. kill -9 of a background worker ----
reset_table
gate_close
q -c "CALL osv5m_enrich('photos', 'img', 'loc', batch_size => 3, workers => 2)" >"$dir/call3.out" 2>&1 &
call=$!
wait_rows "kill -9 worker" 6
worker=$(q -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'osv5m enrich worker' LIMIT 1")
kill -9 "$worker"
wait $call
wait_ready "kill -9 worker"
gate_open
wait_no_workers "kill -9 worker"
check "kill -9 worker: the server recovered" "$(q -c 'SELECT 1')" 1
check "kill -9 worker: no worker left" \
	"$(q -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'osv5m enrich worker'")" 0
q -c "CALL osv5m_enrich('photos', 'img', 'loc', batch_size => 3, workers => 2)" >/dev/null 2>&1
check "kill -9 worker: the rerun finished, each row written once, bad rows recorded once" \
	"$(state)" "$done_state"

# ---- 4. a worker terminated alone: the caller finishes its rows ----
reset_table
gate_close
q -c "CALL osv5m_enrich('photos', 'img', 'loc', batch_size => 3, workers => 2)" >"$dir/call4.out" 2>&1 &
call=$!
wait_rows "terminated worker" 6
worker=$(q -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'osv5m enrich worker' LIMIT 1")
q -c "SELECT pg_terminate_backend($worker)" >/dev/null
wait_for "terminated worker: it is gone" "SELECT count(*) FROM pg_stat_activity WHERE pid = ${worker:-0}" 0
gate_open
wait $call
check "terminated worker: the CALL succeeded" "$(grep -c ERROR "$dir/call4.out")" 0
check "terminated worker: the caller did the rest, each row written once, with its own location" "$(state)" "$done_state"

echo "enrich_jobs: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
