--
-- security: nobody acts through someone else's job.
--
-- An application role with no grant on the extension's tables runs its
-- own jobs, watches their progress, lists and retries its errors.  An
-- ordinary role (mallory) cannot see, redirect or forge other roles' jobs,
-- worker rows or errors, nor pass settings other than osv5m.* ones to a
-- worker, nor launch workers for a job that is not its own running one,
-- nor start more than osv5m.max_workers.  Functions that others can create
-- in public or in a schema first on search_path are never called by the
-- extension's functions, procedure, trigger or workers; and every function
-- of the extension whose body is parsed at call time carries a safe
-- search_path (checked in the catalog).
--
\getenv abs_srcdir PG_ABS_SRCDIR
\set images :abs_srcdir '/test/data/images/'
\set gelu :abs_srcdir '/test/models/tiny-gelu'
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS osv5m CASCADE;
CREATE EXTENSION IF NOT EXISTS dblink;
DROP ROLE IF EXISTS regress_osv5m_app;
DROP ROLE IF EXISTS regress_osv5m_mallory;
RESET client_min_messages;
CREATE ROLE regress_osv5m_app LOGIN;
CREATE ROLE regress_osv5m_mallory LOGIN;
-- what an administrator gives each: the model (a superuser-only setting,
-- as a role default so that background workers have it too) and nothing
-- on the extension's tables
ALTER ROLE regress_osv5m_app SET osv5m.model_path = :'gelu';
ALTER ROLE regress_osv5m_mallory SET osv5m.model_path = :'gelu';
SET osv5m.model_path = :'gelu';
SET osv5m.threads = 1;
-- many databases still let everyone create in public
GRANT CREATE ON SCHEMA public TO PUBLIC;

-- ---- the catalog: every function parsed at call time has a safe search_path
-- (LANGUAGE C has no body; SQL-standard bodies were bound at creation;
-- the procedures, which commit or call procedures that do and so cannot
-- carry a SET clause, set it themselves: checked below)
SELECT p.oid::regprocedure AS unsafe_function
FROM pg_proc p
JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'osv5m'
JOIN pg_language l ON l.oid = p.prolang
WHERE l.lanname IN ('sql', 'plpgsql') AND p.prosqlbody IS NULL
  AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false)
  AND p.prokind <> 'p'
ORDER BY 1;
-- each procedure: its first statement is COMMIT or sets the search_path,
-- and every COMMIT is followed by the search_path
SELECT p.proname AS procedure,
	   bool_or(n = 1 AND (rest ~ '\mBEGIN(\s|--[^\n]*\n)*$'
						  OR rest ~ '\mBEGIN(\s|--[^\n]*\n)*PERFORM pg_catalog\.set_config\(''search_path'', ''pg_catalog, pg_temp'', true\);'))
		   AS starts_safe,
	   count(*) FILTER (WHERE n > 1) AS commits,
	   count(*) FILTER (WHERE n > 1 AND rest ~ '^\s*PERFORM pg_catalog\.set_config\(''search_path'', ''pg_catalog, pg_temp'', true\);')
		   AS commits_then_safe_search_path
FROM pg_proc p
JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'osv5m',
	 regexp_split_to_table(p.prosrc, 'COMMIT;') WITH ORDINALITY AS s(rest, n)
WHERE p.prokind = 'p'
GROUP BY p.proname
ORDER BY 1;

