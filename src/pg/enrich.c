/*
 * enrich.c: the background workers of osv5m_enrich().
 *
 * osv5m_enrich(..., workers => N) (osv5m--0.1.0.sql) registers the run in
 * osv5m_jobs, commits, and calls osv5m_enrich_launch() to start N dynamic
 * background workers.  Worker w (1..N) connects to the caller's database as
 * the caller's user, takes the caller's osv5m.* settings and the run's
 * osv5m.precision as osv5m_jobs records them (osv5m_enrich_worker_setup),
 * whatever its own role or database sets, and calls the SQL
 * function osv5m_enrich_batch(job, w, N) in a loop, one transaction per
 * batch, until a batch finds nothing left in its share of the rows; then
 * osv5m_enrich_batch(job, w, 1), which takes any row no process holds,
 * until nothing is left at all.  The
 * caller polls with osv5m_enrich_wait(), which returns after at most the
 * given time so that the caller can commit, report progress and check for
 * a failed worker between waits.
 *
 * Who may start workers: osv5m_enrich_launch is callable by anyone, so it
 * checks the job itself.  It starts workers only for a job whose row in
 * osv5m_jobs says it is running, led by this backend (leader_pid) and owned
 * by the current role (owner); the workers then run as that role, so no
 * role can make workers act for another.  osv5m.max_workers caps both the
 * workers of one job and those one role has running at once, over all its
 * jobs and databases; a larger request is reduced with a NOTICE.  To count
 * exactly, launches of one role are serialized by a lock, and each waits
 * until its workers show in pg_stat_activity (or have stopped) before it
 * lets the next count.  osv5m_enrich_wait and osv5m_enrich_terminate act
 * only on workers this backend launched for the job named: the handles
 * live in this backend's memory, so no backend can reach another's.
 *
 * Invariants:
 *  - all the row logic is in SQL (osv5m_enrich_batch): a worker only runs
 *    transactions around it, so a worker and the caller write rows exactly
 *    alike;
 *  - at most one run's workers are tracked per backend, in TopMemoryContext;
 *    they are terminated when the caller's transaction aborts (a cancel, an
 *    error) and when the caller's backend exits, so no worker outlives the
 *    CALL that started it;
 *  - a worker that fails records the error (SQLSTATE, message, detail,
 *    hint) in osv5m_job_workers before it exits, because a dynamic worker's
 *    exit status does not reach the backend that started it;
 *  - a worker asked to stop (SIGTERM from the caller or from a shutdown)
 *    treats it as a cancel: the batch in flight fails at the next interrupt
 *    check (inference polls between blocks), is rolled back, and the worker
 *    exits with status 0.  So it loses at most that batch, and the server
 *    log shows no "exited with exit code 1" for a normal stop.
 */
#include "postgres.h"

#include <signal.h>

#include "access/xact.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "osv5m_pg.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lock.h"
#include "utils/backend_status.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

/* Same bound as the SQL procedure checks, and osv5m.max_workers' maximum. */
#define ENRICH_MAX_WORKERS 64

/* bgw_type of the workers: pg_stat_activity's backend_type. */
#define ENRICH_WORKER_TYPE "osv5m enrich worker"

/*
 * How long a launch waits for its workers to show in pg_stat_activity
 * (they normally do within milliseconds; one that never does only makes
 * the next launch of the role count it too late).
 */
#define ENRICH_VISIBLE_TIMEOUT_MS 10000

/*
 * The lock that serializes the launches of one role: an advisory lock tag
 * with database 0, which no user advisory lock has (those carry the
 * database's OID), so it is cluster-wide like roles and never collides.
 */
#define ENRICH_LOCK_KEY 0x6f737635	/* "osv5" */
#define ENRICH_LOCK_CLASS 3		/* pg_advisory_lock uses 1 and 2 */

/* What a worker needs to know, passed in BackgroundWorker.bgw_extra. */
typedef struct EnrichWorkerArgs
{
	int64		job;			/* osv5m_jobs.job_id */
	int32		nparts;			/* number of workers sharing the rows */
	Oid			database;		/* the caller's database */
	Oid			role;			/* the caller's current user */
	Oid			schema;			/* where the extension's functions are */
} EnrichWorkerArgs;

