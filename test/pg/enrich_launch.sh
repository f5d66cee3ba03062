#!/bin/bash
# enrich_launch.sh: who may start osv5m_enrich's background workers, and
# how many (src/pg/enrich.c).
#
#   test/pg/enrich_launch.sh            (after make install; about 20 s)
#
# osv5m_enrich_launch(job, n) is callable by any role, so it must refuse
# (42501) unless the job is running, led by the calling backend and owned
# by the current role; osv5m.max_workers caps the workers of one call and
# those one role has running at once; osv5m_enrich_wait and
# osv5m_enrich_terminate touch only the caller's own workers of that job.
# Two login roles, alice and mallory, call the C functions directly, as an
# attacker would.  alice's workers are kept alive by a session that holds
# an ACCESS EXCLUSIVE lock on their table, so that they can be counted.
#
# Runs against the installed default version, or OSV5M_VERSION (e.g. 0.1.0;
# then osv5m_jobs gets the owner column the later versions have, and the
# tables are granted to PUBLIC as 0.1.0's README advised).  A role without
# LOGIN gets no workers (they could not connect as it).  Uses its own
# throwaway cluster (build/enrich-launch, port 55443, or
# $LAUNCH_TEST_DIR / $LAUNCH_TEST_PORT).  Prints "ok - NAME" or
# "FAIL - NAME: why"; the last line is "enrich-launch: N passed, N failed".
set -u
cd "$(dirname "$0")/../.."
root=$(pwd)
source test/pg/cluster.sh

dir=${LAUNCH_TEST_DIR:-$root/build/enrich-launch}
port=${LAUNCH_TEST_PORT:-55443}
img=$root/test/data/images/jpeg_224x224.jpg
version=${OSV5M_VERSION:-}
passed=0
failed=0
bg_pids=()

ok() { passed=$((passed + 1)); echo "ok - $1"; }
fail() { failed=$((failed + 1)); echo "FAIL - $1: $2"; }

# check NAME GOT WANT
check() {
	if [ "$2" = "$3" ]; then ok "$1"; else fail "$1" "got '$2', want '$3'"; fi
}

finish() {
	for p in "${bg_pids[@]}"; do kill "$p" 2>/dev/null; done
	cluster_stop "$dir"
	echo "enrich-launch: $passed passed, $failed failed"
	[ "$failed" -eq 0 ]
}
trap 'finish; exit 1' INT TERM

# psql as a role: sql ROLE ARGS...  (never waits more than 60 s)
sql() {
	local role=$1; shift
	timeout 60 psql -X -q -At -U "$role" -d launch "$@"
}

# Run statements (one per argument, each a whole line of psql input) as ROLE.
run() {
	local role=$1; shift
	printf '%s\n' "$@" | sql "$role" -f -
}

# "SQLSTATE message | detail" of the error statements of ROLE raise.
error_of() {
	local role=$1; shift
	printf '%s\n' "$@" | sql "$role" -v ON_ERROR_STOP=1 -v VERBOSITY=verbose -f - 2>&1 >/dev/null |
		sed -nE 's/^(psql:[^ ]* )?ERROR:  ([0-9A-Z]{5}): (.*)$/\2 \3/p; s/^DETAIL:  (.*)$/| \1/p' |
		tr '\n' ' ' | sed 's/ $//'
}

# Poll until QUERY (run as postgres) prints WANT, for at most 20 s.
wait_for() {
	local query=$1 want=$2 got
	for _ in $(seq 1 200); do
		got=$(sql postgres -c "$query")
		[ "$got" = "$want" ] && return 0
		sleep 0.1
	done
	echo "$got"
	return 1
}

workers_of() {
	echo "SELECT count(*) FROM pg_stat_activity
	       WHERE backend_type = 'osv5m enrich worker' AND usename = '$1'"
}

