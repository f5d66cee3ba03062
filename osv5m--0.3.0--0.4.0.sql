-- osv5m--0.3.0--0.4.0.sql: from version 0.3.0 to 0.4.0.
--
-- CREATE EXTENSION osv5m installs 0.1.0 and then runs the upgrade scripts
-- in turn, so a fresh install and an upgraded one are the same by
-- construction.
--
-- What 0.4.0 changes:
--  1. The setting osv5m.precision (fp32, the default, bf16 or int8)
--     chooses the arithmetic of the matrix products; bf16 and int8 are
--     faster and change the results (int8 more).  Each osv5m_enrich run records the precision it
--     runs in (osv5m_jobs.precision, shown by osv5m_progress), and its
--     background workers take that precision, not their own setting, so
--     all the rows of one run are computed alike.  Runs recorded before
--     0.4.0 ran in fp32, the only arithmetic there was, and say so.

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION osv5m UPDATE" to load this file. \quit

-- ==== the precision of a session ====

-- PL/pgSQL and column defaults cannot read osv5m.precision with
-- current_setting() before the library is loaded in the backend (the
-- setting is not defined yet); calling a C function loads it.
CREATE FUNCTION @extschema@.osv5m_enrich_precision()
RETURNS text
AS 'MODULE_PATHNAME', 'osv5m_enrich_precision'
LANGUAGE C STABLE PARALLEL SAFE;

COMMENT ON FUNCTION @extschema@.osv5m_enrich_precision() IS
'the setting osv5m.precision of this session (''fp32'', ''bf16'' or ''int8''), defined once the library is loaded';

-- ==== the precision of a run ====

-- Rows already there were computed in fp32.  New rows take the precision
-- of the session that registers the run: it is not among the columns a
-- role may give in INSERT (osv5m--0.1.0--0.2.0.sql), so the record is the
-- setting the run's own batches use.
ALTER TABLE @extschema@.osv5m_jobs
	ADD COLUMN precision text NOT NULL DEFAULT 'fp32'
		CONSTRAINT osv5m_jobs_precision CHECK (precision IN ('fp32', 'bf16', 'int8'));
ALTER TABLE @extschema@.osv5m_jobs
	ALTER COLUMN precision SET DEFAULT @extschema@.osv5m_enrich_precision();
COMMENT ON COLUMN @extschema@.osv5m_jobs.precision IS
'osv5m.precision of the run (fp32, bf16 or int8): the caller''s when it started; its background workers use it too';

-- Run in a background worker before its first batch: take the caller's
-- osv5m.* settings (only those osv5m_enrich_settings() records) and the
-- run's precision, and register the worker.  The worker runs as the job's
-- owner, so set_config() grants it no right its owner lacks, and
-- row-level security shows it no other role's job.  On a Citus node the
-- worker must see the shards, which Citus hides from the catalog queries
-- of ordinary sessions.
CREATE OR REPLACE FUNCTION @extschema@.osv5m_enrich_worker_setup(job bigint, worker integer)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s			record;
	j			@extschema@.osv5m_jobs;
BEGIN
	SELECT * INTO j FROM @extschema@.osv5m_jobs x WHERE x.job_id = job;
	IF NOT FOUND OR j.status <> 'running' THEN
		RAISE EXCEPTION 'osv5m_enrich job % is not a running job of role %', job, CURRENT_USER
			USING ERRCODE = 'insufficient_privilege';
	END IF;
	FOR s IN SELECT e.key, e.value FROM pg_catalog.jsonb_each_text(j.settings) e
	LOOP
		IF s.key NOT IN ('osv5m.model_path', 'osv5m.threads', 'osv5m.images_per_run', 'osv5m.max_pixels') THEN
			RAISE EXCEPTION 'osv5m_enrich job %: a worker does not take the setting "%"', job, s.key
				USING ERRCODE = 'insufficient_privilege';
		END IF;
		IF pg_catalog.current_setting(s.key, true) IS DISTINCT FROM s.value THEN
			PERFORM pg_catalog.set_config(s.key, s.value, false);
		END IF;
	END LOOP;
	-- the run's precision, whatever this worker's role or database sets:
	-- every row of one run is computed alike
	PERFORM pg_catalog.set_config('osv5m.precision', j.precision, false);
	IF pg_catalog.current_setting('citus.show_shards_for_app_name_prefixes', true) IS NOT NULL THEN
		PERFORM pg_catalog.set_config('citus.show_shards_for_app_name_prefixes', '*', false);
	END IF;
	INSERT INTO @extschema@.osv5m_job_workers AS w (job_id, worker, pid)
	VALUES (job, worker, pg_catalog.pg_backend_pid())
	ON CONFLICT ON CONSTRAINT osv5m_job_workers_pkey
	DO UPDATE SET pid = excluded.pid, status = 'running';
END
$$;

-- The view runs with the rights of whoever reads it, so row-level
-- security shows each role its own runs.  New column at the end:
-- precision.  (CREATE OR REPLACE VIEW resets the view's options: the
-- WITH clause keeps security_invoker.)
CREATE OR REPLACE VIEW @extschema@.osv5m_progress WITH (security_invoker = true) AS
SELECT j.job_id,
	   j.tbl AS table_name,
	   j.image_column,
	   j.target_column,
	   j.workers,
	   CASE WHEN j.status = 'running'
			 AND NOT @extschema@.osv5m_job_alive(j.leader_pid, j.started_at)
			THEN 'interrupted' ELSE j.status END AS status,
	   coalesce(w.done, 0) AS rows_done,
	   coalesce(w.failed, 0) AS rows_failed,
	   greatest(j.rows_total - coalesce(w.done, 0) - coalesce(w.failed, 0), 0) AS rows_left,
	   pg_catalog.round(r.rate::numeric, 2) AS rows_per_second,
	   CASE WHEN j.status = 'running' AND r.rate > 0
			THEN pg_catalog.make_interval(secs => pg_catalog.round(greatest(j.rows_total - coalesce(w.done, 0) - coalesce(w.failed, 0), 0) / r.rate))
			END AS time_left,
	   j.started_at,
	   coalesce(j.finished_at, w.last_update, j.started_at) AS updated_at,
	   j.error,
	   j.owner,
	   j.precision
  FROM @extschema@.osv5m_jobs j
  LEFT JOIN LATERAL (
	  SELECT pg_catalog.sum(x.rows_done) AS done, pg_catalog.sum(x.rows_failed) AS failed,
			 pg_catalog.max(x.updated_at) AS last_update
		FROM @extschema@.osv5m_job_workers x
	   WHERE x.job_id = j.job_id) w ON true
  CROSS JOIN LATERAL (
	  SELECT (coalesce(w.done, 0) + coalesce(w.failed, 0)) /
			 greatest(EXTRACT(epoch FROM coalesce(j.finished_at, w.last_update, j.started_at) - j.started_at), 0.001)::float8
			 AS rate) r;