StaticAssertDecl(sizeof(EnrichWorkerArgs) <= BGW_EXTRALEN,
				 "EnrichWorkerArgs must fit in bgw_extra");

/* The workers of the run this backend leads, if any. */
static int64 launched_job = 0;
static int	launched_count = 0;
static BackgroundWorkerHandle *launched[ENRICH_MAX_WORKERS];
static bool callbacks_registered = false;

/* Set in a worker by SIGTERM. */
static volatile sig_atomic_t got_sigterm = false;

PG_FUNCTION_INFO_V1(osv5m_enrich_launch);
PG_FUNCTION_INFO_V1(osv5m_enrich_wait);
PG_FUNCTION_INFO_V1(osv5m_enrich_terminate);
PGDLLEXPORT void osv5m_enrich_worker_main(Datum main_arg);

/* Ask the postmaster to stop every tracked worker, and forget them. */
static void
TerminateLaunched(void)
{
	for (int i = 0; i < launched_count; i++)
	{
		TerminateBackgroundWorker(launched[i]);
		pfree(launched[i]);
	}
	launched_count = 0;
	launched_job = 0;
}

/*
 * A cancel or an error in the caller aborts its transaction: stop the
 * workers then, or they would go on writing after the CALL has failed.
 * Commits are normal (the procedure commits between waits).
 */
static void
EnrichXactCallback(XactEvent event, void *arg)
{
	if ((event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT) &&
		launched_count > 0)
		TerminateLaunched();
}

/* The caller's backend is exiting (terminated, disconnected). */
static void
EnrichExitCallback(int code, Datum arg)
{
	if (launched_count > 0)
		TerminateLaunched();
}

/* "$libdir/osv5m" or wherever the calling C function's library is. */
static void
LibraryOfFunction(Oid fn_oid, char *out, size_t size)
{
	HeapTuple	tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(fn_oid));
	bool		isnull;
	Datum		probin;
	char	   *path;

	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for function %u", fn_oid);
	probin = SysCacheGetAttr(PROCOID, tup, Anum_pg_proc_probin, &isnull);
	if (isnull)
		elog(ERROR, "function %u has no library", fn_oid);
	path = TextDatumGetCString(probin);
	if (strlen(path) >= size)
		ereport(ERROR,
				(errcode(ERRCODE_NAME_TOO_LONG),
				 errmsg("library path \"%s\" is too long for a background worker", path)));
	strlcpy(out, path, size);
	pfree(path);
	ReleaseSysCache(tup);
}

/*
 * Register nworkers workers for job, sharing the rows nparts ways.  Returns
 * how many the postmaster accepted (all, or the first few when it ran out
 * of worker slots).
 */
static int
RegisterWorkers(int64 job, int nworkers, int nparts, Oid fn_oid, Oid schema)
{
	BackgroundWorker worker;
	EnrichWorkerArgs args;
	MemoryContext old;
	int			n = 0;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	/* never restarted: after a crash the caller is gone too; a rerun resumes */
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	LibraryOfFunction(fn_oid, worker.bgw_library_name, BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "osv5m_enrich_worker_main", BGW_MAXLEN);
	strlcpy(worker.bgw_type, ENRICH_WORKER_TYPE, BGW_MAXLEN);
	/* the postmaster sets our latch when a worker starts or stops */
	worker.bgw_notify_pid = MyProcPid;

	memset(&args, 0, sizeof(args));
	args.job = job;
	args.nparts = nparts;
	args.database = MyDatabaseId;
	args.role = GetUserId();
	args.schema = schema;
	memcpy(worker.bgw_extra, &args, sizeof(args));

	/* the handles must survive the caller's commits between waits */
	old = MemoryContextSwitchTo(TopMemoryContext);
	for (int w = 1; w <= nworkers; w++)
	{
		BackgroundWorkerHandle *handle;

		snprintf(worker.bgw_name, BGW_MAXLEN,
				 "osv5m enrich worker %d of job " INT64_FORMAT, w, job);
		worker.bgw_main_arg = Int32GetDatum(w);
		if (!RegisterDynamicBackgroundWorker(&worker, &handle))
			break;
		launched[launched_count++] = handle;
		n++;
	}
	MemoryContextSwitchTo(old);
	return n;
}