-- ---- the tables --------------------------------------------------------------
CREATE TABLE sec_photos (id int PRIMARY KEY, img bytea, loc geography);
INSERT INTO sec_photos
SELECT row_number() OVER (ORDER BY f), pg_read_binary_file(:'images' || f)
FROM pg_ls_dir(:'images') AS f
WHERE f ~ '^(jpeg_22[0-9]|png_rgb8|jpeg_rgb)' ORDER BY f;
INSERT INTO sec_photos VALUES (100, '\xdeadbeef', NULL), (101, '\xffff', NULL);
CREATE TABLE sec_expected AS SELECT id, geolocate(img) AS loc FROM sec_photos WHERE id < 100;
GRANT SELECT ON sec_expected TO PUBLIC;
-- job numbers appear in messages
ALTER SEQUENCE osv5m_jobs_job_id_seq RESTART 5000;
CREATE TABLE sec_app_photos (LIKE sec_photos INCLUDING ALL);
INSERT INTO sec_app_photos SELECT * FROM sec_photos;
ALTER TABLE sec_app_photos OWNER TO regress_osv5m_app;
-- mallory's bait: a table whose update trigger makes her superuser if a
-- superuser's run ever writes it
CREATE TABLE sec_bait_log (who name);
GRANT INSERT ON sec_bait_log TO PUBLIC;
SET ROLE regress_osv5m_mallory;
CREATE TABLE sec_bait (id int PRIMARY KEY, img bytea, loc geography);
CREATE FUNCTION sec_bait_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO public.sec_bait_log VALUES (current_user);
	EXECUTE 'ALTER ROLE regress_osv5m_mallory SUPERUSER';
	RETURN NEW;
END $$;
CREATE TRIGGER sec_bait BEFORE UPDATE ON sec_bait FOR EACH ROW EXECUTE FUNCTION sec_bait_trigger();
RESET ROLE;
INSERT INTO sec_bait SELECT id, img FROM sec_photos WHERE id < 100;

-- ---- an application role, with no grant on the extension's tables -----------
SET ROLE regress_osv5m_app;
SET client_min_messages = warning;
CALL osv5m_enrich('sec_app_photos', 'img', 'loc', batch_size => 3, workers => 2);
RESET client_min_messages;
SELECT count(*) FILTER (WHERE ST_DWithin(a.loc::geometry, e.loc::geometry, 1e-4)) AS right_locations,
	   count(*) AS photos
FROM sec_app_photos a JOIN sec_expected e USING (id);
SELECT table_name, status, rows_done, rows_failed, rows_left, owner FROM osv5m_progress;
SELECT tbl, row_key, sqlstate FROM osv5m_errors ORDER BY row_key;
SET client_min_messages = warning;
CALL osv5m_enrich('sec_app_photos', 'img', 'loc', retry_errors => true);
RESET client_min_messages;
SELECT status, rows_done, rows_failed FROM osv5m_progress ORDER BY job_id DESC LIMIT 1;
-- the superuser-only settings stay out of reach
SET osv5m.max_workers = 64;
SET osv5m.model_path = '/tmp';
RESET ROLE;

-- ---- the superuser's own run, and mallory's attempts at it -------------------
SET client_min_messages = warning;
CALL osv5m_enrich('sec_photos', 'img', 'loc', batch_size => 2);
RESET client_min_messages;
SELECT max(job_id) AS su_job FROM osv5m_jobs WHERE tbl = 'sec_photos'::regclass \gset
SET ROLE regress_osv5m_mallory;
-- nothing of other roles is visible
SELECT count(*) AS jobs_seen FROM osv5m_jobs;
SELECT count(*) AS workers_seen FROM osv5m_job_workers;
SELECT count(*) AS errors_seen FROM osv5m_errors;
SELECT count(*) AS progress_seen FROM osv5m_progress;
-- nor changeable: what a run re-reads is fixed, other rows are invisible
UPDATE osv5m_jobs SET tbl = 'sec_bait' WHERE status = 'running';
UPDATE osv5m_jobs SET settings = '{"search_path": "evil, pg_catalog"}';
UPDATE osv5m_jobs SET precision = 'bf16';
UPDATE osv5m_jobs SET status = 'failed' WHERE job_id = :su_job;
DELETE FROM osv5m_jobs WHERE job_id = :su_job;
DELETE FROM osv5m_errors;
-- forged rows are refused, or count for mallory alone
INSERT INTO osv5m_job_workers (job_id, worker, status, message) VALUES (:su_job, 7, 'failed', 'forged');
INSERT INTO osv5m_jobs (tbl, image_column, target_column, batch_size, workers, on_error, leaves, owner)
VALUES ('sec_photos', 'img', 'loc', 1, 0, 'skip', '{sec_photos}', 'postgres');
INSERT INTO osv5m_errors (tbl, image_column, key_column, row_key, sqlstate, message, owner)
VALUES ('sec_photos', 'img', 'id', '1', '22P03', 'fake', 'postgres');
INSERT INTO osv5m_errors (tbl, image_column, key_column, row_key, sqlstate, message)
SELECT 'sec_photos', 'img', 'id', g::text, '22P03', 'fake' FROM generate_series(1, 200) g;
-- the internal entry points refuse jobs that are not her own running ones
SELECT osv5m_enrich_launch(:su_job, 2);
SELECT * FROM osv5m_enrich_batch(:su_job);
SELECT osv5m_enrich_worker_setup(:su_job, 3);
RESET ROLE;
SELECT job_id = :su_job AS same_job, tbl, status, settings ? 'search_path' AS injected
FROM osv5m_jobs WHERE job_id = :su_job;
SELECT count(*) AS forged_worker_rows FROM osv5m_job_workers WHERE message = 'forged';
-- the superuser's next run is not fooled by mallory's fake errors
UPDATE sec_photos SET loc = NULL;
SET client_min_messages = warning;
CALL osv5m_enrich('sec_photos', 'img', 'loc');
RESET client_min_messages;
SELECT count(*) FILTER (WHERE ST_DWithin(p.loc::geometry, e.loc::geometry, 1e-4)) AS right_locations
FROM sec_photos p JOIN sec_expected e USING (id);
SELECT status, rows_done, rows_failed FROM osv5m_progress ORDER BY job_id DESC LIMIT 1;

