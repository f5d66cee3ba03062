--
-- enrich_tables: osv5m_enrich on every kind of table a user can name.
-- Plain, partitioned (two levels, a default partition, dropped columns, a
-- partition attached with another column order), inheritance (a child
-- and a grandchild), a foreign partition (postgres_fdw back to this
-- server), no primary key, a composite key, mixed-case quoted names; each
-- with 1 and 2 workers, cancelled in the middle and run again.  Then a
-- layout change between a cancel and a rerun, a freed ctid, and a second
-- run refused while one is working on the same rows.
--
-- The check compares every row's location with geolocate() of that row's
-- own image, computed beforehand one image at a time; it requires every
-- junk row to be in osv5m_errors exactly once, under the table that holds
-- it, its key and the MD5 of its image, no good row to be there, and the
-- rows whose location was set before the run to keep it.
--
\getenv abs_srcdir PG_ABS_SRCDIR
\set images :abs_srcdir '/test/data/images/'
\set gelu :abs_srcdir '/test/models/tiny-gelu'
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS osv5m CASCADE;
CREATE EXTENSION IF NOT EXISTS postgres_fdw;
CREATE EXTENSION IF NOT EXISTS dblink;
RESET client_min_messages;
SET osv5m.model_path = :'gelu';
SET osv5m.threads = 1;

-- 13 photos and 4 junk values, ids interleaved so that every partition
-- gets both.
CREATE TABLE et_src (id int PRIMARY KEY, name text UNIQUE, img bytea, junk boolean, expected geography);
INSERT INTO et_src (id, name, img, junk)
SELECT 1 + 4 * (row_number() OVER (ORDER BY f) - 1) / 3, f, pg_read_binary_file(:'images' || f), false
FROM pg_ls_dir(:'images') AS f
WHERE f ~ '^(jpeg_22[0-9]|jpeg_4|jpeg_rgb|jpeg_q30|jpeg_cmyk_320|png_rgb8|png_gray8|png_pal8_260)'
ORDER BY f LIMIT 13;
INSERT INTO et_src (id, name, img, junk) VALUES
	(4, 'junk ffff', '\xffffffff'::bytea, true),
	(8, 'junk deadbeef', '\xdeadbeef'::bytea, true),
	(12, 'junk truncated', (SELECT substr(img, 1, 300) FROM et_src WHERE name ~ '^jpeg_224x224'), true),
	(16, 'junk text', convert_to('not an image at all', 'UTF8'), true);
SELECT count(*) FILTER (WHERE NOT junk) AS photos, count(*) FILTER (WHERE junk) AS junk,
	   count(DISTINCT id) AS distinct_ids FROM et_src;
-- what each image alone gives
UPDATE et_src SET expected = geolocate(img) WHERE NOT junk;
-- a mix-up between two rows cannot pass the 1e-4 degree check below
SELECT min(ST_Distance(a.expected::geometry, b.expected::geometry)) > 0.01 AS predictions_apart
FROM et_src a JOIN et_src b ON a.id < b.id WHERE NOT a.junk AND NOT b.junk;