/*
 * Refuse unless job is a running job led by this backend and owned by the
 * current role.  The row is read with SPI as the current role: row-level
 * security may hide other roles' jobs, which then "do not exist".  The
 * query names everything by schema (the extension's, pg_catalog's
 * operator), so search_path cannot redirect it.
 *
 * Between "make install" of a new library and ALTER EXTENSION osv5m
 * UPDATE, sessions run this code over the 0.1.0 tables, which record no
 * owner: the job must then still be running and led by this backend.
 */
static void
CheckJobIsOurs(int64 job, Oid schema)
{
	enum
	{
		JOB_OURS,
		JOB_NOT_OURS,			/* missing, hidden, or another role's */
		JOB_NOT_RUNNING,
		JOB_OTHER_LEADER
	}			verdict = JOB_OURS;
	Oid			role = GetUserId();
	char	   *nspname = get_namespace_name(schema);
	StringInfoData sql;
	Oid			types[1] = {INT8OID};
	Datum		values[1];
	int			leader = 0;
	int			rc;
	Oid			jobs_rel;
	bool		has_owner;

	if (nspname == NULL)
		elog(ERROR, "cache lookup failed for schema %u", schema);
	jobs_rel = get_relname_relid("osv5m_jobs", schema);
	has_owner = OidIsValid(jobs_rel) &&
		get_attnum(jobs_rel, "owner") != InvalidAttrNumber;
	initStringInfo(&sql);
	appendStringInfo(&sql,
					 "SELECT j.status, j.leader_pid, %s FROM %s.osv5m_jobs j"
					 " WHERE j.job_id OPERATOR(pg_catalog.=) $1",
					 has_owner ? "j.owner" : "NULL::pg_catalog.oid",
					 quote_identifier(nspname));
	values[0] = Int64GetDatum(job);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	rc = SPI_execute_with_args(sql.data, 1, types, values, NULL, false, 1);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "reading osv5m_jobs failed: %s", SPI_result_code_string(rc));
	if (SPI_processed == 0)
		verdict = JOB_NOT_OURS;
	else
	{
		HeapTuple	tup = SPI_tuptable->vals[0];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull[3];
		Datum		status = SPI_getbinval(tup, desc, 1, &isnull[0]);
		Datum		pid = SPI_getbinval(tup, desc, 2, &isnull[1]);
		Datum		owner = SPI_getbinval(tup, desc, 3, &isnull[2]);

		/* compared in C: no operator of anyone's choosing runs */
		if (has_owner && (isnull[2] || DatumGetObjectId(owner) != role))
			verdict = JOB_NOT_OURS;
		else if (isnull[0] || strcmp(TextDatumGetCString(status), "running") != 0)
			verdict = JOB_NOT_RUNNING;
		else if (isnull[1] || DatumGetInt32(pid) != MyProcPid)
		{
			verdict = JOB_OTHER_LEADER;
			leader = isnull[1] ? 0 : DatumGetInt32(pid);
		}
	}
	SPI_finish();
	if (verdict == JOB_OURS)
		return;

	/* another role's job reads as missing: its existence is not told */
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("permission denied to start background workers for osv5m_enrich job " INT64_FORMAT,
					job),
			 verdict == JOB_NOT_OURS ?
			 errdetail("Role \"%s\" has no such job.", GetUserNameFromId(role, false)) :
			 verdict == JOB_NOT_RUNNING ?
			 errdetail("The job is not running.") :
			 errdetail("The job is led by process %d, not by this one.", leader),
			 errhint("Background workers are started by osv5m_enrich() in the session that runs it.")));
}

/*
 * The osv5m enrich workers running as role in the whole cluster, as
 * pg_stat_activity would show them (backend_type ENRICH_WORKER_TYPE,
 * usesysid role), read afresh: the backend status snapshot is otherwise
 * kept until the end of the transaction.  *seen (if pids) tells how many of
 * pids[0..npids) are among them.
 */
