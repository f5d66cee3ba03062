--
-- precision: the setting osv5m.precision.  fp32, the default, is the
-- published model's arithmetic; bf16 rounds the weights and the activations
-- entering the matrix products to bfloat16 and sums in float32; int8
-- quantizes them to 8 bits per row and sums in integers.  bf16 moves the
-- results a little, as the PyTorch reference's bf16 mode does, int8 a
-- little more, and by the same amount every time: in this session, in a
-- parallel worker, in a trigger and in a new session.  (osv5m_enrich
-- with background workers and the pack cache: test/pg/shell-tests.sh.)
--
\getenv abs_srcdir PG_ABS_SRCDIR
\set images :abs_srcdir '/test/data/images/'
\set gelu :abs_srcdir '/test/models/tiny-gelu'
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS osv5m CASCADE;
RESET client_min_messages;
SET osv5m.model_path = :'gelu';
SET osv5m.threads = 1;

-- ---- the setting -------------------------------------------------------------
-- fp32 by default, for any user to change; only its three values.
SHOW osv5m.precision;
SELECT name, setting, context, vartype, enumvals, boot_val
FROM pg_settings WHERE name = 'osv5m.precision';
SET osv5m.precision = 'fp16';
SET osv5m.precision = 'int4';
SET osv5m.precision = '';
SHOW osv5m.precision;
-- enum settings ignore case, as PostgreSQL's own do
SET osv5m.precision = 'BF16';
SHOW osv5m.precision;
RESET osv5m.precision;

-- ---- what osv5m_model_info() says --------------------------------------------
-- the precision of the next call, and whether this CPU runs each natively
-- (it depends on the CPU: only its type is shown, and fp32 is always native)
SELECT osv5m_model_info()->>'precision' AS precision,
	   jsonb_typeof(osv5m_model_info()->'precisions_native'->'bf16') AS bf16_native,
	   osv5m_model_info()->'precisions_native'->'fp32' AS fp32_native,
	   (SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(osv5m_model_info()->'precisions_native') AS k)
		   AS precisions,
	   jsonb_typeof(osv5m_model_info()->'precisions_native'->'int8') AS int8_native,
	   osv5m_model_info()->'pack_cache_path_bf16' AS pack_cache_path_bf16,
	   osv5m_model_info()->'pack_cache_path_int8' AS pack_cache_path_int8;
SET osv5m.precision = 'bf16';
SELECT osv5m_model_info()->>'precision' AS precision;
RESET osv5m.precision;

-- ---- fp32, bf16 and int8 on every test image -------------------------------------
CREATE TABLE precision_photos (name text PRIMARY KEY, img bytea);
INSERT INTO precision_photos
SELECT f, pg_read_binary_file(:'images' || f)
FROM pg_ls_dir(:'images') AS f
WHERE f ~ '\.(jpg|png)$';
-- the images geolocate() reads (the others raise an error in both precisions)
CREATE FUNCTION pg_temp.readable(b bytea) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
	PERFORM geolocate(b);
	RETURN true;
EXCEPTION WHEN OTHERS THEN
	RETURN false;
END $$;
DELETE FROM precision_photos WHERE NOT pg_temp.readable(img);
SELECT count(*) >= 40 AS enough_images FROM precision_photos;

CREATE TABLE precision_results (name text, precision text, loc geography,
								feature real[], cell int, probability float8,
								second_cell int, second_probability float8);
CREATE FUNCTION pg_temp.run(label text) RETURNS void
LANGUAGE sql AS $$
	INSERT INTO precision_results
	SELECT p.name, label, geolocate(p.img), geolocate_embedding(p.img),
		   t1.cell, t1.probability, t2.cell, t2.probability
	FROM precision_photos p
	JOIN LATERAL geolocate_topk(p.img, 2) t1 ON t1.rank = 1
	JOIN LATERAL geolocate_topk(p.img, 2) t2 ON t2.rank = 2