cluster_init "$dir" "$port" "osv5m.threads = 1" "max_worker_processes = 16" \
	"osv5m.model_path = '$root/test/models/tiny-gelu'" &&
	cluster_start "$dir" || {
	fail "setup" "could not start the cluster"
	finish
	exit 1
}
psql -X -q -d postgres -c "CREATE DATABASE launch" || { fail "setup" "createdb"; finish; exit 1; }
setup=$(sql postgres -v ON_ERROR_STOP=1 2>&1 <<SQL
SET client_min_messages = warning;
CREATE EXTENSION osv5m ${version:+VERSION '$version'} CASCADE;
CREATE ROLE alice LOGIN;
CREATE ROLE mallory LOGIN;
CREATE ROLE nologin NOLOGIN;
GRANT nologin TO alice;
CREATE TABLE photos (id serial PRIMARY KEY, img bytea NOT NULL, loc geography);
INSERT INTO photos (img) SELECT pg_read_binary_file('$img') FROM generate_series(1, 40);
GRANT SELECT, UPDATE ON photos TO alice, nologin;
CREATE TABLE photos2 AS SELECT * FROM photos;
ALTER TABLE photos2 ADD PRIMARY KEY (id);
GRANT SELECT, UPDATE ON photos2 TO alice;
CREATE TABLE mphotos (id serial PRIMARY KEY, img bytea NOT NULL, loc geography);
INSERT INTO mphotos (img) SELECT pg_read_binary_file('$img') FROM generate_series(1, 4);
ALTER TABLE mphotos OWNER TO mallory;
GRANT CREATE ON DATABASE launch TO mallory;
-- 0.1.0: the owner column of later versions, and 0.1.0's advised grants
DO \$\$
BEGIN
	IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'osv5m_jobs'::regclass
				   AND attname = 'owner') THEN
		ALTER TABLE osv5m_jobs ADD COLUMN owner regrole NOT NULL
			DEFAULT pg_catalog.to_regrole(pg_catalog.quote_ident(current_user));
		GRANT SELECT, INSERT, UPDATE, DELETE ON osv5m_jobs, osv5m_job_workers, osv5m_errors TO PUBLIC;
		GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO PUBLIC;
	END IF;
END
\$\$;
SQL
) || { fail "setup" "$setup"; finish; exit 1; }
echo "# osv5m $(sql postgres -c "SELECT extversion FROM pg_extension WHERE extname = 'osv5m'")"

# later versions record the run's physical tables
leaves=$(sql postgres -c "SELECT count(*) FROM pg_attribute WHERE attrelid = 'osv5m_jobs'::regclass AND attname = 'leaves'")

# A new running job on TABLE, led by the psql session that runs this.
new_job() {
	if [ "$leaves" = 1 ]; then
		echo "INSERT INTO osv5m_jobs (tbl, image_column, target_column, batch_size, workers, on_error, leaves)
		      VALUES ('$1', 'img', 'loc', 2, 0, 'skip', ARRAY['$1'::regclass]) RETURNING job_id \\gset"
	else
		echo "INSERT INTO osv5m_jobs (tbl, image_column, target_column, batch_size, workers, on_error)
		      VALUES ('$1', 'img', 'loc', 2, 0, 'skip') RETURNING job_id \\gset"
	fi
}

# ---- 1. only the owner's running job, from its leading backend ----
ajob=$(sql alice -c "$(new_job photos | sed 's/ \\gset//')")
mjob=$(sql mallory -c "$(new_job mphotos | sed 's/ \\gset//')")
got=$(error_of mallory "SELECT osv5m_enrich_launch($ajob, 2);")
check "another role's job is refused" "${got%% *}" 42501
case $got in *"| Role \"mallory\" has no such job."*) ok "another role's job reads as missing" ;;
	*) fail "another role's job reads as missing" "$got" ;; esac
got=$(error_of mallory "SELECT osv5m_enrich_launch(987654, 2);")
check "a job that does not exist is refused" "${got%% *}" 42501
got=$(error_of mallory "SELECT osv5m_enrich_launch($mjob, 2);")
check "its own job led by another backend is refused" "${got%% *}" 42501
case $got in *"| The job is led by process "*) ok "the message names the leader" ;;
	*) fail "the message names the leader" "$got" ;; esac
got=$(error_of mallory "$(new_job mphotos)" "UPDATE osv5m_jobs SET status = 'done' WHERE job_id = :job_id;" \
	"SELECT osv5m_enrich_launch(:job_id, 2);")
case $got in "42501 permission denied to start background workers for osv5m_enrich job "*"| The job is not running.")
	ok "its own finished job is refused" ;;
	*) fail "its own finished job is refused" "$got" ;; esac
