-- osv5m--0.1.0.sql: the SQL surface of the osv5m extension.
--
-- C functions (src/pg) return plain PostgreSQL types: a native point
-- (x = longitude, y = latitude, degrees), float8 columns, real[], jsonb.
-- The public functions are LANGUAGE sql wrappers that turn those into
-- PostGIS geography with PostGIS's own constructors and casts, so this
-- extension never writes PostGIS's serialized format.  The wrappers are
-- single SELECTs without FROM (or, for set-returning ones, a single SELECT
-- over one function) so that the planner inlines them: the expensive C call
-- then shows up with its own COST and parallel safety in the caller's plan.
-- Bodies are SQL-standard (RETURN / BEGIN ATOMIC): parsed once at CREATE
-- EXTENSION, so they bind to PostGIS's functions whatever the caller's
-- search_path.
--
-- Why the inference functions are IMMUTABLE although they depend on
-- osv5m.model_path: Citus pushes UPDATE ... SET loc = geolocate(img) down to
-- the shards, and postgres_fdw ships a function to the remote server, only
-- when it is IMMUTABLE; generated columns and expression indexes require
-- it.  Changing the model is like changing a collation: recompute what was
-- derived from it (REINDEX, UPDATE the generated columns).
--
-- Why COST 1000000: one call on the real model (CLIP ViT-L/14, ~162 GFLOP)
-- takes about 1.5 s on one core, some 10^6 times a cheap built-in function
-- (cost 1 ~ a few nanoseconds of cpu_operator_cost).  A realistic cost makes
-- the planner evaluate cheap filters first, prefer parallel plans for many
-- rows, and never call a geolocation twice to save a sort.  A side effect:
-- a query over more than about 40 rows passes jit_above_cost, so PostgreSQL
-- JIT-compiles it (tens of milliseconds, small next to the inference).

-- complain if script is sourced in psql, rather than via CREATE EXTENSION
\echo Use "CREATE EXTENSION osv5m CASCADE" to load this file. \quit

-- ---- C functions (internal; use the wrappers below) ----------------------

CREATE FUNCTION osv5m_geolocate_point(img bytea)
RETURNS point
AS 'MODULE_PATHNAME', 'osv5m_geolocate_point'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE COST 1000000;

