--
-- enrich: bulk enrichment.  The plain UPDATE and its parallel plan,
-- osv5m_enrich() with on_error 'skip' and 'stop', resuming after a cancel,
-- background workers, the progress view, the trigger.  Every write to a
-- row is logged by a trigger, to prove each row is written exactly once.
-- (Crash recovery and cancels from another session: test/pg/enrich_jobs.sh.)
--
\getenv abs_srcdir PG_ABS_SRCDIR
\set images :abs_srcdir '/test/data/images/'
\set gelu :abs_srcdir '/test/models/tiny-gelu'
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS osv5m CASCADE;
RESET client_min_messages;
SET osv5m.model_path = :'gelu';
SET osv5m.threads = 1;
-- job numbers appear in messages: start them at 1
ALTER SEQUENCE osv5m_jobs_job_id_seq RESTART;

-- 20 good images, a truncated JPEG, bytes that are no image, and a NULL.
CREATE TABLE enrich_photos (id int PRIMARY KEY, name text, img bytea, loc geography);
INSERT INTO enrich_photos (id, name, img)
SELECT row_number() OVER (ORDER BY f), f, pg_read_binary_file(:'images' || f)
FROM pg_ls_dir(:'images') AS f
WHERE f ~ '^(jpeg_[0-9]|png_rgb|png_gray8|jpeg_rgb|jpeg_q30|jpeg_cmyk_320|jpeg_progressive_800)'
ORDER BY f;
SELECT count(*) AS good_images FROM enrich_photos;
INSERT INTO enrich_photos (id, name, img) VALUES
	(101, 'truncated', (SELECT substr(img, 1, 300) FROM enrich_photos WHERE name = 'jpeg_224x224.jpg')),
	(102, 'not an image', '\x00010203040506070809'::bytea),
	(103, 'no image', NULL);

-- The expected answers, computed by the plain UPDATE in one transaction.
CREATE TABLE enrich_expected AS SELECT id, img, loc FROM enrich_photos WHERE id <= 100;
BEGIN;
UPDATE enrich_expected SET loc = geolocate(img) WHERE loc IS NULL;
COMMIT;
SELECT count(loc) AS located FROM enrich_expected;

-- Every write that fills loc, with the process that made it.
CREATE TABLE enrich_log (id int, pid int);
CREATE FUNCTION enrich_log_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	IF NEW.loc IS NOT NULL AND OLD.loc IS NULL THEN
		INSERT INTO enrich_log VALUES (NEW.id, pg_backend_pid());
	END IF;
	RETURN NEW;
END $$;
CREATE TRIGGER enrich_log_write AFTER UPDATE ON enrich_photos
	FOR EACH ROW EXECUTE FUNCTION enrich_log_write();

-- Each row written once, with the right value; errors recorded.  The
-- right value is geolocate()'s to within 1e-4 degrees, far closer than any
-- two of these images' predictions: images that share a run of the network
-- (osv5m.images_per_run) get it bit for bit where OpenBLAS runs its AVX-512
-- kernels, to float32 rounding with its AVX2 ones.  One image per run is
-- bit for bit everywhere (checked below).
CREATE FUNCTION enrich_check(OUT located bigint, OUT writes bigint,
							 OUT rows_written bigint, OUT right_values bigint,
							 OUT errors bigint)
LANGUAGE sql AS $$
	SELECT (SELECT count(loc) FROM enrich_photos),
		   (SELECT count(*) FROM enrich_log),
		   (SELECT count(DISTINCT id) FROM enrich_log),
		   (SELECT count(*) FROM enrich_photos p JOIN enrich_expected e USING (id)
			 WHERE ST_DWithin(p.loc::geometry, e.loc::geometry, 1e-4)),
		   (SELECT count(*) FROM osv5m_errors WHERE tbl = 'enrich_photos'::regclass)
$$;

-- ---- a parallel plan for SELECT geolocate(img) -------------------------
-- Forced on this small table by making parallelism look free; the
-- function is evaluated in the workers, under the Gather.
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SET max_parallel_workers_per_gather = 2;
EXPLAIN (COSTS OFF, VERBOSE) SELECT geolocate(img) FROM enrich_expected;
SELECT count(*) AS equal_in_parallel
FROM (SELECT id, geolocate(img) AS loc FROM enrich_expected) s
JOIN enrich_expected e USING (id)
WHERE ST_Equals(s.loc::geometry, e.loc::geometry);
RESET parallel_setup_cost;
RESET parallel_tuple_cost;
RESET min_parallel_table_scan_size;
RESET max_parallel_workers_per_gather;