static int
CountRoleWorkers(Oid role, const pid_t *pids, int npids, int *seen)
{
	int			count = 0;
	int			nbackends;

	pgstat_clear_backend_activity_snapshot();
	nbackends = pgstat_fetch_stat_numbackends();
	if (seen != NULL)
		*seen = 0;
	for (int i = 1; i <= nbackends; i++)
	{
		LocalPgBackendStatus *local = pgstat_fetch_stat_local_beentry(i);
		PgBackendStatus *be;
		const char *type;

		if (local == NULL)
			continue;
		be = &local->backendStatus;
		if (be->st_backendType != B_BG_WORKER || be->st_userid != role)
			continue;
		type = GetBackgroundWorkerTypeByPid(be->st_procpid);
		if (type == NULL || strcmp(type, ENRICH_WORKER_TYPE) != 0)
			continue;
		count++;
		for (int k = 0; k < npids && seen != NULL; k++)
			if (pids[k] == be->st_procpid)
				(*seen)++;
	}
	pgstat_clear_backend_activity_snapshot();
	return count;
}

/*
 * Wait until every launched worker is counted by CountRoleWorkers or has
 * stopped, so that the next launch of this role, which waits for our lock,
 * counts them.  A worker shows there only once it has connected, a few
 * milliseconds after the postmaster started it.
 */
static void
WaitUntilCounted(Oid role)
{
	pid_t		pids[ENRICH_MAX_WORKERS];
	int			npids = 0;
	TimestampTz deadline;

	for (int i = 0; i < launched_count; i++)
	{
		pid_t		pid;

		if (WaitForBackgroundWorkerStartup(launched[i], &pid) == BGWH_STARTED)
			pids[npids++] = pid;
	}
	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
										   ENRICH_VISIBLE_TIMEOUT_MS);
	for (;;)
	{
		int			seen;
		int			stopped = 0;

		CHECK_FOR_INTERRUPTS();
		(void) CountRoleWorkers(role, pids, npids, &seen);
		for (int i = 0; i < launched_count; i++)
		{
			pid_t		pid;

			if (GetBackgroundWorkerPid(launched[i], &pid) == BGWH_STOPPED)
				stopped++;
		}
		/* a stopped worker may still be counted: then it is in both */
		if (seen + stopped >= npids)
			return;
		if (TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline) <= 0)
		{
			elog(LOG, "osv5m: %d of %d background workers did not show in pg_stat_activity within %d ms",
				 npids - seen - stopped, npids, ENRICH_VISIBLE_TIMEOUT_MS);
			return;
		}
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 5, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

/*
 * Can role log in?  A background worker connects as the job's owner, and
 * PostgreSQL 15 refuses a role without LOGIN there as at any login (the
 * worker would die at once with a FATAL error).
 */
static bool
RoleCanLogin(Oid role)
{
	HeapTuple	tup = SearchSysCache1(AUTHOID, ObjectIdGetDatum(role));
	bool		can;

	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for role %u", role);
	can = ((Form_pg_authid) GETSTRUCT(tup))->rolcanlogin;
	ReleaseSysCache(tup);
	return can;
}

/*
 * osv5m_enrich_launch(job bigint, workers int) RETURNS int: start the
 * workers of a run and return how many started.  Only for a running job
 * that this backend leads and the current role owns (ERROR otherwise).
 * The request is cut to osv5m.max_workers, less the workers the role
 * already has running (a NOTICE says so), and to none for a role that
 * cannot log in, as workers must; when the postmaster has fewer
 * free slots than that, the rows are shared among those it has.
 */