CREATE FUNCTION osv5m_geolocate_batch(imgs bytea[],
	OUT ord int, OUT location point,
	OUT sqlstate text, OUT message text, OUT detail text, OUT hint text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'osv5m_geolocate_batch'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE COST 1000000;

CREATE FUNCTION osv5m_enrich_images_per_run()
RETURNS int
AS 'MODULE_PATHNAME', 'osv5m_enrich_images_per_run'
LANGUAGE C STABLE PARALLEL SAFE;

CREATE FUNCTION osv5m_geolocate_topk_raw(img bytea, k int,
	OUT rank int, OUT cell int, OUT probability float8,
	OUT lat float8, OUT lon float8,
	OUT min_lat float8, OUT min_lon float8,
	OUT max_lat float8, OUT max_lon float8)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'osv5m_geolocate_topk_raw'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE COST 1000000 ROWS 5;

CREATE FUNCTION osv5m_cells_raw(
	OUT cell int,
	OUT min_lat float8, OUT min_lon float8,
	OUT max_lat float8, OUT max_lon float8,
	OUT mean_lat float8, OUT mean_lon float8)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'osv5m_cells_raw'
LANGUAGE C STABLE PARALLEL SAFE ROWS 11399;

CREATE FUNCTION osv5m_haversine(a point, b point)
RETURNS float8
AS 'MODULE_PATHNAME', 'osv5m_haversine'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

COMMENT ON FUNCTION osv5m_geolocate_point(bytea) IS
'internal: the prediction as a point (x = longitude, y = latitude); use geolocate()';
COMMENT ON FUNCTION osv5m_geolocate_batch(bytea[]) IS
'internal: the prediction of each image of an array, osv5m.images_per_run images per run of the network, with the error of each image that is not one; used by osv5m_enrich';
COMMENT ON FUNCTION osv5m_enrich_images_per_run() IS
'internal: the setting osv5m.images_per_run, defined once the library is loaded';
COMMENT ON FUNCTION osv5m_geolocate_topk_raw(bytea, int) IS
'internal: the k most likely cells as plain numbers; use geolocate_topk()';
COMMENT ON FUNCTION osv5m_cells_raw() IS
'internal: the quadtree as plain numbers; use osv5m_cells()';
COMMENT ON FUNCTION osv5m_haversine(point, point) IS
'internal: great-circle km between (lon, lat) points; use haversine_km()';

-- ---- inference ------------------------------------------------------------

-- The geography of a predicted point: the one construction geolocate() and
-- osv5m_enrich() share, so that both store the same value.
CREATE FUNCTION osv5m_point_geography(p point)
RETURNS geography
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN ST_SetSRID(geometry(p), 4326)::geography;

COMMENT ON FUNCTION osv5m_point_geography(point) IS
'internal: a (lon, lat) point as a geography Point, SRID 4326';

CREATE FUNCTION geolocate(img bytea)
RETURNS geography
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE COST 1000000
RETURN osv5m_point_geography(osv5m_geolocate_point(img));

COMMENT ON FUNCTION geolocate(bytea) IS
'the location (Point, SRID 4326) the OSV-5M model predicts for a JPEG or PNG photo';

-- Not declared STRICT: PostgreSQL inlines a set-returning SQL function only
-- when it is not strict.  It behaves as a strict one all the same: the C
-- function underneath is STRICT, so a NULL image or k gives no rows.
CREATE FUNCTION geolocate_topk(img bytea, k int DEFAULT 5)
RETURNS TABLE(rank int, cell int, probability float8,
			  location geography, cell_bounds geography)
LANGUAGE sql IMMUTABLE PARALLEL SAFE COST 1000000 ROWS 5
BEGIN ATOMIC
	SELECT t.rank, t.cell, t.probability,
		   ST_SetSRID(ST_MakePoint(t.lon, t.lat), 4326)::geography,
		   ST_MakeEnvelope(t.min_lon, t.min_lat, t.max_lon, t.max_lat, 4326)::geography
	FROM osv5m_geolocate_topk_raw(img, k) AS t;
END;

COMMENT ON FUNCTION geolocate_topk(bytea, int) IS
'the k most likely quadtree cells of a photo, best first, each with its regressed point and its rectangle';

CREATE FUNCTION geolocate_embedding(img bytea)
RETURNS real[]
AS 'MODULE_PATHNAME', 'geolocate_embedding'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE COST 1000000;

COMMENT ON FUNCTION geolocate_embedding(bytea) IS
'the class-token feature of the image encoder (1024 values for the real model)';

-- ---- the model ------------------------------------------------------------

-- STABLE, not IMMUTABLE: the cells change with osv5m.model_path, and nothing
-- needs to push this one down.
CREATE FUNCTION osv5m_cells()
RETURNS TABLE(cell int, centroid geography, bounds geography)
LANGUAGE sql STABLE PARALLEL SAFE ROWS 11399
BEGIN ATOMIC
	SELECT c.cell,
		   ST_SetSRID(ST_MakePoint(c.mean_lon, c.mean_lat), 4326)::geography,
		   ST_MakeEnvelope(c.min_lon, c.min_lat, c.max_lon, c.max_lat, 4326)::geography
	FROM osv5m_cells_raw() AS c;
END;

COMMENT ON FUNCTION osv5m_cells() IS
'the quadtree cells of the loaded model: centroid = mean of the training photos in the cell, bounds = its rectangle';

-- VOLATILE and PARALLEL RESTRICTED: it reports this backend's own state
-- (load time, BLAS threads), which changes as the backend works.
CREATE FUNCTION osv5m_model_info()
RETURNS jsonb
AS 'MODULE_PATHNAME', 'osv5m_model_info'
LANGUAGE C VOLATILE PARALLEL RESTRICTED;

COMMENT ON FUNCTION osv5m_model_info() IS
'the model this backend loaded: paths, file size, dtype, shapes, cell count, load time, BLAS core and threads';

-- ---- evaluation -----------------------------------------------------------

CREATE FUNCTION haversine_km(a geography, b geography)
RETURNS float8
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN osv5m_haversine(point(geometry(a)), point(geometry(b)));

COMMENT ON FUNCTION haversine_km(geography, geography) IS
'great-circle distance in km between two points on a sphere of radius 6371 km, as OSV-5M measures it';

CREATE FUNCTION geoscore(pred geography, truth geography)
RETURNS float8
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN 5000.0 * exp(-haversine_km(pred, truth) / 1492.7);

COMMENT ON FUNCTION geoscore(geography, geography) IS
'the GeoGuessr score of a prediction: 5000 exp(-d / 1492.7 km)';

CREATE FUNCTION osv5m_evaluate_accum(internal, geography, geography)
RETURNS internal
AS 'MODULE_PATHNAME', 'osv5m_evaluate_accum'
LANGUAGE C PARALLEL SAFE;

CREATE FUNCTION osv5m_evaluate_combine(internal, internal)
RETURNS internal
AS 'MODULE_PATHNAME', 'osv5m_evaluate_combine'
LANGUAGE C PARALLEL SAFE;

CREATE FUNCTION osv5m_evaluate_serialize(internal)
RETURNS bytea
AS 'MODULE_PATHNAME', 'osv5m_evaluate_serialize'
LANGUAGE C STRICT PARALLEL SAFE;

CREATE FUNCTION osv5m_evaluate_deserialize(bytea, internal)
RETURNS internal
AS 'MODULE_PATHNAME', 'osv5m_evaluate_deserialize'
LANGUAGE C STRICT PARALLEL SAFE;

CREATE FUNCTION osv5m_evaluate_final(internal)
RETURNS jsonb
AS 'MODULE_PATHNAME', 'osv5m_evaluate_final'
LANGUAGE C PARALLEL SAFE;

-- Rows where pred or truth is NULL are skipped; over no rows, n is 0 and
-- every statistic is null.
CREATE AGGREGATE osv5m_evaluate(pred geography, truth geography) (
	SFUNC = osv5m_evaluate_accum,
	STYPE = internal,
	FINALFUNC = osv5m_evaluate_final,
	COMBINEFUNC = osv5m_evaluate_combine,
	SERIALFUNC = osv5m_evaluate_serialize,
	DESERIALFUNC = osv5m_evaluate_deserialize,
	PARALLEL = SAFE
);

COMMENT ON AGGREGATE osv5m_evaluate(geography, geography) IS
'OSV-5M metrics of predictions against ground truth: n, mean GeoScore, mean and median km, accuracy within 1, 25, 200, 750 and 2500 km';

-- ==== bulk enrichment (begin) ====
-- enrich.sql: bulk enrichment of a table with geolocate(), in batches.
--
-- Objects:
--   osv5m_jobs, osv5m_job_workers   one row per run and per process of a run
--   osv5m_errors                    rows whose image geolocate() rejected
--   osv5m_progress                  a view of the runs, for other sessions
--   osv5m_enrich(...)               the procedure users call
--   osv5m_enrich_batch(...)         one batch: the only code that writes rows
--   osv5m_geolocate_trigger()       fills the target column on INSERT/UPDATE
--
-- Invariants:
--   - a row is written only by osv5m_enrich_batch, only while it holds the
--     row's lock (FOR UPDATE) and only if its target was still NULL under
--     that lock: so no row is ever written twice, whatever runs in parallel;
--   - every batch runs in its own transaction and is committed before the
--     next one starts: a cancel, a crash or a restart loses at most the
--     batch in flight of each process, and a rerun continues from there;
--   - a row recorded in osv5m_errors for (table, image column) is not tried
--     again, by this run or later ones, until its error row is deleted
--     (retry_errors => true does that for the whole table);
--   - all names reach dynamic SQL through format() with %I (identifiers)
--     or %s of a regclass (which quotes and qualifies): no injection;
--   - every object of the extension is qualified with @extschema@, so the
--     functions work whatever the caller's or a worker's search_path is.
--   This file is appended to osv5m--0.1.0.sql between the "bulk enrichment"
--   markers; edit it here and copy the block there.

CREATE TABLE osv5m_jobs (
	job_id		bigserial PRIMARY KEY,
	tbl			regclass NOT NULL,
	image_column name NOT NULL,
	target_column name NOT NULL,
	batch_size	integer NOT NULL,
	workers		integer NOT NULL,	-- background workers started (0: the caller alone)
	on_error	text NOT NULL,
	settings	jsonb NOT NULL DEFAULT '{}',	-- the caller's osv5m.* settings, for the workers
	status		text NOT NULL DEFAULT 'running'
		CHECK (status IN ('running', 'done', 'failed', 'interrupted')),
	leader_pid	integer NOT NULL DEFAULT pg_catalog.pg_backend_pid(),
	rows_total	bigint,				-- rows to do when the run started
	started_at	timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
	finished_at timestamptz,
	error		text
);

COMMENT ON TABLE osv5m_jobs IS 'runs of osv5m_enrich(), one row each';

-- Progress of each process of a run: worker 0 is the calling backend,
-- 1..N its background workers.  Each batch adds to its own row, so the
-- processes of a run never wait for each other here.
CREATE TABLE osv5m_job_workers (
	job_id		bigint NOT NULL REFERENCES osv5m_jobs ON DELETE CASCADE,
	worker		integer NOT NULL,
	pid			integer,
	status		text NOT NULL DEFAULT 'running'
		CHECK (status IN ('running', 'done', 'failed')),
	rows_done	bigint NOT NULL DEFAULT 0,
	rows_failed bigint NOT NULL DEFAULT 0,
	batches		bigint NOT NULL DEFAULT 0,
	updated_at	timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
	sqlstate	text,				-- of the error that stopped this worker
	message		text,
	detail		text,
	hint		text,
	PRIMARY KEY (job_id, worker)
);

COMMENT ON TABLE osv5m_job_workers IS 'progress of each process of an osv5m_enrich() run';

-- Rows osv5m_enrich(on_error => 'skip') could not geolocate.  row_key is
-- the primary key as text (ROW(a, b) for a composite key), or the ctid when
-- the table has no primary key: a ctid changes when the row is updated, so
-- a row whose image is fixed by an UPDATE is tried again by the next run.
CREATE TABLE osv5m_errors (
	error_id	bigserial PRIMARY KEY,
	tbl			regclass NOT NULL,
	image_column name NOT NULL,
	key_column	text NOT NULL,		-- what row_key is: 'ctid' or the key's column list
	row_key		text NOT NULL,
	sqlstate	text NOT NULL,
	message		text NOT NULL,
	detail		text,
	job_id		bigint,
	recorded_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
	CONSTRAINT osv5m_errors_row UNIQUE (tbl, image_column, row_key)
);

COMMENT ON TABLE osv5m_errors IS 'rows osv5m_enrich() skipped because geolocate() rejected their image';

-- pg_dump keeps what these tables hold (they are user data, not setup).
SELECT pg_catalog.pg_extension_config_dump('osv5m_jobs', '');
SELECT pg_catalog.pg_extension_config_dump('osv5m_jobs_job_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('osv5m_job_workers', '');
SELECT pg_catalog.pg_extension_config_dump('osv5m_errors', '');
SELECT pg_catalog.pg_extension_config_dump('osv5m_errors_error_id_seq', '');

-- Whether the backend that leads a run is still running it: alive, busy,
-- and busy with a statement that started before the run (the CALL).  A
-- cancelled run's backend is idle or busy with a later statement.  Other
-- users' backends show no state unless one has pg_read_all_stats: those
-- runs count as alive.
CREATE FUNCTION osv5m_job_alive(pid integer, started timestamptz)
RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
	SELECT EXISTS (
		SELECT FROM pg_catalog.pg_stat_activity a
		 WHERE a.pid = $1
		   AND (a.backend_start IS NULL OR a.backend_start <= $2)
		   AND (a.state IS NULL OR (a.state = 'active' AND a.query_start <= $2)))
$$;

-- The progress of every run; status 'interrupted' for a run whose caller
-- was cancelled, terminated or crashed.
CREATE VIEW osv5m_progress AS
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
	   round(r.rate::numeric, 2) AS rows_per_second,
	   CASE WHEN j.status = 'running' AND r.rate > 0
			THEN pg_catalog.make_interval(secs => round(greatest(j.rows_total - coalesce(w.done, 0) - coalesce(w.failed, 0), 0) / r.rate))
			END AS time_left,
	   j.started_at,
	   coalesce(j.finished_at, w.last_update, j.started_at) AS updated_at,
	   j.error
  FROM @extschema@.osv5m_jobs j
  LEFT JOIN LATERAL (
	  SELECT sum(x.rows_done) AS done, sum(x.rows_failed) AS failed,
			 max(x.updated_at) AS last_update
		FROM @extschema@.osv5m_job_workers x
	   WHERE x.job_id = j.job_id) w ON true
  CROSS JOIN LATERAL (
	  SELECT (coalesce(w.done, 0) + coalesce(w.failed, 0)) /
			 greatest(extract(epoch FROM coalesce(j.finished_at, w.last_update, j.started_at) - j.started_at), 0.001)::float8
			 AS rate) r;

COMMENT ON VIEW osv5m_progress IS 'progress of osv5m_enrich() runs: rows done and left, rate, time to go';

-- One line of progress for NOTICEs.
CREATE FUNCTION osv5m_progress_line(job bigint)
RETURNS text
LANGUAGE sql STABLE
AS $$
	SELECT pg_catalog.format('osv5m_enrich job %s: %s rows done, %s failed, %s left, %s rows/s%s',
			  p.job_id, p.rows_done, p.rows_failed, p.rows_left, p.rows_per_second,
			  CASE WHEN p.time_left IS NOT NULL AND p.rows_left > 0
				   THEN ', about ' || p.time_left::text || ' to go' ELSE '' END)
	  FROM @extschema@.osv5m_progress p
	 WHERE p.job_id = $1
$$;

-- The expression, over a table aliased t, that osv5m_errors.row_key holds
-- for a row of tbl, and the name of what it is.
CREATE FUNCTION osv5m_row_key(tbl regclass, OUT expr text, OUT key_column text)
LANGUAGE sql STABLE
AS $$
	SELECT CASE WHEN count(*) = 0 THEN 't.ctid::text'
				WHEN count(*) = 1 THEN pg_catalog.format('t.%I::text', min(a.attname))
				ELSE pg_catalog.format('ROW(%s)::text',
						 string_agg(pg_catalog.format('t.%I', a.attname), ', ' ORDER BY k.ord)) END,
		   CASE WHEN count(*) = 0 THEN 'ctid'
				ELSE string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY k.ord) END
	  FROM pg_catalog.pg_index i
	 CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
	  JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
	 WHERE i.indrelid = $1 AND i.indisprimary
$$;

-- The settings a background worker takes from the caller, as of now.
CREATE FUNCTION osv5m_enrich_settings()
RETURNS jsonb
LANGUAGE sql STABLE
AS $$
	SELECT jsonb_strip_nulls(jsonb_build_object(
		'osv5m.model_path', pg_catalog.current_setting('osv5m.model_path', true),
		'osv5m.threads', pg_catalog.current_setting('osv5m.threads', true),
		'osv5m.images_per_run', @extschema@.osv5m_enrich_images_per_run()::text,
		'osv5m.max_pixels', pg_catalog.current_setting('osv5m.max_pixels', true)))
$$;

-- Run in a background worker before its first batch: take the caller's
-- settings and register the worker.  set_config() runs with the worker's
-- user's rights, the caller's: a setting the caller could not have set
-- itself (osv5m.model_path for a non-superuser) fails here too.
CREATE FUNCTION osv5m_enrich_worker_setup(job bigint, worker integer)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
	s			record;
BEGIN
	FOR s IN SELECT e.key, e.value
			   FROM @extschema@.osv5m_jobs j, jsonb_each_text(j.settings) e
			  WHERE j.job_id = job
	LOOP
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

-- Record why a background worker stopped; it then exits.
CREATE FUNCTION osv5m_enrich_worker_done(job bigint, worker integer,
										 sqlstate text DEFAULT NULL,
										 message text DEFAULT NULL,
										 detail text DEFAULT NULL,
										 hint text DEFAULT NULL)
RETURNS void
LANGUAGE sql
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

-- Raise an error again from its parts; RAISE cannot leave out an empty
-- DETAIL or HINT, and an empty one would print as a blank line.
CREATE FUNCTION osv5m_reraise(sqlstate text, message text, detail text, hint text)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
	IF coalesce(detail, '') = '' AND coalesce(hint, '') = '' THEN
		RAISE EXCEPTION USING ERRCODE = sqlstate, MESSAGE = message;
	ELSIF coalesce(hint, '') = '' THEN
		RAISE EXCEPTION USING ERRCODE = sqlstate, MESSAGE = message, DETAIL = detail;
	ELSIF coalesce(detail, '') = '' THEN
		RAISE EXCEPTION USING ERRCODE = sqlstate, MESSAGE = message, HINT = hint;
	ELSE
		RAISE EXCEPTION USING ERRCODE = sqlstate, MESSAGE = message, DETAIL = detail, HINT = hint;
	END IF;
END
$$;

-- A row whose image geolocate() rejects (not JPEG or PNG, corrupt, too
-- large): with on_error 'stop', raise its error again, saying which row;
-- with 'skip', record it in osv5m_errors.
CREATE FUNCTION osv5m_enrich_bad_row(j @extschema@.osv5m_jobs, key_column text,
									 row_key text, e_state text, e_msg text,
									 e_detail text, e_hint text)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
	IF j.on_error = 'stop' THEN
		PERFORM @extschema@.osv5m_reraise(e_state, e_msg,
			pg_catalog.format('Row %s = %s of %s.', key_column, row_key, j.tbl)
			|| coalesce(' ' || nullif(e_detail, ''), ''), e_hint);
	END IF;
	INSERT INTO @extschema@.osv5m_errors
		(tbl, image_column, key_column, row_key, sqlstate, message, detail, job_id)
	VALUES (j.tbl, j.image_column, key_column, row_key, e_state, e_msg,
			nullif(e_detail, ''), j.job_id)
	ON CONFLICT ON CONSTRAINT osv5m_errors_row DO NOTHING;
END
$$;

-- One batch of a run: up to batch_size rows whose target is NULL and whose
-- image is not, that are in this worker's share (hash of the row key modulo
-- nparts; worker 0, or nparts 1, takes any row), and that osv5m_errors does
-- not list; geolocate them, osv5m.images_per_run images per run of the
-- network (osv5m_geolocate_batch), and write each.  Returns how many rows
-- were written and how many recorded as errors; 0 and 0 means nothing is
-- left.
CREATE FUNCTION osv5m_enrich_batch(job bigint, worker integer DEFAULT 0,
								   nparts integer DEFAULT 1,
								   OUT done integer, OUT failed integer)