-- ---- several images per run of the network ------------------------------
-- osv5m_geolocate_batch, which osv5m_enrich uses: one row per element, in
-- order, across runs of 3; a point for each image, the error geolocate()
-- raises for the others, nothing for a NULL.
SET osv5m.images_per_run = 3;
CREATE TABLE enrich_batch AS
SELECT b.*, e.loc
FROM osv5m_geolocate_batch(ARRAY[
		(SELECT img FROM enrich_expected WHERE id = 1), NULL,
		(SELECT img FROM enrich_photos WHERE id = 102),
		(SELECT img FROM enrich_expected WHERE id = 2),
		(SELECT img FROM enrich_photos WHERE id = 101),
		(SELECT img FROM enrich_expected WHERE id = 3),
		(SELECT img FROM enrich_expected WHERE id = 4)]) b
LEFT JOIN enrich_expected e ON e.id = CASE b.ord WHEN 1 THEN 1 WHEN 4 THEN 2
									  WHEN 6 THEN 3 WHEN 7 THEN 4 END;
SELECT ord, ST_DWithin(osv5m_point_geography(location)::geometry, loc::geometry, 1e-4) AS right_value,
	   sqlstate, message, hint
FROM enrich_batch ORDER BY ord;
DROP TABLE enrich_batch;
RESET osv5m.images_per_run;

-- One image per run writes bit for bit what geolocate() returns.
SET osv5m.images_per_run = 1;
SET client_min_messages = warning;
CALL osv5m_enrich('enrich_photos', 'img', 'loc');
RESET client_min_messages;
RESET osv5m.images_per_run;
SELECT count(*) AS exactly_geolocate
FROM enrich_photos p JOIN enrich_expected e USING (id)
WHERE ST_Equals(p.loc::geometry, e.loc::geometry);
UPDATE enrich_photos SET loc = NULL;
TRUNCATE enrich_log;
DELETE FROM osv5m_errors;
DELETE FROM osv5m_jobs;
ALTER SEQUENCE osv5m_jobs_job_id_seq RESTART;

-- ---- arguments -----------------------------------------------------------
\set VERBOSITY terse
CALL osv5m_enrich('enrich_photos', 'img', 'loc', batch_size => 0);
CALL osv5m_enrich('enrich_photos', 'img', 'loc', workers => 0);
CALL osv5m_enrich('enrich_photos', 'img', 'loc', workers => 65);
CALL osv5m_enrich('enrich_photos', 'img', 'loc', on_error => 'ignore');
CALL osv5m_enrich('enrich_photos', 'image', 'loc');
CALL osv5m_enrich('enrich_photos', 'img', 'location');
CALL osv5m_enrich('enrich_photos', 'name', 'loc');
CALL osv5m_enrich('enrich_photos', 'img', 'name');
CALL osv5m_enrich('no_such_table', 'img', 'loc');
-- it commits, so not inside a transaction block
BEGIN;
CALL osv5m_enrich('enrich_photos', 'img', 'loc');
ROLLBACK;
\set VERBOSITY default

-- ---- on_error => 'stop': the first bad row raises ----------------------
SET client_min_messages = warning;
\set SHOW_CONTEXT never
CALL osv5m_enrich('enrich_photos', 'img', 'loc', batch_size => 100, on_error => 'stop');
\set SHOW_CONTEXT errors
RESET client_min_messages;
-- the batch with the bad row was rolled back: nothing written, nothing recorded
SELECT * FROM enrich_check();

-- ---- on_error => 'skip' (the default) ----------------------------------
SET client_min_messages = warning;
CALL osv5m_enrich('enrich_photos', 'img', 'loc', batch_size => 5);
RESET client_min_messages;
SELECT * FROM enrich_check();
SELECT key_column, row_key, sqlstate, message FROM osv5m_errors
WHERE tbl = 'enrich_photos'::regclass ORDER BY row_key;
SELECT status, rows_done, rows_failed, rows_left, workers, time_left
FROM osv5m_progress ORDER BY job_id;

