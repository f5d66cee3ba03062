--
-- 02_geolocate: geolocate(), geolocate_topk() and geolocate_embedding() on
-- every image of test/data/images give what the command-line tool gives for
-- the same files and model (same core, one BLAS thread on both sides, so
-- equal to the last bits; compared with a tolerance all the same).
--
\getenv abs_srcdir PG_ABS_SRCDIR
\set images :abs_srcdir '/test/data/images/'
\set gelu :abs_srcdir '/test/models/tiny-gelu'
\set cli :abs_srcdir '/osv5m'
SET osv5m.model_path = :'gelu';
SET osv5m.threads = 1;

-- The images, read by the server.
CREATE TABLE photos (name text PRIMARY KEY, img bytea, loc geography);
INSERT INTO photos (name, img)
SELECT f, pg_read_binary_file(:'images' || f)
FROM pg_ls_dir(:'images') AS f
WHERE f ~ '\.(jpg|png)$';
SELECT count(*) >= 40 AS enough_images FROM photos;

-- The tool's answers for the same files (one JSON object per line; a file
-- it cannot read prints an "error" member instead).
CREATE TEMP TABLE cli (line text);
\set cmd 'cd ' :images ' && ' :cli ' geolocate --model ' :gelu ' --top 5 --threads 1 *.jpg *.png 2>/dev/null; true'
COPY cli FROM PROGRAM :'cmd' WITH (FORMAT csv, QUOTE e'\x01', DELIMITER e'\x02');
CREATE TEMP TABLE cli_result AS
SELECT j->>'file' AS name, j
FROM (SELECT line::jsonb AS j FROM cli) AS s;
SELECT count(*) = (SELECT count(*) FROM photos) AS one_answer_per_image FROM cli_result;

-- A call that fails gives its SQLSTATE instead of a result.
CREATE FUNCTION pg_temp.outcome(b bytea) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
	PERFORM geolocate(b);
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE;
END $$;

-- The images neither side can read, side by side.
SELECT p.name, pg_temp.outcome(p.img) AS sqlstate, c.j->>'status' AS cli_status
FROM photos p JOIN cli_result c USING (name)
WHERE pg_temp.outcome(p.img) <> 'ok' OR c.j ? 'error'
ORDER BY p.name;

-- The whole table at once, as an application would.
UPDATE photos SET loc = geolocate(img) WHERE pg_temp.outcome(img) = 'ok';
SELECT count(loc) AS located, count(*) - count(loc) AS failed FROM photos;
SELECT DISTINCT GeometryType(loc::geometry) AS type, ST_SRID(loc::geometry) AS srid
FROM photos WHERE loc IS NOT NULL;

-- geolocate() = the tool's lat/lon, on every image both can read.
SELECT count(*) AS compared,
	   count(*) FILTER (WHERE abs(ST_Y(p.loc::geometry) - (c.j->>'lat')::float8) < 1e-9
						  AND abs(ST_X(p.loc::geometry) - (c.j->>'lon')::float8) < 1e-9) AS equal
FROM photos p JOIN cli_result c USING (name)
WHERE p.loc IS NOT NULL;

-- geolocate_topk(img, 5) = the tool's top 5, rank by rank.
CREATE TEMP TABLE topk AS
SELECT p.name, t.*
FROM photos p, geolocate_topk(p.img, 5) AS t
WHERE p.loc IS NOT NULL;
SELECT count(*) AS compared,
	   count(*) FILTER (WHERE t.cell = (e.value->>'cell')::int
						  AND abs(t.probability - (e.value->>'probability')::float8) < 1e-12
						  AND abs(ST_Y(t.location::geometry) - (e.value->>'lat')::float8) < 1e-9
						  AND abs(ST_X(t.location::geometry) - (e.value->>'lon')::float8) < 1e-9) AS equal
FROM topk t
JOIN cli_result c USING (name)
JOIN LATERAL jsonb_array_elements(c.j->'top') WITH ORDINALITY AS e(value, rank)
  ON e.rank = t.rank;

-- Rank 1 is geolocate()'s answer; ranks are 1..5, probabilities decrease.
SELECT count(*) FILTER (WHERE t.rank = 1 AND NOT ST_Equals(t.location::geometry, p.loc::geometry)) AS rank1_differs,
	   count(DISTINCT t.rank) AS ranks,
	   bool_and(t.probability > 0 AND t.probability <= 1) AS probabilities_in_range