LANGUAGE plpgsql
AS $$
DECLARE
	j			@extschema@.osv5m_jobs;
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
	share		text := '';
	e_state		text;
	e_msg		text;
	e_detail	text;
	e_hint		text;
BEGIN
	done := 0;
	failed := 0;
	SELECT * INTO j FROM @extschema@.osv5m_jobs WHERE job_id = job;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'osv5m_enrich job % does not exist', job;
	END IF;
	k := @extschema@.osv5m_row_key(j.tbl);
	IF worker > 0 AND nparts > 1 THEN
		-- hashtext is int4: shift it to 0..2^32-1 before the modulo
		share := pg_catalog.format(' AND mod(hashtext(%s)::int8 + 2147483648, %s) = %s',
								   k.expr, nparts, worker - 1);
	END IF;

	-- The rows are locked one group of per_run at a time, up to batch_size
	-- rows in all, and each group goes through the network together: other
	-- processes can take any row this one has not reached yet, so at the
	-- end of a run every process has work until the last groups.  Each
	-- lock query starts after the last row the previous one locked (a TID
	-- range scan), so a batch reads the table once, not once per group.
	-- SKIP LOCKED: rows another process holds are its business.  The lock
	-- re-checks "target IS NULL" on the row's newest version, so a row
	-- written and committed meanwhile is skipped, never written again.
	last_rid := '(0,0)';
	LOOP
		want := least(per_run, j.batch_size - done - failed);
		EXIT WHEN want <= 0;
		EXECUTE pg_catalog.format(
			'SELECT array_agg(s.rid), array_agg(s.key), max(s.rid) FROM ('
			'SELECT t.ctid AS rid, %1$s AS key FROM %2$s t'
			' WHERE t.ctid > $4 AND t.%3$I IS NULL AND t.%4$I IS NOT NULL%5$s'
			' AND NOT EXISTS (SELECT FROM @extschema@.osv5m_errors e'
			' WHERE e.tbl = $1 AND e.image_column = $2 AND e.row_key = %1$s)'
			' LIMIT $3 FOR UPDATE OF t SKIP LOCKED) s',
			k.expr, j.tbl, j.target_column, j.image_column, share)
		INTO grp, keys, last_rid
		USING j.tbl, j.image_column, want, last_rid;
		EXIT WHEN grp IS NULL;
		-- A bad row that another process recorded and released after this
		-- lock query took its snapshot is locked all the same (the row was
		-- not updated, so the lock re-checks nothing).  Whoever recorded it
		-- committed before we got the lock: a new statement sees the record.
		SELECT array_agg(u.rid ORDER BY u.n), array_agg(u.key ORDER BY u.n)
		  INTO grp, keys
		  FROM unnest(grp, keys) WITH ORDINALITY AS u(rid, key, n)
		 WHERE NOT EXISTS (SELECT FROM @extschema@.osv5m_errors e
						   WHERE e.tbl = j.tbl AND e.image_column = j.image_column
							 AND e.row_key = u.key);
		CONTINUE WHEN grp IS NULL;

		-- The group's images through the network together.  Like the
		-- one-row path below, the subtransaction writes nothing, so it
		-- takes no XID.  The locked rows cannot move: their ctids hold.
		BEGIN
			EXECUTE pg_catalog.format(
				'SELECT array_agg(t.ctid), array_agg(t.%I) FROM %s t WHERE t.ctid = ANY($1)',
				j.image_column, j.tbl)
			INTO grp_rids, imgs USING grp;
			SELECT array_agg(b.location ORDER BY b.ord), array_agg(b.sqlstate ORDER BY b.ord),
				   array_agg(b.message ORDER BY b.ord), array_agg(b.detail ORDER BY b.ord),
				   array_agg(b.hint ORDER BY b.ord)
			  INTO locs, states, msgs, details, hints
			  FROM @extschema@.osv5m_geolocate_batch(imgs) b;
		EXCEPTION
			-- A bad value that is not one image's fault alone (a corrupt
			-- toasted image fails the whole fetch): take the group one row
			-- at a time below, which finds the row.
			WHEN data_exception OR feature_not_supported
				OR program_limit_exceeded OR data_corrupted THEN
				grp_rids := NULL;
		END;

		IF grp_rids IS NOT NULL THEN
			FOR i IN 1 .. array_length(grp_rids, 1) LOOP
				pos := pg_catalog.array_position(grp, grp_rids[i]);
				IF states[i] IS NOT NULL THEN
					-- a bad image, as geolocate() would raise it; anything
					-- else (out of memory) would fail every row: stop
					IF NOT (left(states[i], 2) = '22' OR states[i] IN ('0A000', '54000', 'XX001')) THEN
						PERFORM @extschema@.osv5m_reraise(states[i], msgs[i], details[i], hints[i]);
					END IF;
					PERFORM @extschema@.osv5m_enrich_bad_row(j, k.key_column, keys[pos],
						states[i], msgs[i], details[i], hints[i]);
					failed := failed + 1;
					CONTINUE;
				END IF;
				-- an error here (a constraint, a user trigger) is not about
				-- the image, and stops the run
				EXECUTE pg_catalog.format(
					'UPDATE %s SET %I = @extschema@.osv5m_point_geography($1) WHERE ctid = $2',
					j.tbl, j.target_column)
				USING locs[i], grp_rids[i];
				done := done + 1;
			END LOOP;
			CONTINUE;
		END IF;

		FOR i IN 1 .. array_length(grp, 1) LOOP
			-- Only the inference runs in the subtransaction: it writes
			-- nothing, so it takes no XID, and a batch of any size never
			-- overflows the 64 cached subtransactions per backend that
			-- keep other sessions' snapshots cheap.
			BEGIN
				EXECUTE pg_catalog.format(
					'SELECT @extschema@.geolocate(t.%I) AS v FROM %s t WHERE t.ctid = $1',
					j.image_column, j.tbl)
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
					PERFORM @extschema@.osv5m_enrich_bad_row(j, k.key_column, keys[i],
						e_state, e_msg, e_detail, e_hint);
					failed := failed + 1;
					CONTINUE;
			END;
			EXECUTE pg_catalog.format('UPDATE %s SET %I = $1 WHERE ctid = $2',
									  j.tbl, j.target_column)
			USING val.v, grp[i];
			done := done + 1;
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

