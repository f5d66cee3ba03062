--
-- 07_evaluate: the osv5m_evaluate() aggregate.
--
-- Six predictions on the equator at 0.5, 20, 150, 700, 2000 and 5000 km
-- from the truth (0, 0), placed at longitude d / 6371 rad, give by hand:
--   n 6; mean 1311.75 km; median (150 + 700) / 2 = 425 km;
--   GeoScore mean(5000 exp(-d / 1492.7)) = 3177.826312;
--   accuracy within 1 / 25 / 200 / 750 / 2500 km = 1/6 2/6 3/6 4/6 5/6.
--
CREATE TEMP TABLE guesses AS
SELECT d, ST_MakePoint(degrees(d / 6371), 0)::geography AS pred,
	   'POINT(0 0)'::geography AS truth
FROM unnest(ARRAY[0.5, 20, 150, 700, 2000, 5000]::float8[]) AS d;

SELECT osv5m_evaluate(pred, truth) FROM guesses;
SELECT (e->>'n')::int = 6 AS n,
	   abs((e->>'mean_km')::float8 - 1311.75) < 1e-9 AS mean_km,
	   abs((e->>'median_km')::float8 - 425) < 1e-9 AS median_km,
	   abs((e->>'geoscore')::float8 - 3177.826312) < 1e-6 AS geoscore,
	   abs((e->>'acc_1km')::float8 - 1 / 6.0) < 1e-12
	   AND abs((e->>'acc_25km')::float8 - 2 / 6.0) < 1e-12
	   AND abs((e->>'acc_200km')::float8 - 3 / 6.0) < 1e-12
	   AND abs((e->>'acc_750km')::float8 - 4 / 6.0) < 1e-12
	   AND abs((e->>'acc_2500km')::float8 - 5 / 6.0) < 1e-12 AS accuracies
FROM (SELECT osv5m_evaluate(pred, truth) AS e FROM guesses) AS s;

-- odd n: the middle value; NULL rows are skipped
SELECT abs((osv5m_evaluate(pred, truth)->>'median_km')::float8 - 150) < 1e-9 AS odd_median,
	   osv5m_evaluate(pred, truth)->'n' AS n
FROM (SELECT pred, truth FROM guesses WHERE d < 3000
	  UNION ALL SELECT NULL, 'POINT(0 0)'
	  UNION ALL SELECT 'POINT(0 0)', NULL) AS s;

-- no rows: n is 0 and the statistics are null
SELECT osv5m_evaluate(pred, truth) FROM guesses WHERE false;

-- per group
SELECT d < 500 AS near, osv5m_evaluate(pred, truth)->'n' AS n,
	   osv5m_evaluate(pred, truth)->'acc_200km' AS acc_200km
FROM guesses GROUP BY 1 ORDER BY 1;

-- Many rows, in a parallel plan, against the same statistics computed with
-- built-in aggregates over haversine_km().
CREATE TABLE many AS
SELECT i,
	   ST_MakePoint(((i * 7919) % 36000) / 100.0 - 180, ((i * 104729) % 17000) / 100.0 - 85)::geography AS pred,
	   ST_MakePoint(((i * 1237) % 36000) / 100.0 - 180, ((i * 3571) % 17000) / 100.0 - 85)::geography AS truth
FROM generate_series(1::bigint, 100000) AS i;
ANALYZE many;
CREATE TEMP TABLE expected AS
SELECT count(*) AS n, avg(geoscore(pred, truth)) AS geoscore,
	   avg(haversine_km(pred, truth)) AS mean_km,
	   percentile_cont(0.5) WITHIN GROUP (ORDER BY haversine_km(pred, truth)) AS median_km,
	   avg((haversine_km(pred, truth) < 2500)::int) AS acc_2500km,
	   avg((haversine_km(pred, truth) < 750)::int) AS acc_750km
FROM many;

SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SET max_parallel_workers_per_gather = 2;
EXPLAIN (COSTS OFF) SELECT osv5m_evaluate(pred, truth) FROM many;
SELECT (e->>'n')::bigint = x.n AS n,
	   abs((e->>'geoscore')::float8 - x.geoscore) < 1e-9 AS geoscore,
	   abs((e->>'mean_km')::float8 - x.mean_km) < 1e-9 AS mean_km,
	   abs((e->>'median_km')::float8 - x.median_km) < 1e-9 AS median_km,
	   abs((e->>'acc_2500km')::float8 - x.acc_2500km) < 1e-12 AS acc_2500km,
	   abs((e->>'acc_750km')::float8 - x.acc_750km) < 1e-12 AS acc_750km
FROM (SELECT osv5m_evaluate(pred, truth) AS e FROM many) AS s, expected AS x;
RESET max_parallel_workers_per_gather;
RESET min_parallel_table_scan_size;
RESET parallel_tuple_cost;
RESET parallel_setup_cost;

-- the same without parallelism
SET max_parallel_workers_per_gather = 0;
SELECT abs((e->>'median_km')::float8 - x.median_km) < 1e-9 AS median_km,
	   (e->>'n')::bigint = x.n AS n
FROM (SELECT osv5m_evaluate(pred, truth) AS e FROM many) AS s, expected AS x;
RESET max_parallel_workers_per_gather;
DROP TABLE many;

-- the model's own predictions against the cells' centroids: a full pipeline
\getenv abs_srcdir PG_ABS_SRCDIR
\set gelu :abs_srcdir '/test/models/tiny-gelu'
SET osv5m.model_path = :'gelu';
SELECT (e->>'n')::int AS n, (e->>'median_km')::float8 >= 0 AS has_median
FROM (SELECT osv5m_evaluate(p.loc, c.centroid) AS e
	  FROM photos p, geolocate_topk(p.img, 1) t JOIN osv5m_cells() c USING (cell)) AS s;
