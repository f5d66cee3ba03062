-- osv5m--0.1.0--0.2.0.sql: from version 0.1.0 to 0.2.0.
--
-- There is no osv5m--0.2.0.sql: CREATE EXTENSION osv5m installs 0.1.0 and
-- then runs this file, so a fresh install and an upgraded one are the same
-- by construction, and every change below is one a user's data survives.
--
-- What 0.2.0 changes:
--  1. osv5m_enrich is correct on every kind of table.  A ctid is unique
--     only within one physical table, so a run now works leaf table by
--     leaf table (the table named, its partitions and inheritance children
--     at any depth), reads and writes each with FROM ONLY / UPDATE ONLY,
--     and writes a row only while its target is still NULL.  Errors are
--     recorded against the leaf table, with the MD5 of the image: a row
--     that failed is skipped later only while it still holds the same
--     bytes, so a new row that reuses a freed ctid is geolocated.  A
--     second run on rows a live run is working on is refused, so progress
--     tells the truth.
--  2. Job state belongs to its owner.  osv5m_jobs, osv5m_job_workers and
--     osv5m_errors record the role that started the run; row-level
--     security lets a role see and change only its own rows (superusers
--     see all; members of pg_monitor may read every run's progress), and
--     column privileges leave nothing a run re-reads (table, columns,
--     leaves, settings, owner, leader) changeable after it starts.  An
--     application role needs no grant on these tables.  Background
--     workers apply only the osv5m.* settings they need.
--  3. No search_path exposure: every function whose body is parsed at
--     call time runs with search_path = pg_catalog, pg_temp, and
--     osv5m_enrich (a procedure that commits, which cannot carry a SET
--     clause) sets it for each of its transactions.  Bodies written as
--     SQL-standard RETURN / BEGIN ATOMIC were bound when created.
--  4. Cells as exact lat/lon boxes: osv5m_cells() and geolocate_topk() add
--     a geometry column (SRID 4326) whose ST_Covers holds exactly the
--     points whose latitude and longitude lie inside the cell; the
--     geography rectangles (edges are great-circle arcs) are kept.
--  5. Scale out: when dblink is installed, the postgres_fdw foreign
--     tables of a run are enriched by their own servers, each by its own
--     osv5m_enrich started over dblink, concurrently with the local
--     tables (osv5m_job_remotes, osv5m_remote_progress(),
--     osv5m_remote_errors(); README, Scaling out).  Foreign tables of
--     other wrappers are refused.

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION osv5m UPDATE" to load this file. \quit

-- ==== job state and its owner ====

-- Who started each run.  Runs recorded by 0.1.0 did not say: they are
-- given to the owner of their table (or of the extension if it is gone).
ALTER TABLE @extschema@.osv5m_jobs
	ADD COLUMN owner regrole,
	ADD COLUMN leaves regclass[];
UPDATE @extschema@.osv5m_jobs j
   SET owner = coalesce((SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = j.tbl),
						(SELECT e.extowner FROM pg_catalog.pg_extension e WHERE e.extname = 'osv5m'))::pg_catalog.regrole,
	   leaves = ARRAY[j.tbl];
ALTER TABLE @extschema@.osv5m_jobs
	ALTER COLUMN owner SET DEFAULT pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER)),
	ALTER COLUMN owner SET NOT NULL,
	ALTER COLUMN leaves SET NOT NULL;
COMMENT ON COLUMN @extschema@.osv5m_jobs.owner IS 'the role that started the run; its workers run as this role';
COMMENT ON COLUMN @extschema@.osv5m_jobs.leaves IS 'the physical tables the run works on: tbl and its partitions and children, fixed when it starts';

-- Errors: the leaf table that holds the row (tbl), the image's MD5, and
-- whose run recorded them.  Errors of 0.1.0 have no MD5: they are matched
-- by key alone, as before (see README, Upgrading).
ALTER TABLE @extschema@.osv5m_errors
	ADD COLUMN owner regrole,
	ADD COLUMN image_md5 text;
UPDATE @extschema@.osv5m_errors e
   SET owner = coalesce((SELECT j.owner FROM @extschema@.osv5m_jobs j WHERE j.job_id = e.job_id),
						(SELECT c.relowner::pg_catalog.regrole FROM pg_catalog.pg_class c WHERE c.oid = e.tbl),
						(SELECT x.extowner::pg_catalog.regrole FROM pg_catalog.pg_extension x WHERE x.extname = 'osv5m'));
ALTER TABLE @extschema@.osv5m_errors
	ALTER COLUMN owner SET DEFAULT pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER)),
	ALTER COLUMN owner SET NOT NULL,
	DROP CONSTRAINT osv5m_errors_row,
	ADD CONSTRAINT osv5m_errors_row UNIQUE (owner, tbl, image_column, row_key);
COMMENT ON COLUMN @extschema@.osv5m_errors.tbl IS 'the physical table that holds the row (a partition or child of the table enriched)';
COMMENT ON COLUMN @extschema@.osv5m_errors.image_md5 IS 'MD5 of the image that failed: the row is skipped only while its image is the same';
COMMENT ON COLUMN @extschema@.osv5m_errors.owner IS 'the role whose run recorded the error';

-- Row-level security: a role sees and changes its own rows only.  The
-- tables' owner (the superuser who installed the extension) and other
-- superusers are not subject to it.
ALTER TABLE @extschema@.osv5m_jobs ENABLE ROW LEVEL SECURITY;
ALTER TABLE @extschema@.osv5m_job_workers ENABLE ROW LEVEL SECURITY;
ALTER TABLE @extschema@.osv5m_errors ENABLE ROW LEVEL SECURITY;

CREATE POLICY osv5m_own_jobs ON @extschema@.osv5m_jobs
	USING (owner = pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER)))
	WITH CHECK (owner = pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER)));
CREATE POLICY osv5m_monitor_jobs ON @extschema@.osv5m_jobs FOR SELECT
	USING (pg_catalog.pg_has_role('pg_monitor', 'USAGE'));

CREATE POLICY osv5m_own_job_workers ON @extschema@.osv5m_job_workers
	USING (EXISTS (SELECT FROM @extschema@.osv5m_jobs j
				   WHERE j.job_id = osv5m_job_workers.job_id
					 AND j.owner = pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER))))
	WITH CHECK (EXISTS (SELECT FROM @extschema@.osv5m_jobs j
						WHERE j.job_id = osv5m_job_workers.job_id
						  AND j.owner = pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER))));
CREATE POLICY osv5m_monitor_job_workers ON @extschema@.osv5m_job_workers FOR SELECT
	USING (pg_catalog.pg_has_role('pg_monitor', 'USAGE'));

CREATE POLICY osv5m_own_errors ON @extschema@.osv5m_errors
	USING (owner = pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER)))
	WITH CHECK (owner = pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER)));

-- What osv5m_enrich, running as its caller, needs; nothing more.  Columns
-- left out of INSERT take their defaults (owner, leader, status, start);
-- columns left out of UPDATE are fixed once the row exists.
REVOKE ALL ON @extschema@.osv5m_jobs, @extschema@.osv5m_job_workers,
	@extschema@.osv5m_errors FROM PUBLIC;
GRANT SELECT, DELETE ON @extschema@.osv5m_jobs TO PUBLIC;
GRANT INSERT (tbl, image_column, target_column, batch_size, workers, on_error,
			  settings, rows_total, leaves) ON @extschema@.osv5m_jobs TO PUBLIC;
GRANT UPDATE (status, workers, finished_at, error) ON @extschema@.osv5m_jobs TO PUBLIC;
GRANT USAGE ON SEQUENCE @extschema@.osv5m_jobs_job_id_seq TO PUBLIC;
GRANT SELECT, INSERT, DELETE ON @extschema@.osv5m_job_workers TO PUBLIC;
GRANT UPDATE (pid, status, rows_done, rows_failed, batches, updated_at,
			  sqlstate, message, detail, hint) ON @extschema@.osv5m_job_workers TO PUBLIC;
GRANT SELECT, DELETE ON @extschema@.osv5m_errors TO PUBLIC;
GRANT INSERT (tbl, image_column, key_column, row_key, image_md5, sqlstate,
			  message, detail, job_id) ON @extschema@.osv5m_errors TO PUBLIC;
GRANT UPDATE (key_column, image_md5, sqlstate, message, detail, job_id,
			  recorded_at) ON @extschema@.osv5m_errors TO PUBLIC;
GRANT USAGE ON SEQUENCE @extschema@.osv5m_errors_error_id_seq TO PUBLIC;

-- ==== functions of the enrichment, each with a safe search_path ====

CREATE OR REPLACE FUNCTION @extschema@.osv5m_job_alive(pid integer, started timestamptz)
RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT EXISTS (
		SELECT FROM pg_catalog.pg_stat_activity a
		 WHERE a.pid = $1
		   AND (a.backend_start IS NULL OR a.backend_start <= $2)
		   AND (a.state IS NULL OR (a.state = 'active' AND a.query_start <= $2)))
$$;