-- C helpers of osv5m_enrich (src/pg/enrich.c): start the background
-- workers of a run, wait for them, stop them.
CREATE FUNCTION osv5m_enrich_launch(job bigint, workers integer)
RETURNS integer
AS 'MODULE_PATHNAME', 'osv5m_enrich_launch'
LANGUAGE C STRICT;

CREATE FUNCTION osv5m_enrich_wait(job bigint, timeout_ms integer)
RETURNS integer
AS 'MODULE_PATHNAME', 'osv5m_enrich_wait'
LANGUAGE C STRICT;

CREATE FUNCTION osv5m_enrich_terminate(job bigint)
RETURNS void
AS 'MODULE_PATHNAME', 'osv5m_enrich_terminate'
LANGUAGE C STRICT;

-- Fill target_column of tbl from image_column for every row whose target
-- is NULL, batch_size rows per transaction, in the calling backend
-- (workers => 1) or in that many background workers.  Must be called
-- outside a transaction block (it commits after every batch).
CREATE PROCEDURE osv5m_enrich(tbl regclass, image_column name, target_column name,
							  batch_size integer DEFAULT 100,
							  workers integer DEFAULT 1,
							  on_error text DEFAULT 'skip',
							  retry_errors boolean DEFAULT false)
LANGUAGE plpgsql
AS $$
DECLARE
	job			bigint;
	img_type	text;
	tgt_type	text;
	k			record;
	total		bigint;
	started		integer := 0;
	running		integer;
	res			record;
	f			record;
	last_notice timestamptz := pg_catalog.clock_timestamp();
	e_state		text;
	e_msg		text;
	e_detail	text;
	e_hint		text;