$$;
SELECT pg_temp.run('fp32');
SET osv5m.precision = 'bf16';
SELECT pg_temp.run('bf16');
SELECT pg_temp.run('bf16 again');
SET osv5m.precision = 'int8';
SELECT pg_temp.run('int8');
SELECT pg_temp.run('int8 again');
RESET osv5m.precision;
SELECT pg_temp.run('fp32 again');

-- ||a - b|| / ||b||
CREATE FUNCTION pg_temp.relative_error(a real[], b real[]) RETURNS float8
LANGUAGE sql IMMUTABLE
RETURN (SELECT sqrt(sum((x - y)::float8 ^ 2)) / sqrt(sum(y::float8 ^ 2))
		FROM unnest(a, b) AS u(x, y));

-- bf16 changes every image's feature, and little.  Each product rounds
-- its two operands to 8 significant bits (a relative error of at most
-- 2^-9, about 0.1 % on average), and the 13 products between the pixels
-- and tiny-gelu's feature (the patch embedding, 6 per block, 2 blocks) add
-- such errors up roughly in quadrature: about 0.5 %.  Bound: 2 %, which an
-- arithmetic much coarser than bf16 (or one of the wrong weights) exceeds.
-- The point then stays in its cell and moves with the regression outputs,
-- by at most scale_tanh (1.2) times their change times the cell's
-- half-size: with changes under 2 % and tiny-gelu's widest cell (22
-- degrees, some 2,400 km) that is under 1.2 x 0.02 x 1,200 km, about
-- 30 km.  Unless the two most likely cells are nearly tied in fp32
-- (probabilities within 2 % of each other): then bf16 may pick the
-- second, and the point is in that cell instead.
SELECT count(*) AS images,
	   count(*) FILTER (WHERE b.feature <> f.feature) AS feature_changed,
	   count(*) FILTER (WHERE pg_temp.relative_error(b.feature, f.feature) < 0.02) AS feature_close,
	   count(*) FILTER (WHERE (b.cell = f.cell AND ST_Distance(b.loc, f.loc) < 30000) OR
							  (b.cell = f.second_cell AND f.second_probability > 0.98 * f.probability))
		   AS point_close
FROM precision_results f JOIN precision_results b USING (name)
WHERE f.precision = 'fp32' AND b.precision = 'bf16';

-- int8 changes every image's feature, more than bf16.  Each product
-- quantizes its two operands to 8 bits per row (an error of up to half a
-- step of the row's largest value / 127, far more than bf16's on the small
-- values of a row): measured with the tool (osv5m embed --precision int8
-- against fp32 on these images) 0.66 % to 1.67 % on tiny-gelu's feature.
-- Bound: 5 %, three times the worst.  The point then moves by at most
-- 1.2 x 0.05 x 1,200 km, some 75 km, inside its cell; or lands in the
-- second cell where the first two are tied within 5 % in fp32.
SELECT count(*) AS images,
	   count(*) FILTER (WHERE b.feature <> f.feature) AS feature_changed,
	   count(*) FILTER (WHERE pg_temp.relative_error(b.feature, f.feature) < 0.05) AS feature_close,
	   count(*) FILTER (WHERE (b.cell = f.cell AND ST_Distance(b.loc, f.loc) < 75000) OR
							  (b.cell = f.second_cell AND f.second_probability > 0.95 * f.probability))
		   AS point_close
FROM precision_results f JOIN precision_results b USING (name)
WHERE f.precision = 'fp32' AND b.precision = 'int8';

-- bf16 against the PyTorch reference's bf16 mode (test/golden/models/
-- tiny-gelu/bf16, written by test/reference/make_golden.py, read by
-- test/pg/golden_csv.py), on the images it has: the same top cell, and the
-- feature and top-1 probability within the tolerances of the core's own
-- bf16 golden test (test/unit/test_fidelity.c, BF16_FEATURE_RTOL and
-- BF16_PROB_TOL: both sum in another order, which flips a few bfloat16
-- roundings).
CREATE TEMP TABLE bf16_golden (image text, rank int, cell int, probability float8,
							   lat float8, lon float8, regression_rms float8, feature real[]);