-- The view runs with the rights of whoever reads it, so row-level
-- security shows each role its own runs.  New column at the end: owner.
CREATE OR REPLACE VIEW @extschema@.osv5m_progress AS
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
	   j.owner
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
ALTER VIEW @extschema@.osv5m_progress SET (security_invoker = true);
GRANT SELECT ON @extschema@.osv5m_progress TO PUBLIC;

CREATE OR REPLACE FUNCTION @extschema@.osv5m_progress_line(job bigint)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT pg_catalog.format('osv5m_enrich job %s: %s rows done, %s failed, %s left, %s rows/s%s',
			  p.job_id, p.rows_done, p.rows_failed, p.rows_left, p.rows_per_second,
			  CASE WHEN p.time_left IS NOT NULL AND p.rows_left > 0
				   THEN ', about ' || p.time_left::text || ' to go' ELSE '' END)
	  FROM @extschema@.osv5m_progress p
	 WHERE p.job_id = $1
$$;

-- The key osv5m_errors.row_key holds for a row of one physical table: its
-- primary key, or its ctid when it has none.
CREATE OR REPLACE FUNCTION @extschema@.osv5m_row_key(tbl regclass, OUT expr text, OUT key_column text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE WHEN pg_catalog.count(*) = 0 THEN 't.ctid::text'
				WHEN pg_catalog.count(*) = 1 THEN pg_catalog.format('t.%I::text', pg_catalog.min(a.attname))
				ELSE pg_catalog.format('ROW(%s)::text',
						 pg_catalog.string_agg(pg_catalog.format('t.%I', a.attname), ', ' ORDER BY k.ord)) END,
		   CASE WHEN pg_catalog.count(*) = 0 THEN 'ctid'
				ELSE pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY k.ord) END
	  FROM pg_catalog.pg_index i
	 CROSS JOIN LATERAL pg_catalog.unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
	  JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
	 WHERE i.indrelid = $1 AND i.indisprimary
$$;

-- The physical tables of tbl: itself unless it is partitioned, and every
-- partition and inheritance child at any depth that holds rows (ordinary
-- and foreign tables), in a fixed order.
CREATE FUNCTION @extschema@.osv5m_leaf_tables(tbl regclass)
RETURNS regclass[]
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
	WITH RECURSIVE tree(relid) AS (
		SELECT $1::oid
		UNION
		SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.relid)
	SELECT coalesce(pg_catalog.array_agg(c.oid::regclass ORDER BY c.oid), '{}')
	  FROM tree JOIN pg_catalog.pg_class c ON c.oid = tree.relid
	 WHERE c.relkind IN ('r', 'f')
$$;

COMMENT ON FUNCTION @extschema@.osv5m_leaf_tables(regclass) IS
'internal: the ordinary and foreign tables that hold the rows of a table (itself, its partitions and inheritance children)';

-- The live run, of any role, that works on one of these tables, if any.
-- SECURITY DEFINER: row-level security hides other roles' runs, and two
-- runs on the same rows must exclude each other whoever started them.  It
-- tells only a job number.
CREATE FUNCTION @extschema@.osv5m_running_job(leaves regclass[])
RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT j.job_id
	  FROM @extschema@.osv5m_jobs j
	 WHERE j.status = 'running'
	   AND j.leaves::oid[] OPERATOR(pg_catalog.&&) $1::oid[]
	   AND @extschema@.osv5m_job_alive(j.leader_pid, j.started_at)
	 ORDER BY j.job_id
	 LIMIT 1
$$;

COMMENT ON FUNCTION @extschema@.osv5m_running_job(regclass[]) IS
'internal: a live osv5m_enrich run on any of these tables, whoever started it';

CREATE OR REPLACE FUNCTION @extschema@.osv5m_enrich_settings()
RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
		'osv5m.model_path', pg_catalog.current_setting('osv5m.model_path', true),
		'osv5m.threads', pg_catalog.current_setting('osv5m.threads', true),
		'osv5m.images_per_run', @extschema@.osv5m_enrich_images_per_run()::text,
		'osv5m.max_pixels', pg_catalog.current_setting('osv5m.max_pixels', true)))
$$;

-- Run in a background worker before its first batch: take the caller's
-- osv5m.* settings (only those osv5m_enrich_settings() records) and
-- register the worker.  The worker runs as the job's owner, so
-- set_config() grants it no right its owner lacks, and row-level security
-- shows it no other role's job.
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
	INSERT INTO @extschema@.osv5m_job_workers AS w (job_id, worker, pid)
	VALUES (job, worker, pg_catalog.pg_backend_pid())
	ON CONFLICT ON CONSTRAINT osv5m_job_workers_pkey
	DO UPDATE SET pid = excluded.pid, status = 'running';
END
$$;

CREATE OR REPLACE FUNCTION @extschema@.osv5m_enrich_worker_done(job bigint, worker integer,
										 sqlstate text DEFAULT NULL,
										 message text DEFAULT NULL,
										 detail text DEFAULT NULL,
										 hint text DEFAULT NULL)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
	INSERT INTO @extschema@.osv5m_job_workers AS w
		(job_id, worker, pid, status, sqlstate, message, detail, hint)
	VALUES ($1, $2, pg_catalog.pg_backend_pid(),
			CASE WHEN $3 IS NULL THEN 'done' ELSE 'failed' END, $3, $4, $5, $6)
	ON CONFLICT (job_id, worker) DO UPDATE
	   SET status = excluded.status, sqlstate = excluded.sqlstate,
		   message = excluded.message, detail = excluded.detail,
		   hint = excluded.hint, updated_at = pg_catalog.clock_timestamp()
$$;

ALTER FUNCTION @extschema@.osv5m_reraise(text, text, text, text)
	SET search_path = pg_catalog, pg_temp;