BEGIN
	-- Fails at once, before any work, when called inside a transaction
	-- block, where the batches could not be committed one by one.
	COMMIT;

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
		RAISE EXCEPTION 'on_error must be ''skip'' or ''stop'', got %', coalesce(quote_literal(on_error), 'NULL')
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
	IF tbl IS NULL OR image_column IS NULL OR target_column IS NULL THEN
		RAISE EXCEPTION 'tbl, image_column and target_column must not be NULL'
			USING ERRCODE = 'null_value_not_allowed';
	END IF;
	SELECT t.typname INTO img_type
	  FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
	 WHERE a.attrelid = tbl AND a.attname = image_column AND a.attnum > 0 AND NOT a.attisdropped;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'column "%" of relation % does not exist', image_column, tbl
			USING ERRCODE = 'undefined_column';
	END IF;
	IF img_type <> 'bytea' THEN
		RAISE EXCEPTION 'image column "%" of relation % has type %, expected bytea', image_column, tbl, img_type
			USING ERRCODE = 'datatype_mismatch';
	END IF;
	SELECT t.typname INTO tgt_type
	  FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
	 WHERE a.attrelid = tbl AND a.attname = target_column AND a.attnum > 0 AND NOT a.attisdropped;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'column "%" of relation % does not exist', target_column, tbl
			USING ERRCODE = 'undefined_column';
	END IF;
	IF tgt_type NOT IN ('geography', 'geometry') THEN
		RAISE EXCEPTION 'target column "%" of relation % has type %, expected geography or geometry', target_column, tbl, tgt_type
			USING ERRCODE = 'datatype_mismatch';
	END IF;

	-- ---- register the run ----
	IF retry_errors THEN
		DELETE FROM @extschema@.osv5m_errors e
		 WHERE e.tbl = osv5m_enrich.tbl AND e.image_column = osv5m_enrich.image_column;
	END IF;
	UPDATE @extschema@.osv5m_jobs j SET status = 'interrupted'
	 WHERE j.status = 'running' AND NOT @extschema@.osv5m_job_alive(j.leader_pid, j.started_at);
	k := @extschema@.osv5m_row_key(tbl);
	EXECUTE pg_catalog.format(
		'SELECT count(*) FROM %2$s t WHERE t.%3$I IS NULL AND t.%4$I IS NOT NULL'
		' AND NOT EXISTS (SELECT FROM @extschema@.osv5m_errors e'
		' WHERE e.tbl = $1 AND e.image_column = $2 AND e.row_key = %1$s)',
		k.expr, tbl, target_column, image_column)
	INTO total USING tbl, image_column;
	INSERT INTO @extschema@.osv5m_jobs (tbl, image_column, target_column, batch_size,
										workers, on_error, settings, rows_total)
	VALUES (tbl, image_column, target_column, batch_size, 0, on_error,
			@extschema@.osv5m_enrich_settings(), total)
	RETURNING job_id INTO job;
	RAISE NOTICE 'osv5m_enrich job %: % rows to geolocate in %', job, total, tbl;
	COMMIT;

	-- ---- background workers, if asked: the caller waits and reports ----
	IF workers > 1 AND total > 0 THEN
		started := @extschema@.osv5m_enrich_launch(job, workers);
		UPDATE @extschema@.osv5m_jobs SET workers = started WHERE job_id = job;
		IF started < workers THEN
			RAISE NOTICE 'osv5m_enrich job %: only % of % background workers could be started', job, started, workers
				USING HINT = 'Raise max_worker_processes; the calling backend does the rest of the work.';
		END IF;
		COMMIT;
		WHILE started > 0 LOOP
			-- one short transaction per second: the caller holds no
			-- snapshot for long, so VACUUM can clean up behind the workers
			running := @extschema@.osv5m_enrich_wait(job, 1000);
			SELECT * INTO f FROM @extschema@.osv5m_job_workers w
			 WHERE w.job_id = job AND w.status = 'failed' ORDER BY w.worker LIMIT 1;
			IF FOUND THEN
				PERFORM @extschema@.osv5m_enrich_terminate(job);
				UPDATE @extschema@.osv5m_jobs SET status = 'failed', error = f.message,
					   finished_at = pg_catalog.clock_timestamp()
				 WHERE job_id = job;
				COMMIT;
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
		END LOOP;
	END IF;

	-- ---- the caller's own batches: all the work with one worker, or what
	-- the workers left (rows locked by others, a worker that died) ----
	LOOP
		e_state := NULL;
		BEGIN
			res := @extschema@.osv5m_enrich_batch(job);
		EXCEPTION WHEN OTHERS THEN
			-- keep the error, commit the run's status, then raise it again
			-- (a transaction cannot end inside a block with handlers)
			GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_msg = MESSAGE_TEXT,
				e_detail = PG_EXCEPTION_DETAIL, e_hint = PG_EXCEPTION_HINT;
		END;
		IF e_state IS NOT NULL THEN
			UPDATE @extschema@.osv5m_jobs SET status = 'failed', error = e_msg,
				   finished_at = pg_catalog.clock_timestamp()
			 WHERE job_id = job;
			COMMIT;
			PERFORM @extschema@.osv5m_reraise(e_state, e_msg, e_detail, e_hint);
		END IF;
		COMMIT;
		EXIT WHEN res.done + res.failed = 0;
		RAISE NOTICE '%', @extschema@.osv5m_progress_line(job);
	END LOOP;

	PERFORM @extschema@.osv5m_enrich_worker_done(job, 0);
	UPDATE @extschema@.osv5m_jobs SET status = 'done', finished_at = pg_catalog.clock_timestamp()
	 WHERE job_id = job;
	COMMIT;
	RAISE NOTICE '% (finished)', @extschema@.osv5m_progress_line(job);
