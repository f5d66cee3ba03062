--
-- pytorch_models: model directories in the published layout (config.json in
-- the authors' nested form + pytorch_model.bin written by torch.save, no
-- quadtree CSV) give the PyTorch reference's answers through SQL:
-- geolocate(), geolocate_topk(), geolocate_embedding() and osv5m_enrich(),
-- with the tolerances of the core's golden tests (test/unit/test_fidelity.c).
--
-- The reference answers come from test/golden/models/MODEL-pt/, written by
-- test/reference/make_golden.py with PyTorch, read by test/pg/golden_csv.py.
--
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS osv5m CASCADE;
RESET client_min_messages;
\getenv abs_srcdir PG_ABS_SRCDIR
\set images :abs_srcdir '/test/data/images/'
\set models :abs_srcdir '/test/models/'
\set golden :abs_srcdir '/test/golden/models/'
\set gelu_pt :abs_srcdir '/test/models/tiny-gelu-pt'
SET osv5m.threads = 1;

CREATE TEMP TABLE golden (model text, image text, rank int, cell int,
						  probability float8, lat float8, lon float8,
						  regression_rms float8, feature real[]);
CREATE FUNCTION pg_temp.load_golden(model text, dir text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE format('COPY golden (image, rank, cell, probability, lat, lon, regression_rms, feature) '
				   'FROM PROGRAM %L WITH (FORMAT csv)',
				   'python3 ' || current_setting('osv5m_test.src') ||
				   '/test/pg/golden_csv.py ' || dir);
	UPDATE golden SET model = $1 WHERE golden.model IS NULL;
END $$;
SELECT set_config('osv5m_test.src', :'abs_srcdir', false) IS NOT NULL AS src_set;
SELECT pg_temp.load_golden(m, :'golden' || m)
FROM unnest(ARRAY['tiny-gelu-pt', 'tiny-quickgelu-pt', 'tiny-f16-pt', 'tiny-bf16-pt']) AS m;
SELECT model, count(DISTINCT image) AS images, count(*) AS answers
FROM golden GROUP BY model ORDER BY model;

CREATE TEMP TABLE photos AS
SELECT DISTINCT image, pg_read_binary_file(:'images' || image) AS img FROM golden;

-- ||a - b|| / ||b||
CREATE FUNCTION pg_temp.relative_error(a real[], b real[]) RETURNS float8
LANGUAGE sql IMMUTABLE
RETURN (SELECT sqrt(sum((x - y)::float8 ^ 2)) / sqrt(sum(y::float8 ^ 2))
		FROM unnest(a, b) AS u(x, y));

-- Everything one model answers for the golden images, and how far it is
-- from the reference: a point's tolerance is 1e-4 degrees plus what a
-- regression error of 1e-4 (relative) moves it in its cell, as in the
-- core's golden test.
CREATE TEMP TABLE answers (model text, image text, rank int, cell int,
						   ref_cell int, prob_error float8,
						   lat float8, lon float8, ref_lat float8, ref_lon float8,
						   tol_lat float8, tol_lon float8,
						   feature_error float8, geolocate_equal bool);
CREATE FUNCTION pg_temp.answer(model_name text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
	scale float8;
BEGIN
	PERFORM set_config('osv5m.model_path', current_setting('osv5m_test.src') ||
					   '/test/models/' || model_name, false);
	scale := (osv5m_model_info()->>'scale_tanh')::float8;
	INSERT INTO answers
	SELECT model_name, g.image, g.rank, t.cell, g.cell,
		   abs(t.probability - g.probability), t.lat, t.lon, g.lat, g.lon,
		   1e-4 + scale * 1e-4 * g.regression_rms * (t.max_lat - t.min_lat),
		   1e-4 + scale * 1e-4 * g.regression_rms * (t.max_lon - t.min_lon),
		   CASE WHEN g.rank = 1 THEN pg_temp.relative_error(geolocate_embedding(p.img), g.feature) END,
		   CASE WHEN g.rank = 1 THEN
				abs(ST_Y(geolocate(p.img)::geometry) - t.lat) < 1e-9 AND
				abs(ST_X(geolocate(p.img)::geometry) - t.lon) < 1e-9 END
	FROM golden g
	JOIN photos p USING (image)
	JOIN LATERAL osv5m_geolocate_topk_raw(p.img, 5) t ON t.rank = g.rank
	WHERE g.model = model_name;
END $$;
-- how far a point is from the reference, in units of its tolerance
CREATE FUNCTION pg_temp.point_error(lat float8, lon float8, a answers) RETURNS float8
LANGUAGE sql IMMUTABLE
RETURN greatest(abs(lat - a.ref_lat) / a.tol_lat, abs(lon - a.ref_lon) / a.tol_lon);
SELECT pg_temp.answer(m)
FROM unnest(ARRAY['tiny-gelu-pt', 'tiny-quickgelu-pt', 'tiny-f16-pt', 'tiny-bf16-pt']) AS m;

-- Per model: every cell the reference's, probabilities within 1e-5, points
-- within their tolerance (<= 1), features within 1e-4, geolocate() = top 1.
SELECT model, count(*) AS answers,
	   count(*) FILTER (WHERE cell = ref_cell) AS same_cell,
	   count(*) FILTER (WHERE prob_error <= 1e-5) AS prob_ok,
	   count(*) FILTER (WHERE pg_temp.point_error(lat, lon, answers) <= 1) AS point_ok,
	   count(feature_error) FILTER (WHERE feature_error <= 1e-4) AS feature_ok,
	   count(*) FILTER (WHERE geolocate_equal) AS geolocate_is_top1
FROM answers GROUP BY model ORDER BY model;
-- what failed, if anything did
SELECT model, image, rank, cell, ref_cell, prob_error,
	   pg_temp.point_error(lat, lon, answers) AS point_error, feature_error
FROM answers
WHERE cell <> ref_cell OR prob_error > 1e-5 OR pg_temp.point_error(lat, lon, answers) > 1
   OR feature_error > 1e-4
ORDER BY 1, 2, 3;

-- The model says where its weights and cells came from.
SELECT osv5m_model_info()->>'weights_format' AS format,
	   osv5m_model_info()->>'cells_source' AS cells,
	   osv5m_model_info()->>'quadtree_path' IS NULL AS no_csv,
	   osv5m_model_info()->>'fingerprint' ~ '^sha256:[0-9a-f]{64}$' AS fingerprint;

-- osv5m_enrich() with a published-layout model, in two background workers
-- (which load the model themselves), osv5m.images_per_run images per run:
-- each row gets the reference's point.
SET osv5m.model_path = :'gelu_pt';
SET client_min_messages = warning;	-- the progress notices carry timings
CREATE TABLE pt_enrich (id serial PRIMARY KEY, image text, img bytea, loc geography);
INSERT INTO pt_enrich (image, img)
SELECT image, img FROM photos, generate_series(1, 3) ORDER BY image;
CALL osv5m_enrich('pt_enrich', 'img', 'loc', workers => 2, batch_size => 4);
SELECT count(*) AS rows, count(loc) AS located,
	   count(*) FILTER (WHERE pg_temp.point_error(ST_Y(e.loc::geometry), ST_X(e.loc::geometry), a) <= 1)
		   AS reference_point
FROM pt_enrich e
JOIN answers a ON a.image = e.image AND a.model = 'tiny-gelu-pt' AND a.rank = 1;
SELECT status, settings->>'osv5m.model_path' LIKE '%/tiny-gelu-pt' AS job_model
FROM osv5m_jobs WHERE tbl = 'pt_enrich'::regclass;

-- again one image per run, as geolocate() runs them: each row's stored point
-- is then geolocate() of that row alone, to the last bit (with several
-- images per run they agree to float32 rounding only; see the README)
UPDATE pt_enrich SET loc = NULL;
SET osv5m.images_per_run = 1;
CALL osv5m_enrich('pt_enrich', 'img', 'loc', workers => 2, batch_size => 4);
SELECT count(loc) AS located,
	   count(*) FILTER (WHERE NOT ST_Equals(loc::geometry, geolocate(img)::geometry)) AS differ
FROM pt_enrich;
DROP TABLE pt_enrich;
RESET osv5m.images_per_run;
RESET osv5m.model_path;
RESET client_min_messages;