-- ---- redirecting a live superuser run ------------------------------------
-- The superuser's run goes on in another session (slow rows); mallory
-- tries to point it at her bait table while it runs.
UPDATE sec_photos SET loc = NULL;
CREATE FUNCTION sec_slow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(0.05); RETURN NEW; END $$;
CREATE TRIGGER sec_slow BEFORE UPDATE ON sec_photos FOR EACH ROW EXECUTE FUNCTION sec_slow();
SELECT current_setting('unix_socket_directories') AS sockdir,
	   current_setting('port') AS port, current_database() AS db \gset
SELECT dblink_connect('sec_su', format('host=%s port=%s dbname=%s user=%s options=''-c osv5m.model_path=%s''',
	:'sockdir', :'port', :'db', current_user, :'gelu'));
SELECT dblink_send_query('sec_su', $$CALL osv5m_enrich('sec_photos', 'img', 'loc', batch_size => 1)$$);
DO $$
BEGIN
	FOR i IN 1 .. 600 LOOP
		EXIT WHEN EXISTS (SELECT FROM osv5m_progress WHERE table_name = 'sec_photos'::regclass
						  AND status = 'running' AND rows_done > 0);
		PERFORM pg_sleep(0.1);
	END LOOP;
END $$;
SELECT count(*) AS live_superuser_runs FROM osv5m_progress
WHERE table_name = 'sec_photos'::regclass AND status = 'running';
SET ROLE regress_osv5m_mallory;
UPDATE osv5m_jobs SET tbl = 'sec_bait' WHERE status = 'running';
UPDATE osv5m_jobs SET leaves = '{sec_bait}' WHERE status = 'running';
UPDATE osv5m_jobs SET status = 'running' WHERE status = 'running';
RESET ROLE;
SELECT count(*) AS rows_from_superuser_run FROM dblink_get_result('sec_su') AS r(x text);
SELECT dblink_disconnect('sec_su');
DROP TRIGGER sec_slow ON sec_photos;
SELECT count(*) FILTER (WHERE ST_DWithin(p.loc::geometry, e.loc::geometry, 1e-4)) AS right_locations
FROM sec_photos p JOIN sec_expected e USING (id);
SELECT rolsuper AS mallory_is_superuser FROM pg_roles WHERE rolname = 'regress_osv5m_mallory';
SELECT count(*) AS bait_trigger_calls, count(loc) AS bait_rows_written FROM sec_bait_log, sec_bait;