END
$$;

COMMENT ON PROCEDURE osv5m_enrich(regclass, name, name, integer, integer, text, boolean) IS
'geolocate every row of a table whose target column is NULL, in committed batches';

-- BEFORE INSERT OR UPDATE row trigger: TG_ARGV[0] is the image column,
-- TG_ARGV[1] the target column.  Sets the target from the image on INSERT
-- and when an UPDATE changes the image; a NULL image leaves the target as
-- the statement set it.
CREATE FUNCTION osv5m_geolocate_trigger()
RETURNS trigger
LANGUAGE plpgsql
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
	IF (SELECT count(*) FROM pg_catalog.pg_attribute a
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
	EXECUTE pg_catalog.format('SELECT to_jsonb(@extschema@.geolocate(($1).%I))', img_col)
	INTO loc USING NEW;
	IF loc IS NULL OR loc = 'null'::jsonb THEN
		RETURN NEW;
	END IF;
	-- the text form of a geography is its hex EWKB: exact, and readable by
	-- both geography and geometry columns
	NEW := jsonb_populate_record(NEW, jsonb_build_object(tgt_col, loc));
	RETURN NEW;
END
$$;

COMMENT ON FUNCTION osv5m_geolocate_trigger() IS
'BEFORE INSERT OR UPDATE trigger: sets TG_ARGV[1] to geolocate(TG_ARGV[0])';
-- ==== bulk enrichment (end) ====