got=$(sql postgres -c "SELECT count(*) FROM osv5m_job_workers")
check "no worker ever started for the refused calls" "$got" 0
# a superuser on alice's job: still not the owner
got=$(error_of postgres "SELECT osv5m_enrich_launch($ajob, 2);")
check "a superuser is refused another role's job too" "${got%% *}" 42501
# search_path cannot redirect the check: a forged job table and an
# operator = that says yes, in a schema first on the path
got=$(error_of mallory "CREATE SCHEMA m;" \
	"CREATE TABLE m.osv5m_jobs (job_id bigint, status text, leader_pid int DEFAULT pg_backend_pid(), owner regrole DEFAULT to_regrole('mallory'));" \
	"INSERT INTO m.osv5m_jobs (job_id, status) VALUES ($ajob, 'running');" \
	"CREATE FUNCTION m.yes(bigint, bigint) RETURNS boolean LANGUAGE sql AS 'SELECT true';" \
	"CREATE OPERATOR m.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = m.yes);" \
	"SET search_path = m, pg_catalog, public;" \
	"SELECT public.osv5m_enrich_launch($ajob, 2);")
case $got in "42501 permission denied to start background workers for osv5m_enrich job $ajob | Role \"mallory\" has no such job.")
	ok "a forged job table and operator first on search_path change nothing" ;;
	*) fail "a forged job table and operator first on search_path change nothing" "$got" ;; esac

# ---- 2. osv5m.max_workers: per call and per role ----
# the lock keeps alice's workers waiting on photos, alive and countable
run postgres "BEGIN;" "LOCK TABLE photos IN ACCESS EXCLUSIVE MODE;" \
	"SELECT pg_sleep(40);" "COMMIT;" >/dev/null 2>&1 &
bg_pids+=($!)
wait_for "SELECT count(*) FROM pg_locks WHERE relation = 'photos'::regclass AND mode = 'AccessExclusiveLock' AND granted" 1 >/dev/null ||
	fail "lock holder" "no lock"
out=$dir/a.out
run alice "$(new_job photos)" "SELECT osv5m_enrich_launch(:job_id, 8);" \
	"SELECT osv5m_enrich_wait(:job_id, 60000);" >"$out" 2>&1 &
bg_pids+=($!)
alice_a=$!
if got=$(wait_for "$(workers_of alice)" 4); then
	ok "a request of 8 starts osv5m.max_workers = 4 workers"
else
	fail "a request of 8 starts osv5m.max_workers = 4 workers" "$got running"
fi
got=$(sql postgres -c "SELECT DISTINCT usename FROM pg_stat_activity WHERE backend_type = 'osv5m enrich worker'")
check "the workers run as the job's owner" "$got" alice
# psql writes the NOTICE when the launch returns: wait for it (deadline 60 s)
for _ in $(seq 1 600); do
	grep -q "background workers reduced" "$out" && break
	sleep 0.1
done
case $(cat "$out") in *"NOTICE:  osv5m_enrich job "*": background workers reduced from 8 to 4"*)
	ok "a NOTICE says the request was reduced" ;;
	*) fail "a NOTICE says the request was reduced" "$(tr '\n' ' ' <"$out")" ;; esac
ajob_a=$(sql postgres -c "SELECT max(job_id) FROM osv5m_jobs WHERE tbl = 'photos'::regclass")

# a second run of alice: the role already has 4
got=$(run alice "$(new_job photos)" "SELECT osv5m_enrich_launch(:job_id, 2);" \
	"SELECT osv5m_enrich_terminate(:job_id);" 2>&1 | tr '\n' ' ')
case $got in *"background workers reduced from 2 to 0"*"already has 4 background workers running"*" 0  ")
	ok "the role's second run gets no worker, with a NOTICE" ;;
	*) fail "the role's second run gets no worker, with a NOTICE" "$got" ;; esac
# with room for 2 more, a request of 3 gets 2
got=$(run postgres "SET osv5m.max_workers = 6;" "SET ROLE alice;" "$(new_job photos)" \
	"SELECT osv5m_enrich_launch(:job_id, 3);" "SELECT osv5m_enrich_terminate(:job_id);" 2>&1 | tr '\n' ' ')
case $got in *"reduced from 3 to 2"*" 2  ") ok "a request is cut to the role's room left" ;;
	*) fail "a request is cut to the role's room left" "$got" ;; esac
got=$(error_of alice "SELECT osv5m_enrich_wait(0, 0);" "SET osv5m.max_workers = 64;")
check "osv5m.max_workers is superuser-only" "${got%% *}" 42501

# another role is not limited by alice's workers
got=$(run mallory "$(new_job mphotos)" "SELECT osv5m_enrich_launch(:job_id, 2);" \
	"SELECT osv5m_enrich_wait(:job_id, 30000);" 2>&1 | tr '\n' ' ')