-- A row whose image geolocate() rejects: with on_error 'stop', raise its
-- error again, saying which row of which table; with 'skip', record it
-- (again, if the row's image changed since it last failed).
DROP FUNCTION @extschema@.osv5m_enrich_bad_row(@extschema@.osv5m_jobs, text, text, text, text, text, text);
CREATE FUNCTION @extschema@.osv5m_enrich_bad_row(j @extschema@.osv5m_jobs, leaf regclass,
									 key_column text, row_key text, image_md5 text,
									 e_state text, e_msg text, e_detail text, e_hint text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF j.on_error = 'stop' THEN
		PERFORM @extschema@.osv5m_reraise(e_state, e_msg,
			pg_catalog.format('Row %s = %s of %s.', key_column, row_key, leaf)
			|| coalesce(' ' || nullif(e_detail, ''), ''), e_hint);
	END IF;
	INSERT INTO @extschema@.osv5m_errors AS e
		(tbl, image_column, key_column, row_key, image_md5, sqlstate, message, detail, job_id)
	VALUES (leaf, j.image_column, key_column, row_key, image_md5, e_state, e_msg,
			nullif(e_detail, ''), j.job_id)
	ON CONFLICT ON CONSTRAINT osv5m_errors_row DO UPDATE
	   SET key_column = excluded.key_column, image_md5 = excluded.image_md5,
		   sqlstate = excluded.sqlstate, message = excluded.message,
		   detail = excluded.detail, job_id = excluded.job_id,
		   recorded_at = pg_catalog.clock_timestamp();
END
$$;

-- One batch of a run: up to batch_size rows, over the run's tables in
-- order, whose target is NULL and whose image is not, that are in this
-- worker's share (hash of the row key modulo nparts; worker 0, or nparts
-- 1, takes any row), and that the run's owner has not recorded as bad
-- with the same image; geolocate them, osv5m.images_per_run images per
-- run of the network, and write each.  Returns how many rows were written
-- and how many recorded as errors; 0 and 0 means nothing is left.
--
-- Rows are found, locked, read and written in one physical table at a
-- time (FROM ONLY, UPDATE ONLY), where a ctid names one row.  Foreign
-- tables are left to the calling backend (worker 0): their rows are locked
-- on the remote server, where SKIP LOCKED does not reach, so two
-- processes there would wait for each other.
--
-- The function runs with search_path = pg_catalog, pg_temp, except for the
-- UPDATE of a row: the table's own triggers then run under
-- caller_search_path, the search_path of the session that called
-- osv5m_enrich (a background worker's own default when NULL), as they do
-- under a plain UPDATE.  That statement names everything with its schema.
DROP FUNCTION @extschema@.osv5m_enrich_batch(bigint, integer, integer);
CREATE FUNCTION @extschema@.osv5m_enrich_batch(job bigint, worker integer DEFAULT 0,
								   nparts integer DEFAULT 1,
								   caller_search_path text DEFAULT NULL,
								   OUT done integer, OUT failed integer)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	j			@extschema@.osv5m_jobs;
	leaf		regclass;
	k			record;
	per_run		integer := @extschema@.osv5m_enrich_images_per_run();
	want		integer;
	last_rid	tid;
	grp			tid[];
	keys		text[];
	grp_rids	tid[];
	imgs		bytea[];
	locs		point[];
	states		text[];
	msgs		text[];
	details		text[];
	hints		text[];
	pos			integer;
	val			record;
	share		text;
	e_state		text;
	e_msg		text;
	e_detail	text;
	e_hint		text;
	e_md5		text;
	written		bigint;
	tgt_type	text;
BEGIN
	done := 0;
	failed := 0;
	SELECT * INTO j FROM @extschema@.osv5m_jobs x WHERE x.job_id = job;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'osv5m_enrich job % does not exist', job;
	END IF;
	IF caller_search_path IS NULL THEN
		SELECT s.reset_val INTO caller_search_path
		  FROM pg_catalog.pg_settings s WHERE s.name = 'search_path';
	END IF;

	FOREACH leaf IN ARRAY j.leaves LOOP
		EXIT WHEN done + failed >= j.batch_size;
		-- a table dropped since the run started has no rows left to do
		CONTINUE WHEN NOT EXISTS (SELECT FROM pg_catalog.pg_class c WHERE c.oid = leaf);
		CONTINUE WHEN worker > 0 AND
			(SELECT c.relkind FROM pg_catalog.pg_class c WHERE c.oid = leaf) = 'f';
		-- a foreign table its own server enriches (osv5m_remote_start)
		CONTINUE WHEN EXISTS (SELECT FROM @extschema@.osv5m_job_remotes r
							  WHERE r.job_id = job AND r.foreign_table = leaf);
		k := @extschema@.osv5m_row_key(leaf);
		-- geography or geometry, schema-qualified (this search_path sees
		-- neither), for the cast of the value written
		SELECT a.atttypid::regtype::text INTO tgt_type
		  FROM pg_catalog.pg_attribute a
		 WHERE a.attrelid = leaf AND a.attname = j.target_column AND NOT a.attisdropped;
		share := '';
		IF worker > 0 AND nparts > 1 THEN
			-- hashtext is int4: shift it to 0..2^32-1 before the modulo
			share := pg_catalog.format(
				' AND pg_catalog.mod(pg_catalog.hashtext(%s)::int8 + 2147483648, %s) = %s',
				k.expr, nparts, worker - 1);
		END IF;

		-- The rows are locked one group of per_run at a time, and each
		-- group goes through the network together: other processes can
		-- take any row this one has not reached yet, so at the end of a
		-- run every process has work until the last groups.  Each lock
		-- query starts after the last row the previous one locked (a TID
		-- range scan), so a batch reads each table once.  SKIP LOCKED:
		-- rows another process holds are its business.  The lock re-checks
		-- "target IS NULL" on the row's newest version, so a row written
		-- and committed meanwhile is skipped, never written again.  A
		-- recorded error hides a row only while its image has the MD5
		-- recorded (errors from 0.1.0 have none and hide it by key).
		last_rid := '(0,0)';
		LOOP
			want := least(per_run, j.batch_size - done - failed);
			EXIT WHEN want <= 0;
			EXECUTE pg_catalog.format(
				'SELECT pg_catalog.array_agg(s.rid), pg_catalog.array_agg(s.key), pg_catalog.max(s.rid) FROM ('
				'SELECT t.ctid AS rid, %1$s AS key FROM ONLY %2$s t'
				' WHERE t.ctid > $4 AND t.%3$I IS NULL AND t.%4$I IS NOT NULL%5$s'
				' AND NOT EXISTS (SELECT FROM @extschema@.osv5m_errors e'
				' WHERE e.owner = $5 AND e.tbl = $1 AND e.image_column = $2 AND e.row_key = %1$s'
				' AND (e.image_md5 IS NULL OR e.image_md5 = pg_catalog.md5(t.%4$I)))'
				' LIMIT $3 FOR UPDATE OF t SKIP LOCKED) s',
				k.expr, leaf, j.target_column, j.image_column, share)
			INTO grp, keys, last_rid
			USING leaf, j.image_column, want, last_rid, j.owner;
			EXIT WHEN grp IS NULL;
			-- A bad row that another process of this run recorded and
			-- released after this lock query took its snapshot is locked
			-- all the same (the row was not updated, so the lock re-checks
			-- nothing).  Whoever recorded it committed before we got the
			-- lock: a new statement sees the record.
			SELECT pg_catalog.array_agg(u.rid ORDER BY u.n), pg_catalog.array_agg(u.key ORDER BY u.n)
			  INTO grp, keys
			  -- (multi-argument unnest is FROM-clause syntax, not a function
			  -- to qualify; it resolves under this function's search_path)
			  FROM unnest(grp, keys) WITH ORDINALITY AS u(rid, key, n)
			 WHERE NOT EXISTS (SELECT FROM @extschema@.osv5m_errors e
							   WHERE e.owner = j.owner AND e.tbl = leaf
								 AND e.image_column = j.image_column
								 AND e.row_key = u.key AND e.job_id = j.job_id);
			CONTINUE WHEN grp IS NULL;

			-- The group's images through the network together.  Like the
			-- one-row path below, the subtransaction writes nothing, so it
			-- takes no XID.  The locked rows cannot move: their ctids hold.
			BEGIN
				EXECUTE pg_catalog.format(
					'SELECT pg_catalog.array_agg(t.ctid), pg_catalog.array_agg(t.%I) FROM ONLY %s t WHERE t.ctid = ANY($1)',
					j.image_column, leaf)
				INTO grp_rids, imgs USING grp;
				SELECT pg_catalog.array_agg(b.location ORDER BY b.ord), pg_catalog.array_agg(b.sqlstate ORDER BY b.ord),
					   pg_catalog.array_agg(b.message ORDER BY b.ord), pg_catalog.array_agg(b.detail ORDER BY b.ord),
					   pg_catalog.array_agg(b.hint ORDER BY b.ord)
				  INTO locs, states, msgs, details, hints
				  FROM @extschema@.osv5m_geolocate_batch(imgs) b;
			EXCEPTION
				-- A bad value that is not one image's fault alone (a corrupt
				-- toasted image fails the whole fetch): take the group one
				-- row at a time below, which finds the row.
				WHEN data_exception OR feature_not_supported
					OR program_limit_exceeded OR data_corrupted THEN
					grp_rids := NULL;
			END;

			IF grp_rids IS NOT NULL THEN
				FOR i IN 1 .. pg_catalog.array_length(grp_rids, 1) LOOP
					pos := pg_catalog.array_position(grp, grp_rids[i]);
					IF states[i] IS NOT NULL THEN
						-- a bad image, as geolocate() would raise it; anything
						-- else (out of memory) would fail every row: stop
						IF NOT (pg_catalog.left(states[i], 2) = '22' OR states[i] IN ('0A000', '54000', 'XX001')) THEN
							PERFORM @extschema@.osv5m_reraise(states[i], msgs[i], details[i], hints[i]);
						END IF;
						PERFORM @extschema@.osv5m_enrich_bad_row(j, leaf, k.key_column, keys[pos],
							pg_catalog.md5(imgs[i]), states[i], msgs[i], details[i], hints[i]);
						failed := failed + 1;
						CONTINUE;
					END IF;
					-- an error here (a constraint, a user trigger) is not about
					-- the image, and stops the run
					PERFORM pg_catalog.set_config('search_path', caller_search_path, true);
					EXECUTE pg_catalog.format(
						'UPDATE ONLY %s SET %I = CAST(@extschema@.osv5m_point_geography($1) AS %s)'
						' WHERE ctid OPERATOR(pg_catalog.=) $2 AND %I IS NULL',
						leaf, j.target_column, tgt_type, j.target_column)
					USING locs[i], grp_rids[i];
					PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
					GET DIAGNOSTICS written = ROW_COUNT;
					done := done + written::integer;
				END LOOP;
				CONTINUE;
			END IF;

			FOR i IN 1 .. pg_catalog.array_length(grp, 1) LOOP
				-- Only the inference runs in the subtransaction: it writes
				-- nothing, so it takes no XID, and a batch of any size never
				-- overflows the 64 cached subtransactions per backend that
				-- keep other sessions' snapshots cheap.
				BEGIN
					EXECUTE pg_catalog.format(
						'SELECT @extschema@.geolocate(t.%I) AS v FROM ONLY %s t WHERE t.ctid = $1',
						j.image_column, leaf)
					INTO val USING grp[i];
				EXCEPTION
					-- A bad image: not JPEG/PNG, corrupt, too large.  Anything
					-- else (no model, out of memory, a cancel) would fail every
					-- row, so it stops the run whatever on_error says.
					WHEN data_exception OR feature_not_supported
						OR program_limit_exceeded OR data_corrupted THEN
						GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE,
							e_msg = MESSAGE_TEXT, e_detail = PG_EXCEPTION_DETAIL,
							e_hint = PG_EXCEPTION_HINT;
						-- the MD5 of an image that cannot be read is unknown:
						-- the error then hides the row by its key
						BEGIN
							EXECUTE pg_catalog.format(
								'SELECT pg_catalog.md5(t.%I) FROM ONLY %s t WHERE t.ctid = $1',
								j.image_column, leaf)
							INTO e_md5 USING grp[i];
						EXCEPTION WHEN data_exception OR data_corrupted OR internal_error THEN
							e_md5 := NULL;
						END;
						PERFORM @extschema@.osv5m_enrich_bad_row(j, leaf, k.key_column, keys[i], e_md5,
							e_state, e_msg, e_detail, e_hint);
						failed := failed + 1;
						CONTINUE;
				END;
				PERFORM pg_catalog.set_config('search_path', caller_search_path, true);
				EXECUTE pg_catalog.format(
					'UPDATE ONLY %s SET %I = CAST($1 AS %s) WHERE ctid OPERATOR(pg_catalog.=) $2 AND %I IS NULL',
					leaf, j.target_column, tgt_type, j.target_column)
				USING val.v, grp[i];
				PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
				GET DIAGNOSTICS written = ROW_COUNT;
				done := done + written::integer;
			END LOOP;
		END LOOP;
	END LOOP;

	INSERT INTO @extschema@.osv5m_job_workers AS w
		(job_id, worker, pid, rows_done, rows_failed, batches)
	VALUES (job, worker, pg_catalog.pg_backend_pid(), done, failed, 1)
	-- by constraint name: "(job_id, worker)" would clash with the parameter
	ON CONFLICT ON CONSTRAINT osv5m_job_workers_pkey DO UPDATE
	   SET rows_done = w.rows_done + excluded.rows_done,
		   rows_failed = w.rows_failed + excluded.rows_failed,
		   batches = w.batches + 1, pid = excluded.pid,
		   updated_at = pg_catalog.clock_timestamp();
END
$$;

-- Fill target_column of tbl from image_column for every row whose target
-- is NULL, batch_size rows per transaction, in the calling backend
-- (workers => 1) or in that many background workers (at most
-- osv5m.max_workers).  Must be called outside a transaction block (it
-- commits after every batch).
--
-- A procedure that commits cannot carry a SET clause, so it sets
-- search_path = pg_catalog, pg_temp for each of its transactions (is_local:
-- the caller's setting is back when the CALL ends).  The table's own
-- triggers still run under the caller's (see osv5m_enrich_batch).
CREATE OR REPLACE PROCEDURE @extschema@.osv5m_enrich(tbl regclass, image_column name, target_column name,
							  batch_size integer DEFAULT 100,
							  workers integer DEFAULT 1,
							  on_error text DEFAULT 'skip',
							  retry_errors boolean DEFAULT false)
LANGUAGE plpgsql
AS $$
DECLARE
	job			bigint;
	other		bigint;
	relkind		"char";
	leaves		regclass[];
	col_type	text;
	col			record;
	total		bigint := 0;
	n			bigint;
	leaf		regclass;
	k			record;
	started		integer := 0;
	running		integer;
	res			record;
	f			record;
	last_notice timestamptz := pg_catalog.clock_timestamp();
	e_state		text;
	e_msg		text;
	e_detail	text;
	e_hint		text;
	caller_path text;
	dbl			text;
	fl			record;
	remote_leaves regclass[] := '{}';
	remotes		integer := 0;
	r_done		numeric;
	r_failed	numeric;
BEGIN
	-- Fails at once, before any work, when called inside a transaction
	-- block, where the batches could not be committed one by one.
	COMMIT;
	caller_path := pg_catalog.current_setting('search_path');
	PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);

	-- ---- check the arguments before touching anything ----
	IF batch_size IS NULL OR batch_size < 1 THEN
		RAISE EXCEPTION 'batch_size must be at least 1, got %', coalesce(batch_size::text, 'NULL')
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF workers IS NULL OR workers < 1 OR workers > 64 THEN
		RAISE EXCEPTION 'workers must be between 1 and 64, got %', coalesce(workers::text, 'NULL')
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF on_error IS NULL OR on_error NOT IN ('skip', 'stop') THEN
		RAISE EXCEPTION 'on_error must be ''skip'' or ''stop'', got %', coalesce(pg_catalog.quote_literal(on_error), 'NULL')
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF tbl IS NULL OR image_column IS NULL OR target_column IS NULL THEN
		RAISE EXCEPTION 'tbl, image_column and target_column must not be NULL'
			USING ERRCODE = 'null_value_not_allowed';
	END IF;
	SELECT c.relkind INTO relkind FROM pg_catalog.pg_class c WHERE c.oid = tbl;
	IF relkind IS NULL OR relkind NOT IN ('r', 'p', 'f') THEN
		RAISE EXCEPTION '% is not a table', tbl
			USING ERRCODE = 'wrong_object_type',
				  HINT = 'osv5m_enrich fills ordinary, partitioned and foreign tables; for a view, enrich its base table.';
	END IF;
	FOR col IN SELECT x.name, x.kind, x.allowed
				 FROM (VALUES (image_column, 'image', ARRAY['bytea']),
							  (target_column, 'target', ARRAY['geography', 'geometry'])) x(name, kind, allowed)
	LOOP
		SELECT t.typname INTO col_type
		  FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
		 WHERE a.attrelid = tbl AND a.attname = col.name AND a.attnum > 0 AND NOT a.attisdropped;
		IF NOT FOUND THEN
			RAISE EXCEPTION 'column "%" of relation % does not exist', col.name, tbl
				USING ERRCODE = 'undefined_column';
		END IF;
		IF NOT col_type = ANY (col.allowed) THEN
			RAISE EXCEPTION '% column "%" of relation % has type %, expected %', col.kind, col.name, tbl, col_type,
				pg_catalog.array_to_string(col.allowed, ' or ')
				USING ERRCODE = 'datatype_mismatch';
		END IF;
	END LOOP;
	-- the rows live in these tables; the run works on them, and on no
	-- other, whatever is attached or detached while it runs
	leaves := @extschema@.osv5m_leaf_tables(tbl);
	-- Foreign tables: with dblink installed, those of postgres_fdw are
	-- enriched by their own server (osv5m_remote_start), else by this
	-- backend through postgres_fdw; other wrappers are refused (a ctid
	-- names no row there, and they do not run osv5m).
	dbl := @extschema@.osv5m_dblink_schema();
	FOR fl IN SELECT * FROM @extschema@.osv5m_foreign_leaves(leaves, image_column, target_column) LOOP
		IF fl.wrapper <> 'postgres_fdw' THEN
			RAISE EXCEPTION 'osv5m_enrich does not support foreign table % (server %, foreign-data wrapper %)',
				fl.foreign_table, fl.server, fl.wrapper
				USING ERRCODE = 'feature_not_supported',
					  HINT = pg_catalog.format('Run osv5m_enrich on the server that holds its rows, or give it a postgres_fdw '
						  'foreign table; a wrapper that can write may also take UPDATE %s SET %I = geolocate(%I) WHERE %I IS NULL.',
						  fl.foreign_table, target_column, image_column, target_column);
		END IF;
		IF dbl IS NOT NULL THEN
			remote_leaves := remote_leaves || fl.foreign_table;
		END IF;
	END LOOP;

	-- ---- register the run ----
	IF retry_errors THEN
		DELETE FROM @extschema@.osv5m_errors e
		 WHERE e.tbl = ANY (leaves) AND e.image_column = osv5m_enrich.image_column
		   AND e.owner = pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER));
	END IF;
	UPDATE @extschema@.osv5m_jobs j SET status = 'interrupted'
	 WHERE j.status = 'running' AND NOT @extschema@.osv5m_job_alive(j.leader_pid, j.started_at);
	FOREACH leaf IN ARRAY leaves LOOP
		-- (their own servers count their rows)
		CONTINUE WHEN leaf = ANY (remote_leaves);
		k := @extschema@.osv5m_row_key(leaf);
		EXECUTE pg_catalog.format(
			'SELECT pg_catalog.count(*) FROM ONLY %2$s t WHERE t.%3$I IS NULL AND t.%4$I IS NOT NULL'
			' AND NOT EXISTS (SELECT FROM @extschema@.osv5m_errors e'
			' WHERE e.owner = pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER))'
			' AND e.tbl = $1 AND e.image_column = $2 AND e.row_key = %1$s'
			' AND (e.image_md5 IS NULL OR e.image_md5 = pg_catalog.md5(t.%4$I)))',
			k.expr, leaf, target_column, image_column)
		INTO n USING leaf, image_column;
		total := total + n;
	END LOOP;
	-- Two runs on the same rows would each count the other's rows as left
	-- and report wrong progress: the second is refused.  The lock makes
	-- the check and the registration one step for concurrent callers.
	PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('osv5m_enrich registration'));
	other := @extschema@.osv5m_running_job(leaves);
	IF other IS NOT NULL THEN
		RAISE EXCEPTION 'osv5m_enrich job % is already working on %', other, tbl
			USING ERRCODE = 'object_in_use',
				  HINT = 'Wait for it to finish (osv5m_progress), or cancel it; a run continues where the last one stopped.';
	END IF;
	INSERT INTO @extschema@.osv5m_jobs (tbl, image_column, target_column, batch_size,
										workers, on_error, settings, rows_total, leaves)
	VALUES (tbl, image_column, target_column, batch_size, 0, on_error,
			@extschema@.osv5m_enrich_settings(), total, leaves)
	RETURNING job_id INTO job;
	RAISE NOTICE 'osv5m_enrich job %: % rows to geolocate in %', job, total, tbl;
	COMMIT;
	PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);

	-- ---- the foreign tables on their own servers, started first: they
	-- run while this server works on its own tables ----
	IF pg_catalog.cardinality(remote_leaves) > 0 THEN
		e_state := NULL;
		BEGIN
			remotes := @extschema@.osv5m_remote_start(job, remote_leaves, workers, retry_errors);
		EXCEPTION WHEN OTHERS THEN
			GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_msg = MESSAGE_TEXT,
				e_detail = PG_EXCEPTION_DETAIL, e_hint = PG_EXCEPTION_HINT;
		END;
		IF e_state IS NOT NULL THEN
			PERFORM @extschema@.osv5m_remote_stop(job);
			UPDATE @extschema@.osv5m_jobs SET status = 'failed', error = e_msg,
				   finished_at = pg_catalog.clock_timestamp()
			 WHERE job_id = job;
			COMMIT;
			PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
			PERFORM @extschema@.osv5m_reraise(e_state, e_msg, e_detail, e_hint);
		END IF;
		RAISE NOTICE 'osv5m_enrich job %: % foreign tables started on their own servers', job, remotes;
		COMMIT;
		PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
	END IF;

	-- ---- background workers, if asked: the caller waits and reports ----
	IF workers > 1 AND total > 0 THEN
		started := @extschema@.osv5m_enrich_launch(job, workers);
		UPDATE @extschema@.osv5m_jobs SET workers = started WHERE job_id = job;
		-- (osv5m_enrich_launch says so itself when osv5m.max_workers
		-- reduced the request)
		IF started < least(workers, pg_catalog.current_setting('osv5m.max_workers')::integer) THEN
			RAISE NOTICE 'osv5m_enrich job %: only % of % background workers could be started', job, started, workers
				USING HINT = 'Raise max_worker_processes; the calling backend does the rest of the work.';
		END IF;
		COMMIT;
		PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
		WHILE started > 0 LOOP
			-- one short transaction per second: the caller holds no
			-- snapshot for long, so VACUUM can clean up behind the workers
			BEGIN
				running := @extschema@.osv5m_enrich_wait(job, 1000);
			EXCEPTION WHEN query_canceled THEN
				PERFORM @extschema@.osv5m_remote_stop(job);
				RAISE;
			END;
			SELECT * INTO f FROM @extschema@.osv5m_job_workers w
			 WHERE w.job_id = job AND w.status = 'failed' ORDER BY w.worker LIMIT 1;
			IF FOUND THEN
				PERFORM @extschema@.osv5m_enrich_terminate(job);
				PERFORM @extschema@.osv5m_remote_stop(job, 'a worker of the coordinator failed');
				UPDATE @extschema@.osv5m_jobs SET status = 'failed', error = f.message,
					   finished_at = pg_catalog.clock_timestamp()
				 WHERE job_id = job;
				COMMIT;
				PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
				PERFORM @extschema@.osv5m_reraise(f.sqlstate, f.message, f.detail,
					pg_catalog.format('Raised by background worker %s of osv5m_enrich job %s.%s',
									  f.worker, job, coalesce(' ' || f.hint, '')));
			END IF;
			EXIT WHEN running = 0;
			IF pg_catalog.clock_timestamp() - last_notice >= interval '10 seconds' THEN
				RAISE NOTICE '%', @extschema@.osv5m_progress_line(job);
				last_notice := pg_catalog.clock_timestamp();
			END IF;
			COMMIT;
			PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
		END LOOP;
	END IF;

	-- ---- the caller's own batches: all the work with one worker, or what
	-- the workers left (rows locked by others, a worker that died, foreign
	-- tables) ----
	LOOP
		e_state := NULL;
		BEGIN
			res := @extschema@.osv5m_enrich_batch(job, 0, 1, caller_path);
		EXCEPTION WHEN query_canceled THEN
			-- the remote runs stop with this one
			PERFORM @extschema@.osv5m_remote_stop(job);
			RAISE;
		WHEN OTHERS THEN
			-- keep the error, commit the run's status, then raise it again
			-- (a transaction cannot end inside a block with handlers)
			GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_msg = MESSAGE_TEXT,
				e_detail = PG_EXCEPTION_DETAIL, e_hint = PG_EXCEPTION_HINT;
		END;
		IF e_state IS NOT NULL THEN
			PERFORM @extschema@.osv5m_remote_stop(job, 'the coordinator failed');
			UPDATE @extschema@.osv5m_jobs SET status = 'failed', error = e_msg,
				   finished_at = pg_catalog.clock_timestamp()
			 WHERE job_id = job;
			COMMIT;
			PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
			PERFORM @extschema@.osv5m_reraise(e_state, e_msg, e_detail, e_hint);
		END IF;
		COMMIT;
		PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
		EXIT WHEN res.done + res.failed = 0;
		RAISE NOTICE '%', @extschema@.osv5m_progress_line(job);
	END LOOP;

	-- ---- the remote runs: wait for each, collect how it ended ----
	WHILE remotes > 0 LOOP
		BEGIN
			remotes := @extschema@.osv5m_remote_poll(job);
			IF remotes > 0 THEN
				PERFORM pg_catalog.pg_sleep(0.2);
			END IF;
		EXCEPTION WHEN query_canceled THEN
			PERFORM @extschema@.osv5m_remote_stop(job);
			RAISE;
		END;
		IF remotes > 0 AND pg_catalog.clock_timestamp() - last_notice >= interval '10 seconds' THEN
			RAISE NOTICE 'osv5m_enrich job %: waiting for % server(s) (osv5m_remote_progress(%))', job, remotes,
				pg_catalog.quote_literal(tbl::text);
			last_notice := pg_catalog.clock_timestamp();
		END IF;
		COMMIT;
		PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
	END LOOP;
	SELECT pg_catalog.count(*), pg_catalog.min(r.sqlstate),
		   pg_catalog.string_agg(pg_catalog.format('server %s (foreign table %s): %s', r.server, r.foreign_table,
													   pg_catalog.split_part(r.message, E'\n', 1)),
								 '; ' ORDER BY r.foreign_table)
	  INTO n, e_state, e_msg
	  FROM @extschema@.osv5m_job_remotes r
	 WHERE r.job_id = job AND r.status <> 'done';
	IF n > 0 THEN
		PERFORM @extschema@.osv5m_enrich_worker_done(job, 0);
		UPDATE @extschema@.osv5m_jobs SET status = 'failed', error = e_msg,
			   finished_at = pg_catalog.clock_timestamp()
		 WHERE job_id = job;
		COMMIT;
		PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
		PERFORM @extschema@.osv5m_reraise(coalesce(e_state, 'XX000'),
			pg_catalog.format('osv5m_enrich job %s: %s server run(s) failed: %s', job, n, e_msg), NULL,
			'The rest of the table was enriched.  Bring the server back and CALL osv5m_enrich again: '
			'each server continues where it stopped (osv5m_remote_progress, osv5m_remote_errors).');
	END IF;
	SELECT pg_catalog.count(*), pg_catalog.sum(r.rows_done), pg_catalog.sum(r.rows_failed)
	  INTO n, r_done, r_failed
	  FROM @extschema@.osv5m_job_remotes r WHERE r.job_id = job;
	IF n > 0 THEN
		RAISE NOTICE 'osv5m_enrich job %: % server(s) done: % rows done, % failed there', job, n,
			coalesce(r_done, 0), coalesce(r_failed, 0);
	END IF;

	PERFORM @extschema@.osv5m_enrich_worker_done(job, 0);
	UPDATE @extschema@.osv5m_jobs SET status = 'done', finished_at = pg_catalog.clock_timestamp()
	 WHERE job_id = job;
	COMMIT;
	PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
	RAISE NOTICE '% (finished)', @extschema@.osv5m_progress_line(job);