Datum
osv5m_enrich_launch(PG_FUNCTION_ARGS)
{
	int64		job = PG_GETARG_INT64(0);
	int32		nworkers = PG_GETARG_INT32(1);
	Oid			fn_oid = fcinfo->flinfo->fn_oid;
	Oid			schema = get_func_namespace(fn_oid);
	Oid			role = GetUserId();
	LOCKTAG		tag;
	int			running;
	int			allowed;
	int			n;

	if (nworkers < 1 || nworkers > ENRICH_MAX_WORKERS)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("workers must be between 1 and %d, got %d",
						ENRICH_MAX_WORKERS, nworkers)));
	if (launched_count > 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("this session already runs osv5m_enrich job " INT64_FORMAT,
						launched_job)));
	if (!OidIsValid(schema))
		elog(ERROR, "cache lookup failed for function %u", fn_oid);
	CheckJobIsOurs(job, schema);
	if (!RoleCanLogin(role))
	{
		const char *rolename = GetUserNameFromId(role, false);

		ereport(NOTICE,
				(errmsg("osv5m_enrich job " INT64_FORMAT ": no background workers for role \"%s\"",
						job, rolename),
				 errdetail("Background workers connect as the role that runs the job, and role \"%s\" cannot log in.",
						   rolename),
				 errhint("Run osv5m_enrich as a role with LOGIN to use background workers.")));
		PG_RETURN_INT32(0);
	}

	/*
	 * One launch of this role at a time, until its workers are counted:
	 * two launches counting at once would both see room for the same
	 * workers.  A transaction lock, so that an error releases it.
	 */
	SET_LOCKTAG_ADVISORY(tag, InvalidOid, (uint32) role, ENRICH_LOCK_KEY, ENRICH_LOCK_CLASS);
	(void) LockAcquire(&tag, ExclusiveLock, false, false);

	running = CountRoleWorkers(role, NULL, 0, NULL);
	allowed = Min(nworkers, Max(osv5m_max_workers - running, 0));
	if (allowed < nworkers)
	{
		const char *rolename = GetUserNameFromId(role, false);

		if (nworkers > osv5m_max_workers && running == 0)
			ereport(NOTICE,
					(errmsg("osv5m_enrich job " INT64_FORMAT ": background workers reduced from %d to %d",
							job, nworkers, allowed),
					 errdetail("osv5m.max_workers allows %d background workers per run and per role.",
							   osv5m_max_workers),
					 errhint("A superuser can raise osv5m.max_workers.")));
		else
			ereport(NOTICE,
					(errmsg("osv5m_enrich job " INT64_FORMAT ": background workers reduced from %d to %d",
							job, nworkers, allowed),
					 errdetail("Role \"%s\" already has %d background workers running, and osv5m.max_workers allows %d per role.",
							   rolename, running, osv5m_max_workers),
					 errhint("Wait for the role's other runs to finish, or have a superuser raise osv5m.max_workers.")));
	}
	if (allowed == 0)
	{
		LockRelease(&tag, ExclusiveLock, false);
		PG_RETURN_INT32(0);
	}

	if (!callbacks_registered)
	{
		RegisterXactCallback(EnrichXactCallback, NULL);
		before_shmem_exit(EnrichExitCallback, (Datum) 0);
		callbacks_registered = true;
	}

	launched_job = job;
	n = RegisterWorkers(job, allowed, allowed, fn_oid, schema);
	if (n > 0 && n < allowed)
	{
		/*
		 * Too few slots: the rows were split `allowed` ways, so some shares
		 * have no worker.  Stop those started and split the rows again
		 * among as many as there are.  Whatever the stopped ones did is
		 * committed or rolled back whole, so nothing is lost or doubled.
		 */
		for (int i = 0; i < launched_count; i++)
		{
			TerminateBackgroundWorker(launched[i]);
			(void) WaitForBackgroundWorkerShutdown(launched[i]);
			pfree(launched[i]);
		}
		launched_count = 0;
		n = RegisterWorkers(job, n, n, fn_oid, schema);
	}
	if (n == 0)
		launched_job = 0;
	WaitUntilCounted(role);
	LockRelease(&tag, ExclusiveLock, false);
	PG_RETURN_INT32(n);
}

/*
 * osv5m_enrich_wait(job bigint, timeout_ms int) RETURNS int: wait until the
 * run's workers have all stopped or timeout_ms has passed; returns how many
 * are still running.  Interruptible: a cancel raises here, the transaction
 * aborts and EnrichXactCallback stops the workers.  Only this backend's
 * workers of job are waited for: for any other job (another backend's, or
 * one whose workers have all stopped) it returns 0 at once.
 */