-- ---- settings injected through a job of her own -------------------------
-- Mallory registers a job of her own whose settings name search_path and
-- starts a worker for it: the worker refuses the setting (and would run
-- as mallory anyway).
SET ROLE regress_osv5m_mallory;
INSERT INTO osv5m_jobs (tbl, image_column, target_column, batch_size, workers, on_error, settings, rows_total, leaves)
VALUES ('sec_bait', 'img', 'loc', 10, 0, 'skip', '{"search_path": "evil, pg_catalog"}', 0, '{sec_bait}')
RETURNING job_id AS m_job \gset
SELECT osv5m_enrich_launch(:m_job, 1) AS started;
SELECT osv5m_enrich_wait(:m_job, 60000) AS still_running;
SELECT worker, status, sqlstate, message FROM osv5m_job_workers WHERE job_id = :m_job;
-- and at most osv5m.max_workers (4 by default) for one job
CREATE TABLE sec_m AS SELECT * FROM sec_bait;
SET client_min_messages = warning;
CALL osv5m_enrich('sec_m', 'img', 'loc', workers => 64);
RESET client_min_messages;
SELECT workers FROM osv5m_jobs ORDER BY job_id DESC LIMIT 1;
RESET ROLE;

-- ---- hijacking functions in public and first on search_path --------------
-- Same-signature and better-matching versions of the built-ins the
-- extension calls, in a schema first on search_path and in public; each
-- records that it was called.
CREATE TABLE sec_hijack_log (fn text);
GRANT INSERT ON sec_hijack_log TO PUBLIC;
CREATE SCHEMA evil;
GRANT USAGE ON SCHEMA evil TO PUBLIC;
CREATE FUNCTION sec_make_hijackers(s name) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
	f record;
	n integer := 0;
BEGIN
	-- every pg_catalog function of these names that plpgsql can imitate
	FOR f IN
		SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS args,
			   format_type(p.prorettype, NULL) AS ret
		FROM pg_proc p
		WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.prokind = 'f' AND NOT p.proretset
		  AND p.proname IN ('format', 'set_config', 'current_setting', 'md5', 'hashtext', 'mod',
				'to_jsonb', 'jsonb_build_object', 'jsonb_populate_record', 'jsonb_each_text',
				'jsonb_strip_nulls', 'array_position', 'array_length', 'left', 'quote_ident',
				'quote_literal', 'clock_timestamp', 'pg_backend_pid', 'to_regrole', 'pg_has_role',
				'make_interval', 'round', 'array_to_string', 'pg_advisory_xact_lock', 'lower', 'now')
		  AND NOT EXISTS (SELECT FROM unnest(p.proargtypes::regtype[]) t
						  WHERE t::text IN ('"any"', 'internal', 'cstring'))
		  AND p.prorettype NOT IN ('record'::regtype, 'trigger'::regtype, 'void'::regtype)
		  AND p.provariadic = 0
		UNION ALL
		-- exact matches that beat pg_catalog's wider or polymorphic ones
		SELECT * FROM (VALUES ('to_jsonb', 'geography', 'jsonb'), ('mod', 'bigint, integer', 'bigint'),
							  ('hashtext', 'name', 'integer'), ('md5', 'bytea', 'text'),
							  ('array_position', 'tid[], tid', 'integer'),
							  ('left', 'text, bigint', 'text')) v
	LOOP
		BEGIN
			EXECUTE format('CREATE FUNCTION %I.%I(%s) RETURNS %s LANGUAGE plpgsql AS %L',
				s, f.proname, f.args, f.ret,
				format('BEGIN INSERT INTO public.sec_hijack_log VALUES (%L); RETURN NULL; END', s || '.' || f.proname));
			n := n + 1;
		EXCEPTION WHEN duplicate_function THEN
			NULL;	-- the same signature twice in the list
		END;
	END LOOP;
	-- operators on the types the extension compares
	FOR f IN SELECT t FROM unnest(ARRAY['text', 'integer', 'bigint', 'tid', 'oid', 'name',
										 'timestamp with time zone', 'numeric', 'jsonb', 'regclass']) t
	LOOP
		EXECUTE format('CREATE FUNCTION %I.hijack_op(%s, %s) RETURNS boolean LANGUAGE plpgsql AS %L',
			s, f.t, f.t, format('BEGIN INSERT INTO public.sec_hijack_log VALUES (%L); RETURN NULL; END',
								s || '.operator(' || f.t || ')'));
		EXECUTE format('CREATE OPERATOR %I.= (LEFTARG = %s, RIGHTARG = %s, FUNCTION = %I.hijack_op)', s, f.t, f.t, s);
		EXECUTE format('CREATE OPERATOR %I.< (LEFTARG = %s, RIGHTARG = %s, FUNCTION = %I.hijack_op)', s, f.t, f.t, s);
		EXECUTE format('CREATE OPERATOR %I.> (LEFTARG = %s, RIGHTARG = %s, FUNCTION = %I.hijack_op)', s, f.t, f.t, s);
		n := n + 3;
	END LOOP;
	RETURN n;