END
$$;

-- BEFORE INSERT OR UPDATE row trigger: TG_ARGV[0] is the image column,
-- TG_ARGV[1] the target column.  Sets the target from the image on INSERT
-- and when an UPDATE changes the image; a NULL image leaves the target as
-- the statement set it.  It works on NEW alone, never on a ctid.
CREATE OR REPLACE FUNCTION @extschema@.osv5m_geolocate_trigger()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	img_col		text;
	tgt_col		text;
	unchanged	boolean;
	loc			jsonb;
BEGIN
	IF TG_WHEN <> 'BEFORE' OR TG_LEVEL <> 'ROW' OR TG_OP NOT IN ('INSERT', 'UPDATE') THEN
		RAISE EXCEPTION 'osv5m_geolocate_trigger() must be a BEFORE INSERT OR UPDATE ... FOR EACH ROW trigger'
			USING ERRCODE = 'triggered_action_exception';
	END IF;
	IF TG_NARGS <> 2 THEN
		RAISE EXCEPTION 'osv5m_geolocate_trigger() takes 2 arguments (image column, target column), got %', TG_NARGS
			USING ERRCODE = 'triggered_action_exception';
	END IF;
	img_col := TG_ARGV[0];
	tgt_col := TG_ARGV[1];
	IF (SELECT pg_catalog.count(*) FROM pg_catalog.pg_attribute a
		 WHERE a.attrelid = TG_RELID AND a.attname IN (img_col, tgt_col)
		   AND a.attnum > 0 AND NOT a.attisdropped) <> 2 THEN
		RAISE EXCEPTION 'osv5m_geolocate_trigger(): relation % has no column "%" or no column "%"',
			TG_RELID::regclass, img_col, tgt_col
			USING ERRCODE = 'undefined_column';
	END IF;

	IF TG_OP = 'UPDATE' THEN
		EXECUTE pg_catalog.format('SELECT ($1).%1$I IS NOT DISTINCT FROM ($2).%1$I', img_col)
		INTO unchanged USING NEW, OLD;
		IF unchanged THEN
			RETURN NEW;
		END IF;
	END IF;
	-- geolocate is STRICT: a NULL image gives NULL, and we leave the target
	EXECUTE pg_catalog.format('SELECT pg_catalog.to_jsonb(@extschema@.geolocate(($1).%I))', img_col)
	INTO loc USING NEW;
	IF loc IS NULL OR loc = 'null'::jsonb THEN
		RETURN NEW;
	END IF;
	-- the text form of a geography is its hex EWKB: exact, and readable by
	-- both geography and geometry columns
	NEW := pg_catalog.jsonb_populate_record(NEW, pg_catalog.jsonb_build_object(tgt_col, loc));
	RETURN NEW;