FROM topk t JOIN photos p USING (name);
SELECT count(*) AS out_of_order
FROM topk a JOIN topk b ON a.name = b.name AND b.rank = a.rank + 1
WHERE b.probability > a.probability;

-- cell_bounds is the cell's rectangle from the quadtree.
SELECT bool_and(ST_XMin(t.cell_bounds::geometry) = ST_XMin(c.bounds::geometry)
				AND ST_YMax(t.cell_bounds::geometry) = ST_YMax(c.bounds::geometry)) AS bounds_are_the_cells
FROM topk t JOIN osv5m_cells() c USING (cell);

-- k: the default is 5; more than the cells gives all cells; k < 1 is an
-- error; NULL image or k gives no rows.
SELECT count(*) AS default_k FROM photos, geolocate_topk(img) WHERE name = 'jpeg_224x224.jpg';
SELECT count(*) AS all_cells, sum(probability) BETWEEN 0.999999 AND 1.000001 AS sums_to_one
FROM photos, geolocate_topk(img, 1000000) WHERE name = 'jpeg_224x224.jpg';
SELECT count(*) FROM photos, geolocate_topk(img, 0) WHERE name = 'jpeg_224x224.jpg';
SELECT count(*) FROM photos, geolocate_topk(img, -3) WHERE name = 'jpeg_224x224.jpg';
SELECT count(*) AS null_image FROM geolocate_topk(NULL, 5);
SELECT count(*) AS null_k FROM photos, geolocate_topk(img, NULL) WHERE name = 'jpeg_224x224.jpg';

-- geolocate_embedding() = the tool's embedding.
CREATE TEMP TABLE cli_embed (line text);
\set cmd 'cd ' :images ' && ' :cli ' embed --model ' :gelu ' --threads 1 jpeg_224x224.jpg png_rgb8_300x200.png 2>/dev/null; true'
COPY cli_embed FROM PROGRAM :'cmd' WITH (FORMAT csv, QUOTE e'\x01', DELIMITER e'\x02');
SELECT c.j->>'file' AS name,
	   array_length(geolocate_embedding(p.img), 1) AS dims,
	   (SELECT bool_and(abs(e.x - (c.j->'embedding'->>(e.i::int - 1))::float8) < 1e-5)
		FROM unnest(geolocate_embedding(p.img)) WITH ORDINALITY AS e(x, i)) AS equal
FROM (SELECT line::jsonb AS j FROM cli_embed) AS c
JOIN photos p ON p.name = c.j->>'file'
ORDER BY 1;

-- NULL in, NULL out.
SELECT geolocate(NULL) IS NULL AS geolocate_null,
	   geolocate_embedding(NULL) IS NULL AS embedding_null;

-- The wrapper is inlined: the plan calls the C function directly, with
-- PostGIS's casts around it, and an immutable function of a constant is
-- computed once, at plan time.
EXPLAIN (VERBOSE, COSTS OFF) SELECT geolocate(img) FROM photos;
EXPLAIN (VERBOSE, COSTS OFF) SELECT * FROM photos, geolocate_topk(img, 3);

-- IMMUTABLE is what generated columns and expression indexes require.
CREATE TABLE photos_generated (
	name text,
	img bytea,
	loc geography GENERATED ALWAYS AS (geolocate(img)) STORED
);
INSERT INTO photos_generated (name, img) SELECT name, img FROM photos WHERE loc IS NOT NULL;
SELECT count(*) AS same_as_update
FROM photos_generated g JOIN photos p USING (name)
WHERE ST_Equals(g.loc::geometry, p.loc::geometry);
CREATE INDEX photos_generated_loc ON photos_generated USING gist (loc);
CREATE INDEX photos_expression ON photos_generated USING gist (geolocate(img));
DROP TABLE photos_generated;

-- In parallel workers (each loads the model itself) the answers are the same.
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SET max_parallel_workers_per_gather = 2;
SET force_parallel_mode = on;
EXPLAIN (COSTS OFF) SELECT name, geolocate(img) FROM photos WHERE loc IS NOT NULL;
SELECT count(*) AS parallel_equal
FROM (SELECT name, geolocate(img) AS g FROM photos WHERE loc IS NOT NULL) AS s
JOIN photos p USING (name)
WHERE ST_Equals(s.g::geometry, p.loc::geometry);
RESET force_parallel_mode;
RESET max_parallel_workers_per_gather;
RESET min_parallel_table_scan_size;
RESET parallel_tuple_cost;
RESET parallel_setup_cost;