-- A rerun finds nothing to do: bad rows already recorded are not retried.
SET client_min_messages = warning;
CALL osv5m_enrich('enrich_photos', 'img', 'loc');
RESET client_min_messages;
SELECT * FROM enrich_check();
SELECT status, rows_done, rows_failed, rows_left FROM osv5m_progress
ORDER BY job_id DESC LIMIT 1;

-- retry_errors => true tries them again (and records them again).
SET client_min_messages = warning;
CALL osv5m_enrich('enrich_photos', 'img', 'loc', retry_errors => true);
RESET client_min_messages;
SELECT * FROM enrich_check();
SELECT status, rows_done, rows_failed, rows_left FROM osv5m_progress
ORDER BY job_id DESC LIMIT 1;

-- ---- resume after a cancel ---------------------------------------------
-- A slow trigger makes every row take 0.1 s; the statement timeout cancels
-- the run after about 10 rows, in the middle of a batch of 2.
UPDATE enrich_photos SET loc = NULL;
TRUNCATE enrich_log;
CREATE FUNCTION enrich_slow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	PERFORM pg_sleep(0.1);
	RETURN NEW;
END $$;
CREATE TRIGGER enrich_slow BEFORE UPDATE ON enrich_photos
	FOR EACH ROW EXECUTE FUNCTION enrich_slow();
SET client_min_messages = warning;
SET statement_timeout = '1050ms';
\set VERBOSITY terse
CALL osv5m_enrich('enrich_photos', 'img', 'loc', batch_size => 2);
\set VERBOSITY default
RESET statement_timeout;
RESET client_min_messages;
-- whole batches only: an even number of rows, some but not all
SELECT located > 0 AND located < 20 AS some_done, located % 2 = 0 AS whole_batches,
	   writes = located AS written_once
FROM enrich_check();
SELECT status, rows_done % 2 = 0 AS whole_batches FROM osv5m_progress
ORDER BY job_id DESC LIMIT 1;
DROP TRIGGER enrich_slow ON enrich_photos;
-- the rerun does the rest, and no row twice
SET client_min_messages = warning;
CALL osv5m_enrich('enrich_photos', 'img', 'loc', batch_size => 2);
RESET client_min_messages;
SELECT * FROM enrich_check();

-- ---- two background workers --------------------------------------------
UPDATE enrich_photos SET loc = NULL;
TRUNCATE enrich_log;
SET client_min_messages = warning;
CALL osv5m_enrich('enrich_photos', 'img', 'loc', batch_size => 2, workers => 2,
				  retry_errors => true);
RESET client_min_messages;
SELECT * FROM enrich_check();
-- two processes wrote, neither of them the caller
SELECT count(DISTINCT pid) AS writers,
	   bool_and(pid <> pg_backend_pid()) AS not_the_caller
FROM enrich_log;
SELECT status, rows_done, rows_failed, rows_left, workers FROM osv5m_progress
ORDER BY job_id DESC LIMIT 1;
SELECT worker, status, rows_done + rows_failed > 0 AS did_work
FROM osv5m_job_workers
WHERE job_id = (SELECT max(job_id) FROM osv5m_jobs) ORDER BY worker;

-- A worker whose share of the rows is done helps with what is left of the
-- others'.  Here the share of worker 2 (half the rows, by the hash of the
-- key) is filled before the run, so every row worker 2 writes is one it
-- took over; 0.1 s per row gives it the time to start.
UPDATE enrich_photos SET loc = NULL;
ALTER TABLE enrich_photos DISABLE TRIGGER enrich_log_write;
UPDATE enrich_photos SET loc = 'SRID=4326;POINT(0 0)'
WHERE mod(hashtext(id::text)::int8 + 2147483648, 2) = 1;
ALTER TABLE enrich_photos ENABLE TRIGGER enrich_log_write;
TRUNCATE enrich_log;
CREATE TRIGGER enrich_slow BEFORE UPDATE ON enrich_photos
	FOR EACH ROW EXECUTE FUNCTION enrich_slow();
