#!/bin/bash
# enrich_jobs.sh: osv5m_enrich() against a live cluster, where pg_regress
# cannot go: a cancel from another session while background workers run,
# and kill -9 of the calling backend and of a worker in the middle of a run.
# After each, the server must recover, the workers must be gone, a rerun
# must finish the table, every row must have been written exactly once
# (an AFTER UPDATE trigger logs each write; a rolled-back batch takes its
# log rows with it) and every bad row must be recorded exactly once.
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

# Wait until the server accepts queries again (after a crash).
wait_ready() {
	for _ in $(seq 1 120); do
		q -c 'SELECT 1' >/dev/null 2>&1 && return 0
		sleep 0.5
	done
	return 1
}

# Wait until the running job has at least $1 rows done; prints nothing.
wait_rows() {
	for _ in $(seq 1 200); do
		n=$(q -c "SELECT coalesce(max(rows_done), 0) FROM osv5m_progress WHERE status = 'running'" 2>/dev/null)
		[ "${n:-0}" -ge "$1" ] && return 0
		sleep 0.1
	done
	return 1
}

# The state of the table: located rows, writes, distinct rows written, errors.
state() {
	q -c "SELECT (SELECT count(loc) FROM photos) || ' ' || (SELECT count(*) FROM log) || ' ' ||
				 (SELECT count(DISTINCT id) FROM log) || ' ' ||
				 (SELECT count(*) FROM osv5m_errors) || ' ' ||
				 (SELECT count(DISTINCT row_key) FROM osv5m_errors)"
}

# Put the table back to "nothing done".
reset_table() {
	q -c "ALTER TABLE photos DISABLE TRIGGER slow; UPDATE photos SET loc = NULL;
		  ALTER TABLE photos ENABLE TRIGGER slow;
		  TRUNCATE log; DELETE FROM osv5m_errors; DELETE FROM osv5m_jobs"
}

cluster_init "$dir" "$port" "max_worker_processes = 8" >/dev/null || exit 1
cluster_start "$dir" || exit 1
trap 'cluster_stop "$dir"' EXIT

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
-- 0.1 s per row written: runs last long enough to be interrupted
CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS \$\$
BEGIN PERFORM pg_sleep(0.1); RETURN NEW; END \$\$;
CREATE TRIGGER slow BEFORE UPDATE ON photos FOR EACH ROW EXECUTE FUNCTION slow();
EOF
good=$(q -c "SELECT count(*) FROM photos WHERE id <= 40")
check "fixture has 40 good rows" "$good" 40
done_state="40 40 40 2 2"

# ---- 1. cancel of the caller while 2 workers run ----
reset_table
q -c "CALL osv5m_enrich('photos', 'img', 'loc', batch_size => 3, workers => 2)" >"$dir/call1.out" 2>&1 &
call=$!
wait_rows 6
leader=$(q -c "SELECT leader_pid FROM osv5m_jobs WHERE status = 'running'")
workers_before=$(q -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'osv5m enrich worker'")
check "cancel: 2 workers were running" "$workers_before" 2
q -c "SELECT pg_cancel_backend($leader)" >/dev/null
wait $call
check "cancel: the CALL failed with the cancel" \
	"$(grep -c 'canceling statement due to user request' "$dir/call1.out")" 1
sleep 1
check "cancel: the workers are gone" \
	"$(q -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'osv5m enrich worker'")" 0
check "cancel: the run shows as interrupted" \
	"$(q -c "SELECT status FROM osv5m_progress")" interrupted
partial=$(q -c "SELECT count(loc) > 0 AND count(loc) < 40 FROM photos")
check "cancel: some rows but not all were done" "$partial" t
q -c "CALL osv5m_enrich('photos', 'img', 'loc', batch_size => 3, workers => 2)" >/dev/null 2>&1
check "cancel: the rerun finished, each row written once, bad rows recorded once" "$(state)" "$done_state"

# ---- 2. kill -9 of the calling backend (workers => 1) ----
reset_table
q -c "CALL osv5m_enrich('photos', 'img', 'loc', batch_size => 4)" >"$dir/call2.out" 2>&1 &
call=$!
wait_rows 8
leader=$(q -c "SELECT leader_pid FROM osv5m_jobs WHERE status = 'running'")
kill -9 "$leader"
wait $call
wait_ready
check "kill -9 caller: the server recovered" "$(q -c 'SELECT 1')" 1
check "kill -9 caller: the run shows as interrupted" \
	"$(q -c "SELECT status FROM osv5m_progress")" interrupted
check "kill -9 caller: whole batches only (rows done is a multiple of 4)" \
	"$(q -c "SELECT (count(loc) + (SELECT count(*) FROM osv5m_errors)) % 4 FROM photos")" 0
q -c "CALL osv5m_enrich('photos', 'img', 'loc', batch_size => 4)" >/dev/null 2>&1
check "kill -9 caller: the rerun finished, each row written once, bad rows recorded once" \
	"$(state)" "$done_state"
check "kill -9 caller: the rerun marked the old run interrupted" \
	"$(q -c "SELECT string_agg(status, ',' ORDER BY job_id) FROM osv5m_jobs")" "interrupted,done"

# ---- 3. kill -9 of a background worker ----
reset_table
q -c "CALL osv5m_enrich('photos', 'img', 'loc', batch_size => 3, workers => 2)" >"$dir/call3.out" 2>&1 &
call=$!
wait_rows 6
worker=$(q -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'osv5m enrich worker' LIMIT 1")
kill -9 "$worker"
wait $call
wait_ready
check "kill -9 worker: the server recovered" "$(q -c 'SELECT 1')" 1
check "kill -9 worker: no worker left" \
	"$(q -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'osv5m enrich worker'")" 0
q -c "CALL osv5m_enrich('photos', 'img', 'loc', batch_size => 3, workers => 2)" >/dev/null 2>&1
check "kill -9 worker: the rerun finished, each row written once, bad rows recorded once" \
	"$(state)" "$done_state"

# ---- 4. a worker terminated alone: the caller finishes its rows ----
reset_table
q -c "CALL osv5m_enrich('photos', 'img', 'loc', batch_size => 3, workers => 2)" >"$dir/call4.out" 2>&1 &
call=$!
wait_rows 6
worker=$(q -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'osv5m enrich worker' LIMIT 1")
q -c "SELECT pg_terminate_backend($worker)" >/dev/null
wait $call
check "terminated worker: the CALL succeeded" "$(grep -c ERROR "$dir/call4.out")" 0
check "terminated worker: the caller did the rest, each row written once" "$(state)" "$done_state"

echo "enrich_jobs: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