\set cmd 'python3 ' :abs_srcdir '/test/pg/golden_csv.py ' :abs_srcdir '/test/golden/models/tiny-gelu/bf16'
COPY bf16_golden FROM PROGRAM :'cmd' WITH (FORMAT csv);
SELECT count(*) AS golden_images,
	   count(*) FILTER (WHERE b.cell = g.cell) AS same_cell,
	   count(*) FILTER (WHERE pg_temp.relative_error(b.feature, g.feature) <= 3e-3) AS feature_ok,
	   count(*) FILTER (WHERE abs(b.probability - g.probability) <= 2.5e-3) AS probability_ok
FROM bf16_golden g JOIN precision_results b ON b.name = g.image
WHERE g.rank = 1 AND b.precision = 'bf16';

-- the same bits each time, in either precision
SELECT a.precision, count(*) AS images,
	   count(*) FILTER (WHERE ST_AsEWKB(a.loc::geometry) = ST_AsEWKB(b.loc::geometry)
						  AND a.feature = b.feature) AS identical
FROM precision_results a JOIN precision_results b USING (name)
WHERE (a.precision, b.precision) IN (('fp32', 'fp32 again'), ('bf16', 'bf16 again'),
									('int8', 'int8 again'))
GROUP BY a.precision ORDER BY 1;

-- ---- in a parallel worker, which takes the leader's settings -------------------
-- force_parallel_mode runs the whole query in a worker (single copy: the
-- leader only gathers), whatever the table's size and statistics.
SET osv5m.precision = 'bf16';
SET force_parallel_mode = on;
SET jit = off;
EXPLAIN (COSTS OFF) SELECT geolocate(img) FROM precision_photos;
SELECT count(*) AS bf16_in_parallel
FROM (SELECT name, geolocate(img) AS loc FROM precision_photos) s
JOIN precision_results r USING (name)
WHERE r.precision = 'bf16' AND ST_AsEWKB(s.loc::geometry) = ST_AsEWKB(r.loc::geometry);
RESET force_parallel_mode;
RESET jit;

-- ---- in the trigger, which runs in the inserting session ---------------------
CREATE TABLE precision_trigger (name text, img bytea, loc geography);
CREATE TRIGGER precision_trigger_loc BEFORE INSERT OR UPDATE ON precision_trigger
	FOR EACH ROW EXECUTE FUNCTION osv5m_geolocate_trigger('img', 'loc');
SHOW osv5m.precision;
INSERT INTO precision_trigger (name, img) SELECT name, img FROM precision_photos;
RESET osv5m.precision;
SELECT count(*) AS bf16_by_trigger
FROM precision_trigger t JOIN precision_results r USING (name)
WHERE r.precision = 'bf16' AND ST_AsEWKB(t.loc::geometry) = ST_AsEWKB(r.loc::geometry);

-- ---- in a new session ---------------------------------------------------------
-- SET lasts as long as its session: the new one starts in fp32, and gives
-- the same bf16 bits again when asked, loading the model for its first
-- call in bf16.
\c
SHOW osv5m.precision;
SET osv5m.model_path = :'gelu';
SET osv5m.precision = 'bf16';
SELECT count(*) AS images,
	   count(*) FILTER (WHERE ST_AsEWKB(geolocate(p.img)::geometry) = ST_AsEWKB(r.loc::geometry)
						  AND geolocate_embedding(p.img) = r.feature) AS same_bf16_bits
FROM precision_photos p JOIN precision_results r USING (name)
WHERE r.precision = 'bf16';
SET osv5m.precision = 'int8';
SELECT count(*) AS images,
	   count(*) FILTER (WHERE ST_AsEWKB(geolocate(p.img)::geometry) = ST_AsEWKB(r.loc::geometry)
						  AND geolocate_embedding(p.img) = r.feature) AS same_int8_bits
FROM precision_photos p JOIN precision_results r USING (name)
WHERE r.precision = 'int8';

DROP TABLE precision_photos, precision_results, precision_trigger;