END
$$;

-- ==== cells as exact latitude/longitude boxes ====

-- A cell holds the points whose latitude and longitude lie between its
-- bounds.  In geography an edge is a great-circle arc, which bulges toward
-- the pole away from the parallel it joins, so a geography rectangle
-- holds some points north of a cell and misses some inside it.  A
-- geometry in SRID 4326 has straight edges in (longitude, latitude):
-- ST_Covers(box, point::geometry) is exactly "inside the cell, edges
-- included".
DROP FUNCTION @extschema@.osv5m_cells();
CREATE FUNCTION @extschema@.osv5m_cells()
RETURNS TABLE(cell int, centroid geography, bounds geography, box geometry)
LANGUAGE sql STABLE PARALLEL SAFE ROWS 11399
BEGIN ATOMIC
	SELECT c.cell,
		   ST_SetSRID(ST_MakePoint(c.mean_lon, c.mean_lat), 4326)::geography,
		   ST_MakeEnvelope(c.min_lon, c.min_lat, c.max_lon, c.max_lat, 4326)::geography,
		   ST_MakeEnvelope(c.min_lon, c.min_lat, c.max_lon, c.max_lat, 4326)
	FROM @extschema@.osv5m_cells_raw() AS c;
END;

COMMENT ON FUNCTION @extschema@.osv5m_cells() IS
'the quadtree cells of the loaded model: centroid = mean of the training photos in the cell, bounds = its rectangle as geography (great-circle edges), box = its exact latitude/longitude rectangle as geometry (SRID 4326)';