END $$;
SELECT sec_make_hijackers('evil') > 50 AS evil_hijackers,
	   sec_make_hijackers('public') > 50 AS public_hijackers;

-- The hijackers work: unqualified calls and comparisons reach them.
SET search_path = evil, pg_catalog, public;
SELECT quote_ident('x') IS NULL AS hijacked_function, 'a'::text = 'b'::text IS NULL AS hijacked_operator,
	   to_jsonb('POINT(1 2)'::geography) IS NULL AS hijacked_by_exact_type;
RESET search_path;
SELECT fn, count(*) AS calls FROM sec_hijack_log GROUP BY fn ORDER BY fn;
TRUNCATE sec_hijack_log;

-- Everything a user calls, with evil first on search_path: enrichment
-- in the caller and in workers, the trigger, the views and functions.
UPDATE sec_photos SET loc = NULL;
CREATE TABLE sec_trig (id int, img bytea, loc geography);
CREATE TRIGGER sec_trig BEFORE INSERT OR UPDATE ON sec_trig
	FOR EACH ROW EXECUTE FUNCTION osv5m_geolocate_trigger('img', 'loc');
SET search_path = evil, pg_catalog, public;
SET client_min_messages = warning;
CALL osv5m_enrich('sec_photos', 'img', 'loc', batch_size => 3, workers => 2);
CALL osv5m_enrich('sec_photos', 'img', 'loc', retry_errors => true);
INSERT INTO sec_trig SELECT id, img FROM sec_photos WHERE id < 100;
UPDATE sec_trig SET img = img || ''::bytea;
SELECT 1 FROM osv5m_progress LIMIT 0;
SELECT 1 FROM osv5m_cells() LIMIT 0;
SELECT 1 FROM sec_photos, geolocate_topk(img, 2) WHERE id = 1 LIMIT 0;
RESET client_min_messages;
RESET search_path;
SELECT fn, count(*) AS calls FROM sec_hijack_log GROUP BY fn ORDER BY fn;
SELECT count(*) FILTER (WHERE ST_DWithin(p.loc::geometry, e.loc::geometry, 1e-4)) AS right_locations
FROM sec_photos p JOIN sec_expected e USING (id);
SELECT count(*) FILTER (WHERE ST_DWithin(t.loc::geometry, e.loc::geometry, 1e-4)) AS trigger_right
FROM sec_trig t JOIN sec_expected e USING (id);

-- ---- clean up the roles (the tables stay for inspection) -----------------
DROP SCHEMA evil CASCADE;
SET client_min_messages = warning;
DROP FUNCTION sec_make_hijackers(name);
DO $$
DECLARE
	f regprocedure;
BEGIN
	FOR f IN SELECT p.oid FROM pg_proc p
			 WHERE p.pronamespace = 'public'::regnamespace
			   AND p.prosrc LIKE '%sec_hijack_log%'
	LOOP
		EXECUTE format('DROP FUNCTION %s CASCADE', f);
	END LOOP;
END $$;
RESET client_min_messages;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
DELETE FROM osv5m_errors WHERE owner IN ('regress_osv5m_app'::regrole, 'regress_osv5m_mallory'::regrole);
DELETE FROM osv5m_jobs WHERE owner IN ('regress_osv5m_app'::regrole, 'regress_osv5m_mallory'::regrole);
DROP OWNED BY regress_osv5m_app, regress_osv5m_mallory;
DROP ROLE regress_osv5m_app;
DROP ROLE regress_osv5m_mallory;
