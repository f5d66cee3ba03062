--
-- 03_model: osv5m_cells(), osv5m_model_info(), switching models, model
-- errors and who may set what.
--
\getenv abs_srcdir PG_ABS_SRCDIR
\set images :abs_srcdir '/test/data/images/'
\set models :abs_srcdir '/test/models/'
\set gelu :models 'tiny-gelu'
\set quickgelu :models 'tiny-quickgelu'
\set bf16 :models 'tiny-bf16'
\set f16 :models 'tiny-f16'
\set cli :abs_srcdir '/osv5m'
SET osv5m.model_path = :'gelu';

-- The quadtree: one row per line of the CSV, centroid = (mean_lat,
-- mean_lon), bounds = the min/max rectangle.
CREATE TEMP TABLE csv (cluster_id int, min_lat float8, min_lon float8,
	max_lat float8, max_lon float8, mean_lat float8, mean_lon float8);
\set csv_path :gelu '/quadtree_10_1000.csv'
COPY csv FROM :'csv_path' WITH (FORMAT csv, HEADER);
SELECT count(*) AS cells, min(cell), max(cell) FROM osv5m_cells();
SELECT count(*) AS cells_equal_to_csv
FROM osv5m_cells() c JOIN csv ON csv.cluster_id = c.cell
WHERE ST_Y(c.centroid::geometry) = csv.mean_lat
  AND ST_X(c.centroid::geometry) = csv.mean_lon
  AND ST_XMin(c.bounds::geometry) = csv.min_lon
  AND ST_YMin(c.bounds::geometry) = csv.min_lat
  AND ST_XMax(c.bounds::geometry) = csv.max_lon
  AND ST_YMax(c.bounds::geometry) = csv.max_lat;
SELECT DISTINCT GeometryType(centroid::geometry), GeometryType(bounds::geometry),
	   ST_SRID(bounds::geometry)
FROM osv5m_cells();

-- A spatial join: which cell's rectangle holds each prediction.  The
-- regressed point may fall a little outside its own cell (the head scales
-- the offset by up to 1.2 times the cell's half-size), so only count.
SELECT count(*) > 0 AS some_predictions_inside_a_cell
FROM photos p JOIN osv5m_cells() c ON ST_Covers(c.bounds, p.loc);

-- What was loaded (times, pid and what the CPU runs natively vary, so
-- only their presence is shown).
SELECT key, CASE WHEN key IN ('loaded_at', 'load_ms', 'backend_pid', 'last_call_ms',
							  'kernels', 'file_size', 'precisions_native')
			THEN jsonb_typeof(value) ELSE value::text END AS value
FROM jsonb_each(osv5m_model_info())
WHERE key NOT LIKE '%path'
ORDER BY key;
SELECT osv5m_model_info()->>'model_path' = :'gelu' AS model_path,
	   osv5m_model_info()->>'weights_path' = :'gelu' || '/model.safetensors' AS weights_path,
	   osv5m_model_info()->>'quadtree_path' = :'gelu' || '/quadtree_10_1000.csv' AS quadtree_path,
	   (osv5m_model_info()->>'file_size')::bigint =
		 (pg_stat_file(:'gelu' || '/model.safetensors')).size AS file_size;

-- osv5m.threads is what the next call uses.
SET osv5m.threads = 2;
SELECT osv5m_model_info()->'threads' AS threads;
RESET osv5m.threads;
SELECT osv5m_model_info()->'threads' AS threads;

-- Changing osv5m.model_path loads the other model in this same backend.
SET osv5m.model_path = :'quickgelu';
SELECT osv5m_model_info()->'num_cells' AS num_cells,
	   osv5m_model_info()->'hidden_act' AS hidden_act,
	   osv5m_model_info()->>'model_path' = :'quickgelu' AS switched;
SELECT count(*) AS cells FROM osv5m_cells();

-- Every test model agrees with the tool on one image, and describes itself.
CREATE TEMP TABLE cli (model text, line text);
\set cmd 'for m in ' :gelu ' ' :quickgelu ' ' :bf16 ' ' :f16 '; do printf "%s\\t" "$m"; ' :cli ' geolocate --model "$m" --threads 1 ' :images 'jpeg_420_640x480.jpg; done'
COPY cli FROM PROGRAM :'cmd';
CREATE FUNCTION pg_temp.check_model(model text,
	OUT dtype text, OUT num_cells int, OUT hidden_size int, OUT image_size int,
	OUT hidden_act text, OUT quadtree_file text, OUT same_as_cli boolean)
LANGUAGE plpgsql AS $$
DECLARE
	j jsonb;
	info jsonb;
	loc geography;
BEGIN
	SELECT line::jsonb INTO j FROM cli WHERE cli.model = check_model.model;
	PERFORM set_config('osv5m.model_path', model, false);
	SELECT geolocate(img) INTO loc FROM photos WHERE name = 'jpeg_420_640x480.jpg';
	info := osv5m_model_info();
	dtype := info->>'dtype';
	num_cells := info->'num_cells';
	hidden_size := info->'hidden_size';
	image_size := info->'image_size';
	hidden_act := info->>'hidden_act';
	quadtree_file := substring(info->>'quadtree_path' FROM '[^/]+$');
	same_as_cli := abs(ST_Y(loc::geometry) - (j->>'lat')::float8) < 1e-9
				   AND abs(ST_X(loc::geometry) - (j->>'lon')::float8) < 1e-9;
END $$;
SELECT substring(model FROM '[^/]+$') AS model, m.*
FROM cli, pg_temp.check_model(model) AS m
ORDER BY 1;

-- A directory without a model: a configuration error that says what to do.
CREATE FUNCTION pg_temp.error_of(query text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
	hint text;
BEGIN
	EXECUTE query;
	RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS hint = PG_EXCEPTION_HINT;
	RETURN SQLSTATE || ': ' || SQLERRM || CASE WHEN hint <> '' THEN ' (hint: ' || hint || ')' ELSE '' END;
END $$;
SET osv5m.model_path = '/nonexistent/osv5m-model';
SELECT pg_temp.error_of($$SELECT osv5m_model_info()$$);
SELECT pg_temp.error_of($$SELECT geolocate(img) FROM photos LIMIT 1$$) ~ '^F0000: ' AS config_error;
-- a directory that exists but holds the wrong files
SET osv5m.model_path = :'images';
SELECT pg_temp.error_of($$SELECT count(*) FROM osv5m_cells()$$) ~ '^F0000: could not load osv5m model' AS config_error;
-- and the backend recovers as soon as the path is right again
SET osv5m.model_path = :'gelu';
SELECT count(*) AS cells FROM osv5m_cells();

-- Only a superuser sets the model and the pixel limit; anyone sets threads.
CREATE ROLE osv5m_regress_user;
GRANT SELECT ON photos TO osv5m_regress_user;
SET ROLE osv5m_regress_user;
SET osv5m.model_path = '/tmp';
SET osv5m.max_pixels = 100000000;
SET osv5m.threads = 2;
SELECT count(geolocate(img)) AS located_by_user FROM photos;
RESET ROLE;
DROP OWNED BY osv5m_regress_user;
DROP ROLE osv5m_regress_user;