DROP FUNCTION @extschema@.geolocate_topk(bytea, int);
-- Not declared STRICT: PostgreSQL inlines a set-returning SQL function only
-- when it is not strict.  It behaves as a strict one all the same: the C
-- function underneath is STRICT, so a NULL image or k gives no rows.
CREATE FUNCTION @extschema@.geolocate_topk(img bytea, k int DEFAULT 5)
RETURNS TABLE(rank int, cell int, probability float8,
			  location geography, cell_bounds geography, cell_box geometry)
LANGUAGE sql IMMUTABLE PARALLEL SAFE COST 1000000 ROWS 5
BEGIN ATOMIC
	SELECT t.rank, t.cell, t.probability,
		   ST_SetSRID(ST_MakePoint(t.lon, t.lat), 4326)::geography,
		   ST_MakeEnvelope(t.min_lon, t.min_lat, t.max_lon, t.max_lat, 4326)::geography,
		   ST_MakeEnvelope(t.min_lon, t.min_lat, t.max_lon, t.max_lat, 4326)
	FROM @extschema@.osv5m_geolocate_topk_raw(img, k) AS t;
END;

COMMENT ON FUNCTION @extschema@.geolocate_topk(bytea, int) IS
'the k most likely quadtree cells of a photo, best first, each with its regressed point, its rectangle (geography) and its exact latitude/longitude box (geometry, SRID 4326)';

-- ==== scale out: foreign partitions enriched on their own servers ====
--
-- A run whose tables include postgres_fdw foreign tables, in a database
-- where the dblink extension is installed, does not pull their images
-- through postgres_fdw: for each such table it starts the remote server's
-- own osv5m_enrich on the remote table, over a dblink connection made
-- with the foreign server's user mapping, and works on its local tables
-- meanwhile.  Each remote run commits its own batches and records its own
-- bad rows in that server's osv5m_errors; a rerun continues where each one
-- stopped.  Without dblink, foreign tables are enriched by the calling
-- backend through postgres_fdw, as before (README, Scaling out).

-- One row per foreign table of a run handed to its server.
CREATE TABLE @extschema@.osv5m_job_remotes (
	job_id		bigint NOT NULL REFERENCES @extschema@.osv5m_jobs ON DELETE CASCADE,
	foreign_table regclass NOT NULL,
	server		name NOT NULL,		-- the foreign server
	remote_table text NOT NULL,		-- schema-qualified, quoted, on that server
	status		text NOT NULL DEFAULT 'running'
		CHECK (status IN ('running', 'done', 'failed', 'cancelled')),
	remote_job_id bigint,			-- the job on that server, once known
	rows_done	bigint,				-- as that server's osv5m_progress said at the end
	rows_failed bigint,
	started_at	timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
	finished_at timestamptz,
	sqlstate	text,				-- of the error that stopped it
	message		text,
	detail		text,
	hint		text,
	PRIMARY KEY (job_id, foreign_table)
);
COMMENT ON TABLE @extschema@.osv5m_job_remotes IS
'foreign tables of an osv5m_enrich() run enriched by their own server (postgres_fdw + dblink), one row each';
SELECT pg_catalog.pg_extension_config_dump('@extschema@.osv5m_job_remotes', '');

ALTER TABLE @extschema@.osv5m_job_remotes ENABLE ROW LEVEL SECURITY;
CREATE POLICY osv5m_own_job_remotes ON @extschema@.osv5m_job_remotes
	USING (EXISTS (SELECT FROM @extschema@.osv5m_jobs j
				   WHERE j.job_id = osv5m_job_remotes.job_id
					 AND j.owner = pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER))))
	WITH CHECK (EXISTS (SELECT FROM @extschema@.osv5m_jobs j
						WHERE j.job_id = osv5m_job_remotes.job_id
						  AND j.owner = pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER))));
CREATE POLICY osv5m_monitor_job_remotes ON @extschema@.osv5m_job_remotes FOR SELECT
	USING (pg_catalog.pg_has_role('pg_monitor', 'USAGE'));
REVOKE ALL ON @extschema@.osv5m_job_remotes FROM PUBLIC;
GRANT SELECT, INSERT, DELETE ON @extschema@.osv5m_job_remotes TO PUBLIC;
GRANT UPDATE (status, remote_job_id, rows_done, rows_failed, finished_at,
			  sqlstate, message, detail, hint) ON @extschema@.osv5m_job_remotes TO PUBLIC;

-- The schema of dblink in this database, or NULL when it is not installed.
CREATE FUNCTION @extschema@.osv5m_dblink_schema()
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT n.nspname::text
	  FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
	 WHERE e.extname = 'dblink'
$$;