SET client_min_messages = warning;
CALL osv5m_enrich('enrich_photos', 'img', 'loc', batch_size => 2, workers => 2);
RESET client_min_messages;
DROP TRIGGER enrich_slow ON enrich_photos;
SELECT w.worker, count(l.id) > 0 AS wrote
FROM osv5m_job_workers w LEFT JOIN enrich_log l ON l.pid = w.pid
WHERE w.job_id = (SELECT max(job_id) FROM osv5m_jobs) AND w.worker > 0
GROUP BY w.worker ORDER BY w.worker;
SELECT count(*) = count(DISTINCT id) AS written_once,
	   (SELECT count(*) FROM enrich_photos WHERE loc IS NULL AND img IS NOT NULL
		AND id NOT IN (SELECT row_key::int FROM osv5m_errors)) AS left_undone
FROM enrich_log;

-- A worker's 'stop' error is raised by the caller, with the row and worker
-- (one bad row left, so that which worker fails first does not matter).
UPDATE enrich_photos SET loc = NULL;
UPDATE enrich_photos SET img = NULL WHERE id = 101;
TRUNCATE enrich_log;
DELETE FROM osv5m_errors;
SET client_min_messages = warning;
\set SHOW_CONTEXT never
CALL osv5m_enrich('enrich_photos', 'img', 'loc', batch_size => 100, workers => 2,
				  on_error => 'stop');
\set SHOW_CONTEXT errors
RESET client_min_messages;
SELECT status, error FROM osv5m_progress ORDER BY job_id DESC LIMIT 1;
SELECT writes = located AS written_once, errors FROM enrich_check();

-- ---- the trigger ---------------------------------------------------------
CREATE TABLE enrich_trig (id int PRIMARY KEY, img bytea, loc geography, note text);
CREATE TRIGGER enrich_trig_loc BEFORE INSERT OR UPDATE ON enrich_trig
	FOR EACH ROW EXECUTE FUNCTION osv5m_geolocate_trigger('img', 'loc');
INSERT INTO enrich_trig (id, img) SELECT id, img FROM enrich_expected WHERE id IN (1, 2);
INSERT INTO enrich_trig (id, img) VALUES (3, NULL);
SELECT t.id, ST_Equals(t.loc::geometry, e.loc::geometry) AS right_value
FROM enrich_trig t LEFT JOIN enrich_expected e USING (id) ORDER BY t.id;
-- an UPDATE that leaves the image alone leaves the target alone
UPDATE enrich_trig SET loc = 'POINT(1 2)', note = 'kept' WHERE id = 1;
UPDATE enrich_trig SET note = 'still kept' WHERE id = 1;
SELECT ST_AsText(loc) FROM enrich_trig WHERE id = 1;
-- a new image gives a new location
UPDATE enrich_trig SET img = (SELECT img FROM enrich_expected WHERE id = 3) WHERE id IN (1, 3);
SELECT t.id, ST_Equals(t.loc::geometry, e.loc::geometry) AS right_value
FROM enrich_trig t, enrich_expected e WHERE e.id = 3 ORDER BY t.id;
-- a bad image fails the statement
\set SHOW_CONTEXT never
INSERT INTO enrich_trig (id, img) VALUES (4, '\x0001'::bytea);
\set SHOW_CONTEXT errors
-- misuse
CREATE TABLE enrich_trig_bad (img bytea, loc geography);
CREATE TRIGGER enrich_trig_bad BEFORE INSERT ON enrich_trig_bad
	FOR EACH ROW EXECUTE FUNCTION osv5m_geolocate_trigger('img');
\set VERBOSITY terse
INSERT INTO enrich_trig_bad VALUES (NULL, NULL);
DROP TRIGGER enrich_trig_bad ON enrich_trig_bad;
CREATE TRIGGER enrich_trig_bad BEFORE INSERT ON enrich_trig_bad
	FOR EACH ROW EXECUTE FUNCTION osv5m_geolocate_trigger('image', 'loc');
INSERT INTO enrich_trig_bad VALUES (NULL, NULL);
DROP TRIGGER enrich_trig_bad ON enrich_trig_bad;
CREATE TRIGGER enrich_trig_bad AFTER INSERT ON enrich_trig_bad
	FOR EACH ROW EXECUTE FUNCTION osv5m_geolocate_trigger('img', 'loc');
INSERT INTO enrich_trig_bad VALUES (NULL, NULL);
\set VERBOSITY default

DROP TABLE enrich_photos, enrich_expected, enrich_log, enrich_trig, enrich_trig_bad;
DROP FUNCTION enrich_log_write(), enrich_check(), enrich_slow();
DELETE FROM osv5m_errors;
DELETE FROM osv5m_jobs;