check "another role's run starts its own workers" "$got" "2 0 "

# ---- 3. wait and terminate touch only this backend's workers of the job ----
got=$(run mallory "SELECT osv5m_enrich_terminate($ajob_a);" "SELECT osv5m_enrich_wait($ajob_a, 10);" 2>&1 | tr '\n' ' ')
check "another role's terminate and wait do nothing" "$got" " 0 "
got=$(run alice "SELECT osv5m_enrich_terminate($ajob_a);" "SELECT osv5m_enrich_wait($ajob_a, 10);" 2>&1 | tr '\n' ' ')
check "nor do the owner's from another session" "$got" " 0 "
sleep 0.5
check "the workers ran on after both" "$(sql postgres -c "$(workers_of alice)")" 4

# release the lock: alice's run finishes, its wait returns 0
sql postgres -c "SELECT pg_cancel_backend(pid) FROM pg_locks WHERE relation = 'photos'::regclass AND granted AND mode = 'AccessExclusiveLock'" >/dev/null
wait "$alice_a"
check "the run's own wait sees its workers finish" "$(grep -xE '[0-9]+' "$out" | tr '\n' ' ')" "4 0 "
check "every row was geolocated by the workers" "$(sql postgres -c "SELECT count(*) FROM photos WHERE loc IS NULL")" 0
check "no worker failed" "$(sql postgres -c "SELECT count(*) FROM osv5m_job_workers WHERE status = 'failed'")" 0

# launches of one role at the same moment share the cap, never exceed it
run postgres "BEGIN;" "LOCK TABLE photos2 IN ACCESS EXCLUSIVE MODE;" \
	"SELECT pg_sleep(40);" "COMMIT;" >/dev/null 2>&1 &
bg_pids+=($!)
wait_for "SELECT count(*) FROM pg_locks WHERE relation = 'photos2'::regclass AND mode = 'AccessExclusiveLock' AND granted" 1 >/dev/null ||
	fail "lock holder" "no lock on photos2"
racers=()
for i in 1 2 3; do
	run alice "$(new_job photos2)" "SELECT osv5m_enrich_launch(:job_id, 4);" \
		"SELECT osv5m_enrich_wait(:job_id, 60000);" >"$dir/race$i.out" 2>&1 &
	bg_pids+=($!)
	racers+=($!)
done
# until each has returned from its launch (its first line of output)
for _ in $(seq 1 200); do
	n=0
	for i in 1 2 3; do grep -qxE '[0-9]+' "$dir/race$i.out" && n=$((n + 1)); done
	[ $n -eq 3 ] && break
	sleep 0.1
done
sleep ${RACE_SLEEP:-0.5}
check "3 simultaneous launches of one role start 4 workers in all" "$(sql postgres -c "$(workers_of alice)")" 4
sql postgres -c "SELECT pg_cancel_backend(pid) FROM pg_locks WHERE relation = 'photos2'::regclass AND granted AND mode = 'AccessExclusiveLock'" >/dev/null
wait "${racers[@]}"
started=$(cat "$dir"/race*.out | grep -xE '[0-9]+' | awk 'NR % 2 == 1 { s += $1 } END { print s }')
check "and report 4 started in all" "$started" 4

# a role without LOGIN (used through SET ROLE) gets no workers, which
# could not connect as it, and a NOTICE
got=$(run alice "SET ROLE nologin;" "$(new_job photos)" "SELECT osv5m_enrich_launch(:job_id, 2);" 2>&1 | tr '\n' ' ')
case $got in *"no background workers for role \"nologin\""*"cannot log in"*" 0 ") ok "a role without LOGIN gets no worker, with a NOTICE" ;;
	*) fail "a role without LOGIN gets no worker, with a NOTICE" "$got" ;; esac

# a placeholder set before the library is loaded does not raise the cap
got=$(run alice "SET osv5m.max_workers = 64;" "$(new_job photos)" \
	"SELECT osv5m_enrich_launch(:job_id, 8);" "SELECT osv5m_enrich_wait(:job_id, 30000);" 2>&1 | tr '\n' ' ')
case $got in *"reduced from 8 to 4"*" 4 0 ") ok "a non-superuser's placeholder setting does not raise the cap" ;;
	*) fail "a non-superuser's placeholder setting does not raise the cap" "$got" ;; esac

if out=$(test/pg/hostile_log.sh "$dir/server.log"); then ok "no crashed server process"; else fail "no crashed server process" "$out"; fi
finish