Datum
osv5m_enrich_wait(PG_FUNCTION_ARGS)
{
	int64		job = PG_GETARG_INT64(0);
	int32		timeout_ms = PG_GETARG_INT32(1);
	TimestampTz deadline;

	if (launched_count == 0 || launched_job != job)
		PG_RETURN_INT32(0);
	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), Max(timeout_ms, 0));

	for (;;)
	{
		int			running = 0;
		long		remaining;

		CHECK_FOR_INTERRUPTS();
		for (int i = 0; i < launched_count; i++)
		{
			pid_t		pid;

			if (GetBackgroundWorkerPid(launched[i], &pid) != BGWH_STOPPED)
				running++;
		}
		if (running == 0)
		{
			/* all stopped: this returns at once, and releases the slots */
			for (int i = 0; i < launched_count; i++)
			{
				(void) WaitForBackgroundWorkerShutdown(launched[i]);
				pfree(launched[i]);
			}
			launched_count = 0;
			launched_job = 0;
			PG_RETURN_INT32(0);
		}

		remaining = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline);
		if (remaining <= 0)
			PG_RETURN_INT32(running);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 remaining, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

/*
 * osv5m_enrich_terminate(job bigint): stop the run's workers now.  Only
 * workers this backend launched for job: for any other job it does
 * nothing (no error, since the procedure calls it after its workers may
 * all have stopped).
 */
Datum
osv5m_enrich_terminate(PG_FUNCTION_ARGS)
{
	int64		job = PG_GETARG_INT64(0);

	if (launched_count > 0 && launched_job == job)
		TerminateLaunched();
	PG_RETURN_VOID();
}

/*
 * Run one SELECT in a transaction of its own; with count, add up the two
 * int4 columns of its one row (osv5m_enrich_batch's done and failed).  All
 * memory is SPI's or the transaction's, freed at commit.
 */
static void
RunInTransaction(const char *sql, int nargs, Oid *types, Datum *values,
				 int *count)
{
	int			rc;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, sql);

	rc = SPI_execute_with_args(sql, nargs, types, values, NULL, false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "osv5m enrich worker: \"%s\" failed: %s", sql,
			 SPI_result_code_string(rc));
	if (count != NULL)
	{
		bool		isnull1,
					isnull2;
		int32		done,
					failed;

		if (SPI_processed != 1)
			elog(ERROR, "osv5m enrich worker: \"%s\" returned no row", sql);
		done = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0],
										   SPI_tuptable->tupdesc, 1, &isnull1));
		failed = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0],
											 SPI_tuptable->tupdesc, 2, &isnull2));
		*count = (isnull1 ? 0 : done) + (isnull2 ? 0 : failed);
	}

	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * SIGTERM in a worker: raise a query cancel, which CHECK_FOR_INTERRUPTS and
 * the inference's abort callback both honour, and remember why, so that
 * the error it raises ends the worker quietly.  (die() would end it with a
 * FATAL and exit status 1, logged by the postmaster like a failure.)
 */
static void
EnrichSigterm(SIGNAL_ARGS)
{
	int			save_errno = errno;

	got_sigterm = true;
	QueryCancelPending = true;
	InterruptPending = true;
	SetLatch(MyLatch);
	errno = save_errno;
}