-- Fill table t: every source row, plus two photos (ids 101, 102) whose
-- location is already set to a value no model predicts.
CREATE FUNCTION et_fill(t regclass, img_col name, loc_col name) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE format('INSERT INTO %s (id, name, %I) SELECT id, name, img FROM et_src', t, img_col);
	EXECUTE format('INSERT INTO %s (id, name, %I, %I)
		SELECT 100 + id, ''preset:'' || name, img, ''SRID=4326;POINT(-33 -44)''
		FROM et_src WHERE NOT junk ORDER BY id LIMIT 2', t, img_col, loc_col);
END $$;

-- The check: key_expr is the row key the table's rows have, over alias t.
CREATE FUNCTION et_check(t regclass, img_col name, loc_col name, key_expr text,
	OUT photos bigint, OUT right_location bigint, OUT junk bigint, OUT junk_located bigint,
	OUT junk_errors_once bigint, OUT good_in_errors bigint, OUT other_errors bigint,
	OUT presets_kept bigint)
LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE format($q$
		WITH r AS (
			SELECT t.tableoid::regclass AS leaf, %4$s AS key, t.name,
				   t.%2$I AS img, t.%3$I::geometry AS loc, s.junk, s.expected::geometry AS expected
			  FROM %1$s t JOIN et_src s ON s.name = regexp_replace(t.name, '^preset:', '')),
		e AS (SELECT * FROM osv5m_errors
			  WHERE tbl IN (SELECT r.leaf FROM r) OR tbl = %1$L::regclass)
		SELECT count(*) FILTER (WHERE NOT junk AND name NOT LIKE 'preset:%%'),
			   count(*) FILTER (WHERE NOT junk AND name NOT LIKE 'preset:%%'
								AND ST_DWithin(loc, expected, 1e-4)),
			   count(*) FILTER (WHERE junk),
			   count(*) FILTER (WHERE junk AND loc IS NOT NULL),
			   count(*) FILTER (WHERE junk AND (SELECT count(*) FROM e
					WHERE e.tbl = r.leaf AND e.row_key = r.key AND e.image_md5 = md5(r.img)) = 1),
			   count(*) FILTER (WHERE NOT junk AND EXISTS (SELECT FROM e
					WHERE e.tbl = r.leaf AND e.row_key = r.key)),
			   (SELECT count(*) FROM e) - count(*) FILTER (WHERE junk),
			   count(*) FILTER (WHERE name LIKE 'preset:%%'
								AND ST_Equals(loc, 'SRID=4326;POINT(-33 -44)'::geometry))
		  FROM r$q$, t, img_col, loc_col, key_expr)
	INTO photos, right_location, junk, junk_located, junk_errors_once,
		 good_in_errors, other_errors, presets_kept;
END $$;

-- A trigger that makes each row take 50 ms, so that a statement timeout
-- cancels a run in the middle.  It is put on every physical table of t.
CREATE FUNCTION et_slow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	PERFORM pg_sleep(0.05);
	RETURN NEW;
END $$;
CREATE FUNCTION et_slow_on(t regclass, enable boolean) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
	leaf regclass;
BEGIN
	FOR leaf IN SELECT unnest(osv5m_leaf_tables(t)) LOOP
		IF enable THEN
			EXECUTE format('CREATE TRIGGER et_slow BEFORE UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION et_slow()', leaf);
		ELSE
			EXECUTE format('DROP TRIGGER et_slow ON %s', leaf);
		END IF;
	END LOOP;
END $$;

-- ---- the tables, each kind twice (for 1 and for 2 workers) ----------------
SELECT current_setting('unix_socket_directories') AS sockdir,
	   current_setting('port') AS port, current_database() AS db \gset
CREATE SERVER et_loopback FOREIGN DATA WRAPPER postgres_fdw
	OPTIONS (host :'sockdir', port :'port', dbname :'db', extensions 'osv5m, postgis');
CREATE USER MAPPING FOR CURRENT_USER SERVER et_loopback;
CREATE SCHEMA et_remote;
CREATE SCHEMA "My Schema";
-- the remote side's tables, committed before the other session reads them
CREATE TABLE et_remote.store_1 (id int, name text, img bytea, loc geography);
CREATE TABLE et_remote.store_2 (id int, name text, img bytea, loc geography);

CREATE FUNCTION et_make(w int) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	-- plain, primary key
	EXECUTE format('CREATE TABLE et_plain_%s (id int PRIMARY KEY, name text, img bytea, loc geography)', w);
	-- range partitioned in two levels, with a default partition
	EXECUTE format('CREATE TABLE et_range_%s (id int PRIMARY KEY, name text, img bytea, loc geography)
					PARTITION BY RANGE (id)', w);
	EXECUTE format('CREATE TABLE et_range_%1$s_a PARTITION OF et_range_%1$s FOR VALUES FROM (1) TO (7)', w);
	EXECUTE format('CREATE TABLE et_range_%1$s_b PARTITION OF et_range_%1$s FOR VALUES FROM (7) TO (100)
					PARTITION BY RANGE (id)', w);
	EXECUTE format('CREATE TABLE et_range_%1$s_b1 PARTITION OF et_range_%1$s_b FOR VALUES FROM (7) TO (12)', w);
	EXECUTE format('CREATE TABLE et_range_%1$s_b2 PARTITION OF et_range_%1$s_b FOR VALUES FROM (12) TO (100)', w);
	EXECUTE format('CREATE TABLE et_range_%1$s_def PARTITION OF et_range_%1$s DEFAULT', w);
	-- list partitioned, no key, a geometry target, a dropped column, and a
	-- partition made with another column order then attached
	EXECUTE format('CREATE TABLE et_list_%s (gone int, id int, name text, img bytea, loc geometry(Point, 4326))
					PARTITION BY LIST ((id %% 3))', w);
	EXECUTE format('ALTER TABLE et_list_%s DROP COLUMN gone', w);
	EXECUTE format('CREATE TABLE et_list_%1$s_0 PARTITION OF et_list_%1$s FOR VALUES IN (0)', w);
	EXECUTE format('CREATE TABLE et_list_%1$s_1 PARTITION OF et_list_%1$s FOR VALUES IN (1)', w);
	EXECUTE format('CREATE TABLE et_list_%1$s_2 (loc geometry(Point, 4326), extra text, name text, img bytea, id int)', w);
	EXECUTE format('ALTER TABLE et_list_%1$s_2 DROP COLUMN extra', w);
	EXECUTE format('ALTER TABLE et_list_%1$s ATTACH PARTITION et_list_%1$s_2 FOR VALUES IN (2)', w);
	-- inheritance: rows in the parent, a child and a grandchild; no key
	EXECUTE format('CREATE TABLE et_inh_%s (id int, name text, img bytea, loc geography)', w);
	EXECUTE format('CREATE TABLE et_inh_%1$s_c () INHERITS (et_inh_%1$s)', w);
	EXECUTE format('CREATE TABLE et_inh_%1$s_gc (note text) INHERITS (et_inh_%1$s_c)', w);
	-- composite primary key
	EXECUTE format('CREATE TABLE et_comp_%s (region text, id int, name text, img bytea, loc geography,
					PRIMARY KEY (region, id))', w);
	EXECUTE format('ALTER TABLE et_comp_%s ALTER COLUMN region SET DEFAULT ''r''', w);
	-- mixed-case quoted names
	EXECUTE format('CREATE TABLE "My Schema"."Photo Table %s" (id int PRIMARY KEY, name text,
					"Img Bytes" bytea, "Loc" geography)', w);
	-- a partition on another server (here: this one, through postgres_fdw)
	EXECUTE format('CREATE TABLE et_fdw_%s (id int, name text, img bytea, loc geography) PARTITION BY RANGE (id)', w);
	EXECUTE format('CREATE TABLE et_fdw_%1$s_local PARTITION OF et_fdw_%1$s FOR VALUES FROM (1) TO (9)', w);
	EXECUTE format('CREATE FOREIGN TABLE et_fdw_%1$s_remote PARTITION OF et_fdw_%1$s FOR VALUES FROM (9) TO (1000)
					SERVER et_loopback OPTIONS (schema_name ''et_remote'', table_name ''store_%1$s'')', w);

	PERFORM et_fill(format('et_plain_%s', w)::regclass, 'img', 'loc');
	PERFORM et_fill(format('et_range_%s', w)::regclass, 'img', 'loc');
	PERFORM et_fill(format('et_list_%s', w)::regclass, 'img', 'loc');
	PERFORM et_fill(format('et_inh_%s', w)::regclass, 'img', 'loc');
	EXECUTE format('WITH m AS (DELETE FROM ONLY et_inh_%1$s WHERE id %% 3 = 1 RETURNING *)
					INSERT INTO et_inh_%1$s_c SELECT * FROM m', w);
	EXECUTE format('WITH m AS (DELETE FROM ONLY et_inh_%1$s WHERE id %% 3 = 2 RETURNING *)
					INSERT INTO et_inh_%1$s_gc SELECT *, ''deep'' FROM m', w);
	PERFORM et_fill(format('et_comp_%s', w)::regclass, 'img', 'loc');
	EXECUTE format('UPDATE et_comp_%s SET region = ''r'' || (id %% 2)', w);
	PERFORM et_fill(format('"My Schema"."Photo Table %s"', w)::regclass, 'Img Bytes', 'Loc');
	PERFORM et_fill(format('et_fdw_%s', w)::regclass, 'img', 'loc');
END $$;
SELECT et_make(1), et_make(2);

-- rows per physical table: every leaf has some
SELECT tableoid::regclass AS leaf, count(*) AS rows FROM et_range_1 GROUP BY 1 ORDER BY 1;
SELECT tableoid::regclass AS leaf, count(*) AS rows FROM et_list_1 GROUP BY 1 ORDER BY 1;
SELECT tableoid::regclass AS leaf, count(*) AS rows FROM et_inh_1 GROUP BY 1 ORDER BY 1;
SELECT tableoid::regclass AS leaf, count(*) AS rows FROM et_fdw_1 GROUP BY 1 ORDER BY 1;
SELECT unnest(osv5m_leaf_tables('et_range_1')) AS range_leaves;
SELECT unnest(osv5m_leaf_tables('et_inh_1')) AS inheritance_leaves;

-- ---- each kind: cancelled in the middle, run again, checked -------------
CREATE TABLE et_kinds (kind text, tbl text, img name, loc name, key_expr text);
INSERT INTO et_kinds VALUES
	('plain', 'et_plain_%s', 'img', 'loc', 't.id::text'),
	('range', 'et_range_%s', 'img', 'loc', 't.id::text'),
	('list', 'et_list_%s', 'img', 'loc', 't.ctid::text'),
	('inheritance', 'et_inh_%s', 'img', 'loc', 't.ctid::text'),
	('composite', 'et_comp_%s', 'img', 'loc', 'ROW(t.region, t.id)::text'),
	('quoted', '"My Schema"."Photo Table %s"', 'Img Bytes', 'Loc', 't.id::text'),
	('foreign', 'et_fdw_%s', 'img', 'loc', 't.ctid::text');

CREATE TABLE et_results (kind text, workers int, photos bigint, right_location bigint,
	junk bigint, junk_located bigint, junk_errors_once bigint, good_in_errors bigint,
	other_errors bigint, presets_kept bigint, cancelled_run text, last_run text);

-- Each kind with w workers: a run that a statement timeout cancels after
-- 0.3 s (each row takes 50 ms: never finished by then), then a full run,
-- then the check.  CALL cannot run inside a function, so \gexec runs the
-- statements this query writes, in order.
-- Without dblink, the foreign partition is enriched by this backend
-- through postgres_fdw (its images cross to this server): the path tested
-- here.  With dblink, its own server enriches it (test/pg/scale_out.sh).
DROP EXTENSION dblink;
\set VERBOSITY terse
SET client_min_messages = warning;
SELECT s FROM et_kinds k CROSS JOIN generate_series(1, 2) w
CROSS JOIN LATERAL (VALUES
	(1, format('SELECT et_slow_on(%L, true)', format(k.tbl, w))),
	(2, 'SET statement_timeout = ''300ms'''),
	(3, format('CALL osv5m_enrich(%L, %L, %L, batch_size => 2, workers => %s)', format(k.tbl, w), k.img, k.loc, w)),
	(4, 'RESET statement_timeout'),
	(5, format('INSERT INTO et_results (kind, workers, cancelled_run)
				SELECT %L, %s, status FROM osv5m_progress ORDER BY job_id DESC LIMIT 1', k.kind, w)),
	(6, format('SELECT et_slow_on(%L, false)', format(k.tbl, w))),
	(7, format('CALL osv5m_enrich(%L, %L, %L, batch_size => 3, workers => %s)', format(k.tbl, w), k.img, k.loc, w)),
	(8, format('UPDATE et_results r SET (photos, right_location, junk, junk_located, junk_errors_once,
					good_in_errors, other_errors, presets_kept) =
				(SELECT * FROM et_check(%L, %L, %L, %L)),
				last_run = (SELECT status || '', '' || rows_left || '' left''
							FROM osv5m_progress ORDER BY job_id DESC LIMIT 1)
				WHERE kind = %L AND workers = %s', format(k.tbl, w), k.img, k.loc, k.key_expr, k.kind, w))
	) AS x(n, s)
ORDER BY k.kind, w, x.n \gexec
RESET client_min_messages;
\set VERBOSITY default
CREATE EXTENSION dblink;
-- Every kind: 13 photos, each with its own image's location; the 4 junk
-- rows without one and in osv5m_errors once each; nothing else there;
-- the 2 preset locations kept.  The cancelled run shows as interrupted.
SELECT * FROM et_results ORDER BY kind, workers;
SELECT count(*) AS kinds_right FROM et_results
WHERE photos = 13 AND right_location = 13 AND junk = 4 AND junk_located = 0
  AND junk_errors_once = 4 AND good_in_errors = 0 AND other_errors = 0 AND presets_kept = 2;
-- errors name the table that holds the row, and its key where it has one
SELECT tbl, key_column, row_key, sqlstate FROM osv5m_errors
WHERE tbl::text LIKE 'et_range_1%' OR tbl::text LIKE 'et_comp_1%' OR tbl::text LIKE '"My Schema"%1"'
ORDER BY tbl::text, row_key;

-- ---- the layout changes between a cancel and a rerun -------------------
-- A run on a list-partitioned table is cancelled; then partition b (with
-- rows still to do) is detached and a new partition c attached.  The rerun
-- works on the partitions the table has now: c is filled, b is left alone.
CREATE TABLE et_lay (part text DEFAULT 'a', id int, name text, img bytea, loc geography)
	PARTITION BY LIST (part);
CREATE TABLE et_lay_a PARTITION OF et_lay FOR VALUES IN ('a');
CREATE TABLE et_lay_b PARTITION OF et_lay FOR VALUES IN ('b');
SELECT et_fill('et_lay', 'img', 'loc');
UPDATE et_lay SET part = 'b' WHERE id % 2 = 0;
SELECT et_slow_on('et_lay', true);
SET client_min_messages = warning;
SET statement_timeout = '300ms';
\set VERBOSITY terse
CALL osv5m_enrich('et_lay', 'img', 'loc', batch_size => 2);
\set VERBOSITY default
RESET statement_timeout;
RESET client_min_messages;
SELECT et_slow_on('et_lay', false);
ALTER TABLE et_lay DETACH PARTITION et_lay_b;
CREATE TABLE et_lay_c (LIKE et_lay);
ALTER TABLE et_lay_c ALTER COLUMN part SET DEFAULT 'c';
SELECT et_fill('et_lay_c', 'img', 'loc');
ALTER TABLE et_lay ATTACH PARTITION et_lay_c FOR VALUES IN ('c');
CREATE TABLE et_lay_b_before AS SELECT id, loc FROM et_lay_b;
SET client_min_messages = warning;
CALL osv5m_enrich('et_lay', 'img', 'loc');
RESET client_min_messages;
SELECT count(*) AS detached_rows_changed
FROM et_lay_b b JOIN et_lay_b_before o USING (id) WHERE b.loc IS DISTINCT FROM o.loc;
SELECT count(*) FILTER (WHERE loc IS NULL) > 0 AS detached_rows_left_undone FROM et_lay_b;
SELECT * FROM et_check('et_lay_c', 'img', 'loc', 't.ctid::text');
SELECT count(*) FILTER (WHERE NOT s.junk) AS a_photos,
	   count(*) FILTER (WHERE NOT s.junk AND ST_DWithin(a.loc::geometry, coalesce(
			CASE WHEN a.name LIKE 'preset:%' THEN 'SRID=4326;POINT(-33 -44)'::geography END,
			s.expected)::geometry, 1e-4)) AS a_right,
	   count(*) FILTER (WHERE s.junk AND a.loc IS NULL) AS a_junk_without_location
FROM et_lay_a a JOIN et_src s ON s.name = regexp_replace(a.name, '^preset:', '');

-- ---- a freed ctid is not hidden by an old error --------------------------
-- A table without a primary key: the bad row's error names its ctid; the
-- row is deleted, VACUUM frees its slot, and a new photo lands there.
CREATE TABLE et_nopk (name text, img bytea, loc geography);
INSERT INTO et_nopk VALUES ('bad', '\xdeadbeef', NULL);
INSERT INTO et_nopk SELECT 'good1', img, NULL FROM et_src WHERE NOT junk ORDER BY id LIMIT 1;
SET client_min_messages = warning;
CALL osv5m_enrich('et_nopk', 'img', 'loc');
RESET client_min_messages;
SELECT row_key, sqlstate FROM osv5m_errors WHERE tbl = 'et_nopk'::regclass;
DELETE FROM et_nopk WHERE name = 'bad';
VACUUM et_nopk;
INSERT INTO et_nopk SELECT 'good2', img, NULL FROM et_src WHERE NOT junk ORDER BY id OFFSET 1 LIMIT 1;
SELECT ctid, name FROM et_nopk ORDER BY ctid;
SET client_min_messages = warning;
CALL osv5m_enrich('et_nopk', 'img', 'loc');
RESET client_min_messages;
SELECT n.name, ST_DWithin(n.loc::geometry, s.expected::geometry, 1e-4) AS own_location
FROM et_nopk n, et_src s
WHERE s.id = (SELECT id FROM et_src WHERE NOT junk ORDER BY id OFFSET CASE n.name WHEN 'good1' THEN 0 ELSE 1 END LIMIT 1)
ORDER BY n.name;
-- the same bytes at that ctid again are still skipped (one error, refreshed)
INSERT INTO et_nopk VALUES ('bad again', '\xdeadbeef', NULL);
SET client_min_messages = warning;
CALL osv5m_enrich('et_nopk', 'img', 'loc');
RESET client_min_messages;
SELECT count(*) AS errors, count(DISTINCT row_key) AS rows FROM osv5m_errors WHERE tbl = 'et_nopk'::regclass;

-- ---- a second run on rows a live run works on is refused ----------------
-- Another session (dblink) runs a slow job on a partitioned table; a run
-- on the table or on one of its partitions is refused while it lives, and
-- accepted once it is cancelled.  Progress then tells the truth.
CREATE TABLE et_busy (id int, name text, img bytea, loc geography) PARTITION BY RANGE (id);
CREATE TABLE et_busy_1 PARTITION OF et_busy FOR VALUES FROM (1) TO (9);
CREATE TABLE et_busy_2 PARTITION OF et_busy FOR VALUES FROM (9) TO (1000);
SELECT et_fill('et_busy', 'img', 'loc');
SELECT et_slow_on('et_busy', true);
ALTER SEQUENCE osv5m_jobs_job_id_seq RESTART 1000;
SELECT dblink_connect('et_other', format('host=%s port=%s dbname=%s options=''-c osv5m.model_path=%s''',
	:'sockdir', :'port', :'db', :'gelu'));
SELECT dblink_send_query('et_other', $$CALL osv5m_enrich('et_busy', 'img', 'loc', batch_size => 1)$$);
DO $$
BEGIN
	FOR i IN 1 .. 600 LOOP
		EXIT WHEN EXISTS (SELECT FROM osv5m_progress WHERE job_id = 1000 AND status = 'running' AND rows_done > 0);
		PERFORM pg_sleep(0.1);
	END LOOP;
END $$;
SELECT job_id, status, rows_done > 0 AS working FROM osv5m_progress WHERE job_id = 1000;
\set VERBOSITY terse
CALL osv5m_enrich('et_busy', 'img', 'loc');
CALL osv5m_enrich('et_busy_2', 'img', 'loc');
\set VERBOSITY default
-- a run that does not overlap goes ahead
SET client_min_messages = warning;
CALL osv5m_enrich('et_plain_1', 'img', 'loc');
RESET client_min_messages;
SELECT dblink_cancel_query('et_other');
SELECT count(*) AS rows_from_cancelled_call FROM dblink_get_result('et_other', false) AS r(x text);
SELECT dblink_disconnect('et_other');
SELECT et_slow_on('et_busy', false);
SET client_min_messages = warning;
CALL osv5m_enrich('et_busy', 'img', 'loc');
RESET client_min_messages;
SELECT job_id, status, CASE WHEN status = 'done' THEN rows_left END AS rows_left
FROM osv5m_progress WHERE job_id >= 1000 ORDER BY job_id;
SELECT * FROM et_check('et_busy', 'img', 'loc', 't.ctid::text');
