-- osv5m--0.2.0--0.3.0.sql: from version 0.2.0 to 0.3.0.
--
-- CREATE EXTENSION osv5m installs 0.1.0 and then runs the upgrade scripts
-- in turn, so a fresh install and an upgraded one are the same by
-- construction.
--
-- What 0.3.0 changes:
--  1. The model comparison across servers uses the weights' SHA-256.
--     osv5m_model_info() reports it as "fingerprint"; 0.2.0 looked for a
--     key that was never there and compared file size and architecture
--     only, so two servers with different weights of the same shape passed
--     as the same model.
--  2. Citus: osv5m_enrich on a distributed table runs on every worker at
--     once, each worker enriching the shards it holds, one after the
--     other, with its own osv5m_enrich (batches committed, bad rows in
--     that worker's osv5m_errors, resumable); the model is compared on all
--     workers first.  osv5m_enrich_local_shards does one worker's part;
--     osv5m_citus_progress() and osv5m_citus_errors() show every worker's
--     state from the coordinator.  Reference tables, tables with several
--     placements per shard and shards on the coordinator are refused with
--     a hint (README, Scaling out).

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION osv5m UPDATE" to load this file. \quit

-- ==== the model's identity across servers ====

-- What identifies a model across servers: the SHA-256 of its weights file
-- ("fingerprint" of osv5m_model_info()); for a server that reports none,
-- its file size and architecture (paths and load times differ from server
-- to server and are left out).
CREATE OR REPLACE FUNCTION @extschema@.osv5m_model_fingerprint(info jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE WHEN $1 ? 'fingerprint' THEN $1 ->> 'fingerprint'
				ELSE pg_catalog.format('%s bytes, %s, %s layers x %s, %s heads, %s cells, %s parameters, %s',
						 $1 ->> 'file_size', $1 ->> 'dtype', $1 ->> 'num_layers', $1 ->> 'hidden_size',
						 $1 ->> 'num_heads', $1 ->> 'num_cells', $1 ->> 'num_parameters', $1 ->> 'hidden_act') END
$$;

-- ==== osv5m_enrich: the tables of this server, or a Citus table ====

-- 0.2.0's osv5m_enrich becomes osv5m_enrich_tables: the run on this
-- server's tables (and on postgres_fdw foreign tables through their own
-- servers), the same body but for its own name where it names a parameter
-- and for its argument checks, now osv5m_enrich_check, shared with the
-- Citus path.  osv5m_enrich (below) calls it, or, for a Citus distributed
-- table, osv5m_enrich_citus.
DROP PROCEDURE @extschema@.osv5m_enrich(regclass, name, name, integer, integer, text, boolean);

-- The arguments of osv5m_enrich, checked before anything is touched: the
-- same errors whichever kind of table the run is for.
CREATE FUNCTION @extschema@.osv5m_enrich_check(tbl regclass, image_column name, target_column name,
											   batch_size integer, workers integer, on_error text)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	relkind		"char";
	col_type	text;
	col			record;
BEGIN
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
CREATE PROCEDURE @extschema@.osv5m_enrich_tables(tbl regclass, image_column name, target_column name,
							  batch_size integer DEFAULT 100,
							  workers integer DEFAULT 1,
							  on_error text DEFAULT 'skip',
							  retry_errors boolean DEFAULT false)
LANGUAGE plpgsql
AS $$
DECLARE
	job			bigint;
	other		bigint;
	leaves		regclass[];
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
	PERFORM @extschema@.osv5m_enrich_check(tbl, image_column, target_column, batch_size, workers, on_error);

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
		 WHERE e.tbl = ANY (leaves) AND e.image_column = osv5m_enrich_tables.image_column
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

COMMENT ON PROCEDURE @extschema@.osv5m_enrich_tables(regclass, name, name, integer, integer, text, boolean) IS
'internal: osv5m_enrich on the tables of this server (postgres_fdw foreign tables through their own servers)';

-- A Citus run has one row per worker node here: server is the node
-- (host:port), foreign_table the distributed table.
ALTER TABLE @extschema@.osv5m_job_remotes DROP CONSTRAINT osv5m_job_remotes_pkey;
ALTER TABLE @extschema@.osv5m_job_remotes ADD PRIMARY KEY (job_id, foreign_table, server);
COMMENT ON TABLE @extschema@.osv5m_job_remotes IS
'the parts of an osv5m_enrich() run done by other servers, one row each: a postgres_fdw foreign table enriched by its server (over dblink), or the shards a Citus worker node holds';

-- ==== Citus: a distributed table enriched on the workers that hold it ====

-- Background workers of a run read the catalog (a table dropped since the
-- run started is skipped): on a Citus node they must see the shards,
-- which Citus hides from the catalog queries of ordinary sessions.
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
	IF pg_catalog.current_setting('citus.show_shards_for_app_name_prefixes', true) IS NOT NULL THEN
		PERFORM pg_catalog.set_config('citus.show_shards_for_app_name_prefixes', '*', false);
	END IF;
	INSERT INTO @extschema@.osv5m_job_workers AS w (job_id, worker, pid)
	VALUES (job, worker, pg_catalog.pg_backend_pid())
	ON CONFLICT ON CONSTRAINT osv5m_job_workers_pkey
	DO UPDATE SET pid = excluded.pid, status = 'running';
END
$$;

-- The Citus distributed tables among tbl's leaf tables (tbl itself, or the
-- partitions of a distributed partitioned table); empty without Citus.
CREATE FUNCTION @extschema@.osv5m_citus_tables(tbl regclass)
RETURNS regclass[]
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	r	regclass[];
BEGIN
	IF pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
		RETURN '{}';
	END IF;
	EXECUTE 'SELECT coalesce(pg_catalog.array_agg(l.leaf ORDER BY l.n), ''{}'')'
			' FROM pg_catalog.unnest($1) WITH ORDINALITY AS l(leaf, n)'
			' WHERE EXISTS (SELECT FROM pg_catalog.pg_dist_partition p WHERE p.logicalrelid = l.leaf)'
	INTO r USING @extschema@.osv5m_leaf_tables(tbl);
	RETURN r;