/* Entry point of a worker: batches until its share, then all the rows, are done. */
void
osv5m_enrich_worker_main(Datum main_arg)
{
	int32		worker = DatumGetInt32(main_arg);
	EnrichWorkerArgs args;
	char	   *schema;
	StringInfoData setup_sql,
				batch_sql,
				done_sql;
	Oid			types[3] = {INT8OID, INT4OID, INT4OID};
	Datum		values[3];

	memcpy(&args, MyBgworkerEntry->bgw_extra, sizeof(args));

	pqsignal(SIGTERM, EnrichSigterm);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnectionByOid(args.database, args.role, 0);
	pgstat_report_appname("osv5m enrich worker");

	/* the schema's name, quoted, for statements built once */
	StartTransactionCommand();
	schema = get_namespace_name(args.schema);
	if (schema == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_SCHEMA),
				 errmsg("schema %u of extension osv5m does not exist", args.schema)));
	schema = MemoryContextStrdup(TopMemoryContext, quote_identifier(schema));
	CommitTransactionCommand();

	initStringInfo(&setup_sql);
	appendStringInfo(&setup_sql, "SELECT %s.osv5m_enrich_worker_setup($1, $2)", schema);
	initStringInfo(&batch_sql);
	appendStringInfo(&batch_sql, "SELECT done, failed FROM %s.osv5m_enrich_batch($1, $2, $3)", schema);
	initStringInfo(&done_sql);
	appendStringInfo(&done_sql, "SELECT %s.osv5m_enrich_worker_done($1, $2)", schema);

	values[0] = Int64GetDatum(args.job);
	values[1] = Int32GetDatum(worker);
	values[2] = Int32GetDatum(args.nparts);

	PG_TRY();
	{
		int			count;

		RunInTransaction(setup_sql.data, 2, types, values, NULL);
		for (;;)
		{
			CHECK_FOR_INTERRUPTS();
			if (got_sigterm)
				break;
			RunInTransaction(batch_sql.data, 3, types, values, &count);
			if (count > 0)
				continue;
			if (DatumGetInt32(values[2]) == 1)
				break;

			/*
			 * Its share is done: help with the others' rows that nobody has
			 * locked yet (nparts 1 takes any row), so that no core sits idle
			 * while another worker still has rows to go.
			 */
			values[2] = Int32GetDatum(1);
		}
		if (!got_sigterm)
			RunInTransaction(done_sql.data, 2, types, values, NULL);
	}
	PG_CATCH();
	{
		/*
		 * Keep the error for the caller: copy it out of ErrorContext, roll
		 * back the batch, and record it in a transaction of its own.  An
		 * error while recording it ends the worker with that error instead;
		 * the caller then sees a worker that stopped without finishing, and
		 * does its rows itself.
		 */
		ErrorData  *edata;
		Oid			etypes[6] = {INT8OID, INT4OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID};
		Datum		evalues[6];
		char		enulls[6] = {' ', ' ', ' ', ' ', ' ', ' '};
		StringInfoData fail_sql;
		int			rc;

		MemoryContextSwitchTo(TopMemoryContext);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		if (got_sigterm)
		{
			/* asked to stop: the error is the cancel we raised ourselves */
			ereport(LOG,
					(errmsg("osv5m enrich worker %d of job " INT64_FORMAT " stopped on request",
							worker, args.job)));
			proc_exit(0);
		}

		evalues[0] = Int64GetDatum(args.job);
		evalues[1] = Int32GetDatum(worker);
		evalues[2] = CStringGetTextDatum(unpack_sql_state(edata->sqlerrcode));
		evalues[3] = CStringGetTextDatum(edata->message ? edata->message : "unknown error");
		evalues[4] = edata->detail ? CStringGetTextDatum(edata->detail) : (Datum) 0;
		evalues[5] = edata->hint ? CStringGetTextDatum(edata->hint) : (Datum) 0;
		if (edata->detail == NULL)
			enulls[4] = 'n';
		if (edata->hint == NULL)
			enulls[5] = 'n';
		initStringInfo(&fail_sql);
		appendStringInfo(&fail_sql,
						 "SELECT %s.osv5m_enrich_worker_done($1, $2, $3, $4, $5, $6)", schema);

		StartTransactionCommand();
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		PushActiveSnapshot(GetTransactionSnapshot());
		rc = SPI_execute_with_args(fail_sql.data, 6, etypes, evalues, enulls, false, 0);
		if (rc != SPI_OK_SELECT)
			elog(ERROR, "osv5m enrich worker: recording the error failed: %s",
				 SPI_result_code_string(rc));
		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();

		/* and in the server log, where a worker's errors normally go */
		ereport(LOG,
				(errmsg("osv5m enrich worker %d of job " INT64_FORMAT " stopped: %s",
						worker, args.job, edata->message ? edata->message : "unknown error")));
		/* 0: the failure is reported through the table, not the exit code */
		proc_exit(0);
	}
	PG_END_TRY();

	if (got_sigterm)
		ereport(LOG,
				(errmsg("osv5m enrich worker %d of job " INT64_FORMAT " stopped on request",
						worker, args.job)));
	proc_exit(0);
}
