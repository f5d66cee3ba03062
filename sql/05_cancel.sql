--
-- 05_cancel: statement_timeout stops a call in the middle of an inference.
--
-- The model is made here, in the data directory (the server's own files):
-- test/pg/make-slow-model.pl writes a model with tiny files whose single
-- inference takes seconds (3137 tokens over 40 layers).  The abort callback
-- is polled between transformer blocks, so the cancel must come within a
-- block or two of the timeout, far sooner than the inference would end.
-- (test/run also times pg_cancel_backend from another session.)
--
\getenv abs_srcdir PG_ABS_SRCDIR
SELECT current_setting('data_directory') || '/osv5m-slow-model' AS slow \gset
\set cmd 'perl ' :abs_srcdir '/test/pg/make-slow-model.pl ' :slow ' ' :abs_srcdir '/test/models/tiny-f16/quadtree_10_1000.csv 40'
COPY (SELECT) TO PROGRAM :'cmd';
SET osv5m.model_path = :'slow';
SELECT osv5m_model_info()->'num_layers' AS num_layers,
	   osv5m_model_info()->'gflop_per_image' AS gflop_per_image;

-- canceled by statement_timeout, within a second
CREATE FUNCTION pg_temp.time_to_cancel(img bytea) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
	t0 timestamptz := clock_timestamp();
BEGIN
	PERFORM geolocate(img);
	RETURN 'finished after ' || (clock_timestamp() - t0);
EXCEPTION WHEN query_canceled THEN
	RETURN CASE WHEN clock_timestamp() - t0 < interval '1 s'
				THEN 'canceled within 1 s' ELSE 'canceled after ' || (clock_timestamp() - t0) END;
END $$;
SET statement_timeout = '200ms';
SELECT pg_temp.time_to_cancel(img) FROM photos WHERE name = 'jpeg_224x224.jpg';
-- the plain error, as a client sees it
SELECT geolocate(img) FROM photos WHERE name = 'jpeg_224x224.jpg';
RESET statement_timeout;

-- the backend and its model are fine afterwards
SET osv5m.model_path TO DEFAULT;
\set gelu :abs_srcdir '/test/models/tiny-gelu'
SET osv5m.model_path = :'gelu';
SELECT count(geolocate(img)) AS located FROM photos;