END
$$;

-- The shards of tbl's distributed leaf tables that this node holds.
-- Citus names a shard after its table (shard_name(), unqualified in the
-- schema public): it is looked up in its table's schema, set as the
-- search_path for that moment (so the function is not STABLE).
CREATE FUNCTION @extschema@.osv5m_local_shards(tbl regclass)
RETURNS regclass[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s		record;
	r		regclass[] := '{}';
BEGIN
	IF pg_catalog.to_regclass('pg_catalog.pg_dist_shard') IS NULL THEN
		RETURN r;
	END IF;
	FOR s IN EXECUTE
		'SELECT s.logicalrelid AS rel, s.shardid, n.nspname'
		'  FROM pg_catalog.pg_dist_shard s'
		'  JOIN pg_catalog.pg_dist_placement p ON p.shardid = s.shardid'
		'  JOIN pg_catalog.pg_class c ON c.oid = s.logicalrelid'
		'  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace'
		' WHERE s.logicalrelid = ANY ($1)'
		'   AND p.groupid = (SELECT g.groupid FROM pg_catalog.pg_dist_local_group g)'
		' ORDER BY s.logicalrelid, s.shardid'
		USING @extschema@.osv5m_citus_tables(tbl)
	LOOP
		PERFORM pg_catalog.set_config('search_path', pg_catalog.quote_ident(s.nspname) || ', pg_catalog, pg_temp', true);
		r := r || pg_catalog.to_regclass(pg_catalog.shard_name(s.rel, s.shardid));
		PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
	END LOOP;
	RETURN r;
END
$$;

-- One node's part of a Citus run: osv5m_enrich on each shard of tbl that
-- this node holds, one after the other (each run uses the node's cores:
-- several at once would only compete for them).  The coordinator's
-- osv5m_enrich calls it on every worker at once; it can also be called on
-- a node by hand.  Each shard's run is an ordinary osv5m_enrich run of
-- this node: its batches are committed, its bad rows recorded in this
-- node's osv5m_errors, and a new call continues where it stopped.
CREATE PROCEDURE @extschema@.osv5m_enrich_local_shards(tbl regclass, image_column name, target_column name,
							  batch_size integer DEFAULT 100,
							  workers integer DEFAULT 1,
							  on_error text DEFAULT 'skip',
							  retry_errors boolean DEFAULT false)
LANGUAGE plpgsql
AS $$
DECLARE
	caller_path text := pg_catalog.current_setting('search_path');
	shown		text;
	check_interval text;
	shards		regclass[];
	shard		regclass;
BEGIN
	PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
	-- when the caller goes away (the coordinator's session ended), stop
	-- within a second instead of enriching every shard to the end
	check_interval := pg_catalog.current_setting('client_connection_check_interval');
	PERFORM pg_catalog.set_config('client_connection_check_interval', '1s', false);
	-- osv5m_enrich reads the catalog, where Citus hides shards from
	-- ordinary sessions; put back as it was at the end
	shown := pg_catalog.current_setting('citus.show_shards_for_app_name_prefixes', true);
	IF shown IS NULL THEN
		RAISE EXCEPTION 'osv5m_enrich_local_shards: Citus is not loaded on this server'
			USING ERRCODE = 'feature_not_supported', HINT = 'Use osv5m_enrich.';
	END IF;
	PERFORM pg_catalog.set_config('citus.show_shards_for_app_name_prefixes', '*', false);
	shards := @extschema@.osv5m_local_shards(tbl);
	FOREACH shard IN ARRAY shards LOOP
		-- the shard's own triggers run under the caller's search_path
		PERFORM pg_catalog.set_config('search_path', caller_path, true);
		CALL @extschema@.osv5m_enrich_tables(shard, image_column, target_column, batch_size,
											 workers, on_error, retry_errors);
	END LOOP;
	PERFORM pg_catalog.set_config('citus.show_shards_for_app_name_prefixes', shown, false);
	PERFORM pg_catalog.set_config('client_connection_check_interval', check_interval, false);
END
$$;

COMMENT ON PROCEDURE @extschema@.osv5m_enrich_local_shards(regclass, name, name, integer, integer, text, boolean) IS
'osv5m_enrich on the shards of a Citus distributed table that this node holds, one after the other';

-- A command run on every Citus worker at once (run_command_on_workers,
-- through Citus's own connections), each node's outcome as node =
-- 'host:port', whether it succeeded, and its result or error.  Dynamic,
-- because Citus need not be installed where osv5m is.
CREATE FUNCTION @extschema@.osv5m_on_workers(cmd text)
RETURNS TABLE(node text, success boolean, result text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	RETURN QUERY EXECUTE
		'SELECT r.nodename || '':'' || r.nodeport, r.success, r.result'
		'  FROM pg_catalog.run_command_on_workers($1, true) r ORDER BY r.nodename, r.nodeport'
	USING cmd;
END
$$;

-- Every node's account of tbl's shards (Citus): per shard, the latest
-- osv5m_enrich run on it, asked over run_command_on_workers now.  A node
-- that does not answer is listed with status 'unreachable'.
CREATE FUNCTION @extschema@.osv5m_citus_progress(tbl regclass)
RETURNS TABLE(node text, shard text, job_id bigint, status text, rows_done bigint, rows_failed bigint,
			  rows_left bigint, rows_per_second numeric, updated_at timestamptz, error text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	res		record;
	cmd		text;
BEGIN
	IF pg_catalog.cardinality(@extschema@.osv5m_citus_tables(tbl)) = 0 THEN
		RAISE EXCEPTION '% is not a Citus distributed table', tbl
			USING ERRCODE = 'wrong_object_type', HINT = 'Use osv5m_progress, or osv5m_remote_progress for postgres_fdw.';
	END IF;
	cmd := pg_catalog.format(
		'SELECT coalesce(pg_catalog.json_agg(x), ''[]'') FROM ('
		' SELECT s.shard::text AS shard, p.job_id, coalesce(p.status, ''never run'') AS status, p.rows_done,'
		' p.rows_failed, p.rows_left, p.rows_per_second, p.updated_at, p.error'
		' FROM pg_catalog.unnest(%1$I.osv5m_local_shards(%2$L::regclass)) AS s(shard)'
		' LEFT JOIN LATERAL (SELECT * FROM %1$I.osv5m_progress q WHERE q.table_name = s.shard'
		' ORDER BY q.job_id DESC LIMIT 1) p ON true) x',
		'@extschema@', tbl::text);
	FOR res IN SELECT * FROM @extschema@.osv5m_on_workers(cmd) LOOP
		node := res.node;
		IF NOT res.success THEN
			shard := NULL; job_id := NULL; status := 'unreachable'; rows_done := NULL; rows_failed := NULL;
			rows_left := NULL; rows_per_second := NULL; updated_at := NULL; error := res.result;
			RETURN NEXT;
			CONTINUE;
		END IF;
		RETURN QUERY
			SELECT node, x.shard, x.job_id, x.status, x.rows_done, x.rows_failed,
				   x.rows_left, x.rows_per_second, x.updated_at, x.error
			  FROM pg_catalog.json_to_recordset(res.result::json) AS x(shard text, job_id bigint, status text,
				   rows_done bigint, rows_failed bigint, rows_left bigint, rows_per_second numeric,
				   updated_at timestamptz, error text);
	END LOOP;
END
$$;

-- The rows of tbl's shards (Citus) that the nodes recorded as errors,
-- asked over run_command_on_workers now.  A node that does not answer
-- gives a WARNING and no rows.  To retry them: CALL osv5m_enrich(...,
-- retry_errors => true) on the coordinator.
CREATE FUNCTION @extschema@.osv5m_citus_errors(tbl regclass)
RETURNS TABLE(node text, shard text, key_column text, row_key text, image_md5 text, sqlstate text,
			  message text, detail text, job_id bigint, recorded_at timestamptz)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	res		record;
	cmd		text;
BEGIN
	IF pg_catalog.cardinality(@extschema@.osv5m_citus_tables(tbl)) = 0 THEN
		RAISE EXCEPTION '% is not a Citus distributed table', tbl
			USING ERRCODE = 'wrong_object_type', HINT = 'Use osv5m_errors, or osv5m_remote_errors for postgres_fdw.';
	END IF;
	cmd := pg_catalog.format(
		'SELECT coalesce(pg_catalog.json_agg(x ORDER BY x.error_id), ''[]'') FROM ('
		' SELECT e.error_id, e.tbl::text AS shard, e.key_column, e.row_key, e.image_md5, e.sqlstate, e.message,'
		' e.detail, e.job_id, e.recorded_at FROM %1$I.osv5m_errors e'
		' WHERE e.tbl = ANY (%1$I.osv5m_local_shards(%2$L::regclass))) x',
		'@extschema@', tbl::text);
	FOR res IN SELECT * FROM @extschema@.osv5m_on_workers(cmd) LOOP
		node := res.node;
		IF NOT res.success THEN
			RAISE WARNING 'osv5m_citus_errors: node % did not answer: %', node, res.result;
			CONTINUE;
		END IF;
		RETURN QUERY
			SELECT node, x.shard, x.key_column, x.row_key, x.image_md5, x.sqlstate,
				   x.message, x.detail, x.job_id, x.recorded_at
			  FROM pg_catalog.json_to_recordset(res.result::json) AS x(shard text, key_column text, row_key text,
				   image_md5 text, sqlstate text, message text, detail text, job_id bigint, recorded_at timestamptz);
	END LOOP;
END
$$;

-- The coordinator's run on a Citus distributed table (tbl, or the
-- distributed partitions of tbl): osv5m_enrich_local_shards on every
-- worker at once, through run_command_on_workers (Citus's own connections
-- and authentication), after checking that every worker loads the model
-- this server loads.  Refused, with what to run instead: reference and
-- Citus local tables, shards with more than one placement (a write to one
-- placement would make them differ) and shards on the coordinator.
CREATE PROCEDURE @extschema@.osv5m_enrich_citus(tbl regclass, image_column name, target_column name,
							  batch_size integer, workers integer, on_error text, retry_errors boolean)
LANGUAGE plpgsql
AS $$
DECLARE
	job			bigint;
	other		bigint;
	leaves		regclass[];
	dist		regclass[];
	why			text;
	hint		text;
	here		text;
	res			record;
	node		text;
	differ		text[] := '{}';
	nodes		jsonb := '{}';
	total		bigint;
	cmd			text;
	n			bigint;
	r_done		numeric;
	r_failed	numeric;
	e_state		text;
	e_msg		text;
	e_detail	text;
	e_hint		text;
	on_worker	boolean;
BEGIN
	COMMIT;
	PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);

	PERFORM @extschema@.osv5m_enrich_check(tbl, image_column, target_column, batch_size, workers, on_error);

	-- ---- what this path supports ----
	leaves := @extschema@.osv5m_leaf_tables(tbl);
	dist := @extschema@.osv5m_citus_tables(tbl);
	EXECUTE 'SELECT g.groupid <> 0 FROM pg_catalog.pg_dist_local_group g' INTO on_worker;
	IF pg_catalog.cardinality(dist) < pg_catalog.cardinality(leaves) THEN
		why := pg_catalog.format('%s mixes Citus distributed tables with other tables', tbl);
		hint := 'Enrich the distributed tables and the others in separate calls.';
	ELSIF on_worker THEN
		why := 'this node is a Citus worker';
		hint := 'Run osv5m_enrich on the coordinator, or osv5m_enrich_local_shards for the shards this node holds.';
	ELSE
		EXECUTE
			'SELECT pg_catalog.string_agg(pg_catalog.format(''%s is a %s'', p.logicalrelid,'
			'		CASE WHEN p.repmodel = ''t'' THEN ''reference table'' ELSE ''Citus local table'' END), ''; '')'
			'  FROM pg_catalog.pg_dist_partition p WHERE p.logicalrelid = ANY ($1) AND p.partmethod = ''n'''
		INTO why USING dist;
		IF why IS NOT NULL THEN
			hint := pg_catalog.format('Its rows are on every node or on the coordinator: fill it with one statement, '
				'UPDATE %s SET %I = geolocate(%I) WHERE %I IS NULL (all or nothing), '
				'or CALL osv5m_enrich_local_shards(%L, %L, %L) on the coordinator.',
				tbl, target_column, image_column, target_column, tbl::text, image_column, target_column);
		END IF;
	END IF;
	IF why IS NULL THEN
		EXECUTE
			'SELECT pg_catalog.format(''shard %s of %s has %s placements'', x.shardid, x.logicalrelid, x.n)'
			'  FROM (SELECT s.shardid, s.logicalrelid, pg_catalog.count(*) AS n'
			'		  FROM pg_catalog.pg_dist_shard s JOIN pg_catalog.pg_dist_placement p ON p.shardid = s.shardid'
			'		 WHERE s.logicalrelid = ANY ($1) GROUP BY 1, 2 HAVING pg_catalog.count(*) > 1) x LIMIT 1'
		INTO why USING dist;
		hint := pg_catalog.format('Writing one placement would make the copies differ: fill it with '
			'UPDATE %s SET %I = geolocate(%I) WHERE %I IS NULL, which Citus writes to every placement.',
			tbl, target_column, image_column, target_column);
	END IF;
	IF why IS NULL THEN
		EXECUTE
			'SELECT pg_catalog.format(''%s shard(s) of %s are on the coordinator'', pg_catalog.count(*), $2)'
			'  FROM pg_catalog.pg_dist_shard s JOIN pg_catalog.pg_dist_placement p ON p.shardid = s.shardid'
			' WHERE s.logicalrelid = ANY ($1) AND p.groupid = 0 HAVING pg_catalog.count(*) > 0'
		INTO why USING dist, tbl::text;
		hint := pg_catalog.format('Move them to workers (citus_move_shard_placement), or enrich them here with '
			'CALL osv5m_enrich_local_shards(%L, %L, %L).', tbl::text, image_column, target_column);
	END IF;
	IF why IS NOT NULL THEN
		RAISE EXCEPTION 'osv5m_enrich does not support this Citus table: %', why
			USING ERRCODE = 'feature_not_supported', HINT = hint;
	END IF;

	-- ---- the same model on every worker ----
	BEGIN
		here := @extschema@.osv5m_model_fingerprint(@extschema@.osv5m_model_info());
	EXCEPTION WHEN OTHERS THEN
		here := NULL;	-- no model here: the workers are compared among themselves
	END;
	FOR res IN SELECT * FROM @extschema@.osv5m_on_workers(
				   pg_catalog.format('SELECT %1$I.osv5m_model_fingerprint(%1$I.osv5m_model_info())', '@extschema@'))
	LOOP
		node := res.node;
		IF NOT res.success THEN
			RAISE EXCEPTION 'osv5m_enrich: node % cannot load its model: %', node, res.result
				USING ERRCODE = 'object_not_in_prerequisite_state',
					  HINT = 'Set osv5m.model_path on every worker (ALTER SYSTEM on each, e.g. through '
							 'run_command_on_workers), then SELECT run_command_on_workers(''SELECT pg_reload_conf()'').';
		END IF;
		nodes := nodes || pg_catalog.jsonb_build_object(node, res.result);
		here := coalesce(here, res.result);
		IF res.result IS DISTINCT FROM here THEN
			differ := differ || node;
		END IF;
	END LOOP;
	IF pg_catalog.cardinality(differ) > 0 THEN
		RAISE EXCEPTION 'osv5m_enrich: the model differs on node(s) %', pg_catalog.array_to_string(differ, ', ')
			USING ERRCODE = 'object_not_in_prerequisite_state',
				  DETAIL = pg_catalog.format('Expected %s; nodes: %s.', here, nodes),
				  HINT = 'Give every node the same model (osv5m.model_path), then run osv5m_enrich again.';
	END IF;

	-- ---- register the run, one row per worker node that holds shards ----
	EXECUTE pg_catalog.format('SELECT pg_catalog.count(*) FROM %s t WHERE t.%I IS NULL AND t.%I IS NOT NULL',
							  tbl, target_column, image_column)
	INTO total;
	UPDATE @extschema@.osv5m_jobs j SET status = 'interrupted'
	 WHERE j.status = 'running' AND NOT @extschema@.osv5m_job_alive(j.leader_pid, j.started_at);
	PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('osv5m_enrich registration'));
	other := @extschema@.osv5m_running_job(leaves);
	IF other IS NOT NULL THEN
		RAISE EXCEPTION 'osv5m_enrich job % is already working on %', other, tbl
			USING ERRCODE = 'object_in_use',
				  HINT = 'Wait for it to finish (osv5m_citus_progress), or cancel it; a run continues where the last one stopped.';
	END IF;
	INSERT INTO @extschema@.osv5m_jobs (tbl, image_column, target_column, batch_size,
										workers, on_error, settings, rows_total, leaves)
	VALUES (tbl, image_column, target_column, batch_size, 0, on_error,
			@extschema@.osv5m_enrich_settings(), total, leaves)
	RETURNING job_id INTO job;
	EXECUTE pg_catalog.format(
		'INSERT INTO %I.osv5m_job_remotes (job_id, foreign_table, server, remote_table)', '@extschema@') ||
		' SELECT DISTINCT $1, $2, n.nodename || '':'' || n.nodeport, ''shards of '' || $2::text'
		'  FROM pg_catalog.pg_dist_shard s'
		'  JOIN pg_catalog.pg_dist_placement p ON p.shardid = s.shardid'
		'  JOIN pg_catalog.pg_dist_node n ON n.groupid = p.groupid AND n.noderole = ''primary'''
		' WHERE s.logicalrelid = ANY ($3)'
	USING job, tbl, dist;
	GET DIAGNOSTICS n = ROW_COUNT;
	RAISE NOTICE 'osv5m_enrich job %: % rows to geolocate in %, on % Citus worker node(s) at once (osv5m_citus_progress(%))',
		job, total, tbl, n, pg_catalog.quote_literal(tbl::text);
	COMMIT;
	PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);

	-- ---- every worker at once; each returns when its shards are done ----
	cmd := pg_catalog.format(
		'CALL %I.osv5m_enrich_local_shards(%L::regclass, %L, %L, batch_size => %s, workers => %s, on_error => %L, retry_errors => %L)',
		'@extschema@', tbl::text, image_column, target_column, batch_size, workers, on_error, retry_errors);
	BEGIN
		FOR res IN SELECT * FROM @extschema@.osv5m_on_workers(cmd) LOOP
			UPDATE @extschema@.osv5m_job_remotes r
			   SET status = CASE WHEN res.success THEN 'done' ELSE 'failed' END,
				   message = CASE WHEN NOT res.success THEN res.result END,
				   finished_at = pg_catalog.clock_timestamp()
			 WHERE r.job_id = job AND r.server = res.node;
		END LOOP;
	EXCEPTION WHEN query_canceled OR OTHERS THEN
		-- a cancel reaches the workers too: Citus cancels their commands
		GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_msg = MESSAGE_TEXT,
			e_detail = PG_EXCEPTION_DETAIL, e_hint = PG_EXCEPTION_HINT;
	END;
	IF e_state IS NOT NULL THEN
		UPDATE @extschema@.osv5m_job_remotes r
		   SET status = 'cancelled', message = e_msg, finished_at = pg_catalog.clock_timestamp()
		 WHERE r.job_id = job AND r.status = 'running';
		UPDATE @extschema@.osv5m_jobs
		   SET status = CASE WHEN e_state = '57014' THEN 'interrupted' ELSE 'failed' END,
			   error = e_msg, finished_at = pg_catalog.clock_timestamp()
		 WHERE job_id = job;
		COMMIT;
		PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
		PERFORM @extschema@.osv5m_reraise(e_state, e_msg, e_detail, e_hint);
	END IF;

	-- ---- how each node's shards ended ----
	UPDATE @extschema@.osv5m_job_remotes r
	   SET rows_done = p.done, rows_failed = p.failed
	  FROM (SELECT x.node, pg_catalog.sum(x.rows_done) AS done, pg_catalog.sum(x.rows_failed) AS failed
			  FROM @extschema@.osv5m_citus_progress(tbl) x GROUP BY x.node) p
	 WHERE r.job_id = job AND r.server = p.node;
	SELECT pg_catalog.count(*) FILTER (WHERE r.status <> 'done'),
		   pg_catalog.string_agg(pg_catalog.format('node %s: %s', r.server, pg_catalog.split_part(r.message, E'\n', 1)), '; '
								 ORDER BY r.server) FILTER (WHERE r.status <> 'done'),
		   pg_catalog.sum(r.rows_done), pg_catalog.sum(r.rows_failed)
	  INTO n, e_msg, r_done, r_failed
	  FROM @extschema@.osv5m_job_remotes r WHERE r.job_id = job;
	IF n > 0 THEN
		UPDATE @extschema@.osv5m_jobs SET status = 'failed', error = e_msg, finished_at = pg_catalog.clock_timestamp()
		 WHERE job_id = job;
		COMMIT;
		PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
		PERFORM @extschema@.osv5m_reraise('XX000',
			pg_catalog.format('osv5m_enrich job %s: %s Citus node(s) failed: %s', job, n, e_msg), NULL,
			'The other nodes finished their shards.  Bring the node back and CALL osv5m_enrich again: '
			'each shard continues where it stopped (osv5m_citus_progress, osv5m_citus_errors).');
	END IF;
	UPDATE @extschema@.osv5m_jobs SET status = 'done', finished_at = pg_catalog.clock_timestamp()
	 WHERE job_id = job;
	COMMIT;
	PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
	RAISE NOTICE 'osv5m_enrich job %: the Citus nodes are done: % rows done, % failed (latest run of each shard)',
		job, coalesce(r_done, 0), coalesce(r_failed, 0);
END
$$;

COMMENT ON PROCEDURE @extschema@.osv5m_enrich_citus(regclass, name, name, integer, integer, text, boolean) IS
'internal: osv5m_enrich on a Citus distributed table, each worker node enriching the shards it holds';

-- Fill target_column of tbl from image_column for every row whose target
-- is NULL, batch_size rows per transaction: see osv5m_enrich_tables (the
-- tables of this server) and osv5m_enrich_citus (a Citus distributed
-- table).  No SET clause (the procedures it calls commit): it reads the
-- catalog under search_path = pg_catalog, pg_temp, and passes the caller's
-- on, which osv5m_enrich_tables uses for the table's own triggers.
CREATE PROCEDURE @extschema@.osv5m_enrich(tbl regclass, image_column name, target_column name,
							  batch_size integer DEFAULT 100,
							  workers integer DEFAULT 1,
							  on_error text DEFAULT 'skip',
							  retry_errors boolean DEFAULT false)
LANGUAGE plpgsql
AS $$
DECLARE
	caller_path text := pg_catalog.current_setting('search_path');
	citus		boolean := false;
BEGIN
	PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
	IF tbl IS NOT NULL THEN
		citus := pg_catalog.cardinality(@extschema@.osv5m_citus_tables(tbl)) > 0;
	END IF;
	PERFORM pg_catalog.set_config('search_path', caller_path, true);
	IF citus THEN
		CALL @extschema@.osv5m_enrich_citus(tbl, image_column, target_column, batch_size,
											workers, on_error, retry_errors);
	ELSE
		CALL @extschema@.osv5m_enrich_tables(tbl, image_column, target_column, batch_size,
											 workers, on_error, retry_errors);
	END IF;
END
$$;

COMMENT ON PROCEDURE @extschema@.osv5m_enrich(regclass, name, name, integer, integer, text, boolean) IS
'fill a geography or geometry column from an image column, batch by batch, resumable; on a Citus distributed table, on every worker at once';