-- The foreign tables among tables: their server, its wrapper, and the
-- remote table (options schema_name and table_name, defaulting to the
-- foreign table's own schema and name) with the remote names of two
-- columns (option column_name, defaulting to the column's name).
CREATE FUNCTION @extschema@.osv5m_foreign_leaves(tables regclass[], image_column name, target_column name)
RETURNS TABLE(foreign_table regclass, server name, wrapper name, remote_table text,
			  remote_image_column text, remote_target_column text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT c.oid::regclass, s.srvname, w.fdwname,
		   pg_catalog.format('%I.%I',
			   coalesce((SELECT o.option_value FROM pg_catalog.pg_options_to_table(ft.ftoptions) o
						  WHERE o.option_name = 'schema_name'), n.nspname::text),
			   coalesce((SELECT o.option_value FROM pg_catalog.pg_options_to_table(ft.ftoptions) o
						  WHERE o.option_name = 'table_name'), c.relname::text)),
		   (SELECT coalesce((SELECT o.option_value FROM pg_catalog.pg_options_to_table(a.attfdwoptions) o
							  WHERE o.option_name = 'column_name'), a.attname::text)
			  FROM pg_catalog.pg_attribute a
			 WHERE a.attrelid = c.oid AND a.attname = $2 AND NOT a.attisdropped),
		   (SELECT coalesce((SELECT o.option_value FROM pg_catalog.pg_options_to_table(a.attfdwoptions) o
							  WHERE o.option_name = 'column_name'), a.attname::text)
			  FROM pg_catalog.pg_attribute a
			 WHERE a.attrelid = c.oid AND a.attname = $3 AND NOT a.attisdropped)
	  FROM pg_catalog.unnest($1) AS t(rel)
	  JOIN pg_catalog.pg_class c ON c.oid = t.rel
	  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
	  JOIN pg_catalog.pg_foreign_table ft ON ft.ftrelid = c.oid
	  JOIN pg_catalog.pg_foreign_server s ON s.oid = ft.ftserver
	  JOIN pg_catalog.pg_foreign_data_wrapper w ON w.oid = s.srvfdw
	 ORDER BY c.oid
$$;

-- The schema of osv5m on the server behind dblink connection (or foreign
-- server name) conn; NULL when osv5m is not installed there.
CREATE FUNCTION @extschema@.osv5m_remote_schema(conn text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s	text;
BEGIN
	EXECUTE pg_catalog.format('SELECT t.s FROM %I.dblink($1, $2) AS t(s text)', @extschema@.osv5m_dblink_schema())
	INTO s
	USING conn, 'SELECT n.nspname::text FROM pg_catalog.pg_extension e'
				' JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = ''osv5m''';
	RETURN s;
END
$$;

-- What identifies a model across servers: the weights' SHA-256 when
-- osv5m_model_info() reports one, else its file size and architecture
-- (paths and load times differ from server to server and are left out).
CREATE FUNCTION @extschema@.osv5m_model_fingerprint(info jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE WHEN $1 ? 'weights_sha256' THEN 'sha256 ' || ($1 ->> 'weights_sha256')
				ELSE pg_catalog.format('%s bytes, %s, %s layers x %s, %s heads, %s cells, %s parameters, %s',
						 $1 ->> 'file_size', $1 ->> 'dtype', $1 ->> 'num_layers', $1 ->> 'hidden_size',
						 $1 ->> 'num_heads', $1 ->> 'num_cells', $1 ->> 'num_parameters', $1 ->> 'hidden_act') END
$$;

-- Cancel and close this session's dblink connections of osv5m runs:
-- those of job (every job when NULL), marking their servers 'cancelled'
-- with why.  A remote run cancelled this way rolls back its current batch
-- only; a rerun continues it.
CREATE FUNCTION @extschema@.osv5m_remote_stop(job bigint, why text DEFAULT 'cancelled by the coordinator')
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	dbl		text := @extschema@.osv5m_dblink_schema();
	conns	text[];
	c		text;
	n		integer := 0;
BEGIN
	IF dbl IS NULL THEN
		RETURN 0;
	END IF;
	EXECUTE pg_catalog.format('SELECT %I.dblink_get_connections()', dbl) INTO conns;
	FOREACH c IN ARRAY coalesce(conns, '{}') LOOP
		CONTINUE WHEN c NOT LIKE 'osv5m\_%\_%';
		CONTINUE WHEN job IS NOT NULL AND c NOT LIKE 'osv5m\_' || job || '\_%';
		BEGIN
			EXECUTE pg_catalog.format('SELECT %I.dblink_cancel_query($1)', dbl) USING c;
		EXCEPTION WHEN OTHERS THEN
			NULL;		-- a lost connection has nothing to cancel
		END;
		EXECUTE pg_catalog.format('SELECT %I.dblink_disconnect($1)', dbl) USING c;
		UPDATE @extschema@.osv5m_job_remotes r
		   SET status = 'cancelled', message = why, finished_at = pg_catalog.clock_timestamp()
		 WHERE r.status = 'running'
		   AND r.job_id = pg_catalog.split_part(c, '_', 2)::bigint
		   AND r.foreign_table = pg_catalog.split_part(c, '_', 3)::oid::regclass;
		n := n + 1;
	END LOOP;
	RETURN n;
END
$$;

-- Start the remote runs of job on its postgres_fdw foreign tables
-- (remote_leaves), asynchronously.  First every server is checked: it
-- answers, it has osv5m, and its model is the one this server loads (when
-- this server has a model).  Nothing is started unless all pass.
CREATE FUNCTION @extschema@.osv5m_remote_start(job bigint, remote_leaves regclass[],
									workers integer, retry_errors boolean)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	dbl			text := @extschema@.osv5m_dblink_schema();
	j			@extschema@.osv5m_jobs;
	f			record;
	conn		text;
	ext_schema	text;
	info		text;
	here		text;
	fp			text;
	differ		text[] := '{}';
	servers		jsonb := '{}';
	n			integer := 0;
	e_msg		text;
BEGIN
	SELECT * INTO j FROM @extschema@.osv5m_jobs x WHERE x.job_id = job;
	-- connections a cancelled run of this session left open
	PERFORM @extschema@.osv5m_remote_stop(NULL, 'the session started another run');
	BEGIN
		here := @extschema@.osv5m_model_fingerprint(@extschema@.osv5m_model_info());
	EXCEPTION WHEN OTHERS THEN
		here := NULL;	-- no model here: the servers are compared among themselves
	END;
	FOR f IN SELECT * FROM @extschema@.osv5m_foreign_leaves(remote_leaves, j.image_column, j.target_column)
	LOOP
		conn := pg_catalog.format('osv5m_%s_%s', job, f.foreign_table::oid);
		BEGIN
			EXECUTE pg_catalog.format('SELECT %I.dblink_connect($1, $2)', dbl) USING conn, f.server::text;
		EXCEPTION WHEN OTHERS THEN
			GET STACKED DIAGNOSTICS e_msg = MESSAGE_TEXT;
			PERFORM @extschema@.osv5m_remote_stop(job);
			RAISE EXCEPTION 'osv5m_enrich job %: cannot connect to server % (foreign table %): %',
				job, f.server, f.foreign_table, e_msg
				USING ERRCODE = 'connection_exception',
					  HINT = 'Start that server, or check its user mapping; a run continues where the last one stopped.';
		END;
		ext_schema := @extschema@.osv5m_remote_schema(conn);
		IF ext_schema IS NULL THEN
			PERFORM @extschema@.osv5m_remote_stop(job);
			RAISE EXCEPTION 'osv5m_enrich job %: server % (foreign table %) has no osv5m extension', job, f.server, f.foreign_table
				USING ERRCODE = 'feature_not_supported',
					  HINT = 'Run CREATE EXTENSION osv5m CASCADE there, with osv5m.model_path set in its postgresql.conf; '
							 'or drop the extension dblink here to geolocate its rows on this server through postgres_fdw.';
		END IF;
		BEGIN
			EXECUTE pg_catalog.format('SELECT t.i FROM %I.dblink($1, $2) AS t(i text)', dbl)
			INTO info
			USING conn, pg_catalog.format('SELECT %I.osv5m_model_info()::text', ext_schema);
		EXCEPTION WHEN OTHERS THEN
			GET STACKED DIAGNOSTICS e_msg = MESSAGE_TEXT;
			PERFORM @extschema@.osv5m_remote_stop(job);
			RAISE EXCEPTION 'osv5m_enrich job %: server % cannot load its model: %', job, f.server, e_msg
				USING ERRCODE = 'object_not_in_prerequisite_state',
					  HINT = 'Set osv5m.model_path on that server (ALTER SYSTEM SET osv5m.model_path = ''...''; SELECT pg_reload_conf();).';
		END;
		fp := @extschema@.osv5m_model_fingerprint(info::jsonb);
		servers := servers || pg_catalog.jsonb_build_object(f.server::text, fp);
		here := coalesce(here, fp);
		IF fp IS DISTINCT FROM here AND NOT f.server::text = ANY (differ) THEN
			differ := differ || f.server::text;
		END IF;
		INSERT INTO @extschema@.osv5m_job_remotes (job_id, foreign_table, server, remote_table)
		VALUES (job, f.foreign_table, f.server, f.remote_table);
	END LOOP;
	IF pg_catalog.cardinality(differ) > 0 THEN
		PERFORM @extschema@.osv5m_remote_stop(job, 'not started: model mismatch');
		RAISE EXCEPTION 'osv5m_enrich job %: the model differs on server(s) %', job, pg_catalog.array_to_string(differ, ', ')
			USING ERRCODE = 'object_not_in_prerequisite_state',
				  DETAIL = pg_catalog.format('Expected %s; servers: %s.', here, servers),
				  HINT = 'Give every server the same model (osv5m.model_path), then run osv5m_enrich again.';
	END IF;

	-- every server passed: start them all
	FOR f IN SELECT r.*, x.remote_image_column, x.remote_target_column
			   FROM @extschema@.osv5m_job_remotes r
			   JOIN @extschema@.osv5m_foreign_leaves(remote_leaves, j.image_column, j.target_column) x
				 ON x.foreign_table = r.foreign_table
			  WHERE r.job_id = job ORDER BY r.foreign_table
	LOOP
		conn := pg_catalog.format('osv5m_%s_%s', job, f.foreign_table::oid);
		ext_schema := @extschema@.osv5m_remote_schema(conn);
		-- quiet (no NOTICE per batch in this server's log), named in the
		-- remote pg_stat_activity, and stopped soon if this session dies
		EXECUTE pg_catalog.format('SELECT %I.dblink_exec($1, $2)', dbl)
		USING conn, pg_catalog.format(
			'SET client_min_messages = warning; SET application_name = %L; SET client_connection_check_interval = ''1s''',
			pg_catalog.format('osv5m_enrich job %s', job));
		EXECUTE pg_catalog.format('SELECT %I.dblink_send_query($1, $2)', dbl)
		USING conn, pg_catalog.format(
			'CALL %I.osv5m_enrich(%L::regclass, %L, %L, batch_size => %s, workers => %s, on_error => %L, retry_errors => %L)',
			ext_schema, f.remote_table, f.remote_image_column, f.remote_target_column,
			j.batch_size, workers, j.on_error, retry_errors);
		n := n + 1;
	END LOOP;
	RETURN n;
END
$$;

-- Collect the remote runs of job that finished (without waiting); returns
-- how many still run.  A remote error, a lost connection included, marks
-- that server 'failed' with the error; the others go on.
CREATE FUNCTION @extschema@.osv5m_remote_poll(job bigint)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	dbl			text := @extschema@.osv5m_dblink_schema();
	r			record;
	conn		text;
	busy		integer;
	running		integer := 0;
	r_job		bigint;
	r_done		bigint;
	r_failed	bigint;
	e_state		text;
	e_msg		text;
	e_detail	text;
	e_hint		text;
BEGIN
	FOR r IN SELECT * FROM @extschema@.osv5m_job_remotes x
			  WHERE x.job_id = job AND x.status = 'running' ORDER BY x.foreign_table
	LOOP
		conn := pg_catalog.format('osv5m_%s_%s', job, r.foreign_table::oid);
		e_state := NULL;
		BEGIN
			EXECUTE pg_catalog.format('SELECT %I.dblink_is_busy($1)', dbl) INTO busy USING conn;
			IF busy = 1 THEN
				running := running + 1;
				CONTINUE;
			END IF;
			-- the CALL's status, then the end of its results
			EXECUTE pg_catalog.format('SELECT pg_catalog.count(*) FROM %I.dblink_get_result($1) AS t(s text)', dbl) USING conn;
			EXECUTE pg_catalog.format('SELECT pg_catalog.count(*) FROM %I.dblink_get_result($1) AS t(s text)', dbl) USING conn;
		EXCEPTION WHEN OTHERS THEN
			GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_msg = MESSAGE_TEXT,
				e_detail = PG_EXCEPTION_DETAIL, e_hint = PG_EXCEPTION_HINT;
		END;
		-- that server's own account of its run (not when it is gone)
		r_job := NULL;
		r_done := NULL;
		r_failed := NULL;
		BEGIN
			EXECUTE pg_catalog.format(
				'SELECT * FROM %I.dblink($1, $2) AS t(job_id bigint, rows_done bigint, rows_failed bigint)', dbl)
			INTO r_job, r_done, r_failed
			USING conn, pg_catalog.format(
				'SELECT p.job_id, p.rows_done, p.rows_failed FROM %I.osv5m_progress p'
				' WHERE p.table_name = pg_catalog.to_regclass(%L) ORDER BY p.job_id DESC LIMIT 1',
				@extschema@.osv5m_remote_schema(conn), r.remote_table);
		EXCEPTION WHEN OTHERS THEN
			NULL;
		END;
		BEGIN
			EXECUTE pg_catalog.format('SELECT %I.dblink_disconnect($1)', dbl) USING conn;
		EXCEPTION WHEN OTHERS THEN
			NULL;
		END;
		UPDATE @extschema@.osv5m_job_remotes x
		   SET status = CASE WHEN e_state IS NULL THEN 'done' ELSE 'failed' END,
			   sqlstate = e_state, message = e_msg, detail = nullif(e_detail, ''), hint = nullif(e_hint, ''),
			   remote_job_id = r_job, rows_done = r_done, rows_failed = r_failed,
			   finished_at = pg_catalog.clock_timestamp()
		 WHERE x.job_id = job AND x.foreign_table = r.foreign_table;
	END LOOP;
	RETURN running;
END
$$;

-- Each foreign table of tbl (postgres_fdw), with its server's account of
-- the latest osv5m_enrich run on the remote table, asked over dblink now.
-- A server that does not answer is listed with status 'unreachable'.
CREATE FUNCTION @extschema@.osv5m_remote_progress(tbl regclass)
RETURNS TABLE(server name, foreign_table regclass, remote_table text, remote_job_id bigint,
			  status text, rows_done bigint, rows_failed bigint, rows_left bigint,
			  rows_per_second numeric, updated_at timestamptz, error text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	dbl		text := @extschema@.osv5m_dblink_schema();
	f		record;
	p		record;
BEGIN
	IF dbl IS NULL THEN
		RAISE EXCEPTION 'osv5m_remote_progress needs the dblink extension'
			USING ERRCODE = 'feature_not_supported', HINT = 'CREATE EXTENSION dblink;';
	END IF;
	FOR f IN SELECT * FROM @extschema@.osv5m_foreign_leaves(@extschema@.osv5m_leaf_tables(tbl), NULL, NULL) x
			  WHERE x.wrapper = 'postgres_fdw'
	LOOP
		server := f.server;
		foreign_table := f.foreign_table;
		remote_table := f.remote_table;
		BEGIN
			EXECUTE pg_catalog.format(
				'SELECT * FROM %I.dblink($1, $2) AS t(job_id bigint, status text, rows_done bigint, rows_failed bigint,'
				' rows_left bigint, rows_per_second numeric, updated_at timestamptz, error text)', dbl)
			INTO p
			USING f.server::text, pg_catalog.format(
				'SELECT p.job_id, p.status, p.rows_done, p.rows_failed, p.rows_left, p.rows_per_second, p.updated_at, p.error'
				' FROM %I.osv5m_progress p WHERE p.table_name = pg_catalog.to_regclass(%L)'
				' ORDER BY p.job_id DESC LIMIT 1',
				@extschema@.osv5m_remote_schema(f.server::text), f.remote_table);
			remote_job_id := p.job_id;
			status := coalesce(p.status, 'never run');
			rows_done := p.rows_done;
			rows_failed := p.rows_failed;
			rows_left := p.rows_left;
			rows_per_second := p.rows_per_second;
			updated_at := p.updated_at;
			error := p.error;
		EXCEPTION WHEN OTHERS THEN
			remote_job_id := NULL;
			status := 'unreachable';
			rows_done := NULL;
			rows_failed := NULL;
			rows_left := NULL;
			rows_per_second := NULL;
			updated_at := NULL;
			GET STACKED DIAGNOSTICS error = MESSAGE_TEXT;
		END;
		RETURN NEXT;
	END LOOP;
END
$$;

-- The rows of tbl's foreign tables (postgres_fdw) that their servers
-- recorded as errors, asked over dblink now.  A server that does not
-- answer gives a WARNING and no rows.  To retry them: CALL
-- osv5m_enrich(..., retry_errors => true) on the coordinator.
CREATE FUNCTION @extschema@.osv5m_remote_errors(tbl regclass)
RETURNS TABLE(server name, foreign_table regclass, remote_table text, key_column text, row_key text,
			  image_md5 text, sqlstate text, message text, detail text, remote_job_id bigint,
			  recorded_at timestamptz)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	dbl		text := @extschema@.osv5m_dblink_schema();
	f		record;
	e_msg	text;
BEGIN
	IF dbl IS NULL THEN
		RAISE EXCEPTION 'osv5m_remote_errors needs the dblink extension'
			USING ERRCODE = 'feature_not_supported', HINT = 'CREATE EXTENSION dblink;';
	END IF;
	FOR f IN SELECT * FROM @extschema@.osv5m_foreign_leaves(@extschema@.osv5m_leaf_tables(tbl), NULL, NULL) x
			  WHERE x.wrapper = 'postgres_fdw'
	LOOP
		BEGIN
			RETURN QUERY EXECUTE pg_catalog.format(
				'SELECT $1::name, $2::regclass, $3, t.* FROM %I.dblink($1::text, $4) AS t(key_column text, row_key text,'
				' image_md5 text, sqlstate text, message text, detail text, job_id bigint, recorded_at timestamptz)', dbl)
			USING f.server, f.foreign_table, f.remote_table, pg_catalog.format(
				'SELECT e.key_column, e.row_key, e.image_md5, e.sqlstate, e.message, e.detail, e.job_id, e.recorded_at'
				' FROM %I.osv5m_errors e WHERE e.tbl = pg_catalog.to_regclass(%L) ORDER BY e.error_id',
				@extschema@.osv5m_remote_schema(f.server::text), f.remote_table);
		EXCEPTION WHEN OTHERS THEN
			GET STACKED DIAGNOSTICS e_msg = MESSAGE_TEXT;
			RAISE WARNING 'osv5m_remote_errors: server % (foreign table %) did not answer: %', f.server, f.foreign_table, e_msg;
		END;
	END LOOP;
END
$$;
