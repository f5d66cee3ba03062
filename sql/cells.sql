--
-- cells: a cell's box holds exactly the points whose latitude and
-- longitude lie inside the cell.
--
-- The expected answer is computed from the quadtree CSV itself, read here
-- with COPY (not through the extension), by comparing raw coordinates.
-- For every cell, 12 probe points: the middle of each edge and each
-- corner's neighbourhood, 1e-6 degrees inside and outside.  Cells at high
-- latitudes (60 to 90 degrees) and next to the antimeridian are among
-- them.  The geography rectangles (great-circle edges) are kept for
-- compatibility; the probes show why they are not the answer.
--
\getenv abs_srcdir PG_ABS_SRCDIR
\set gelu :abs_srcdir '/test/models/tiny-gelu'
\set csv :gelu '/quadtree_10_1000.csv'
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS osv5m CASCADE;
RESET client_min_messages;
SET osv5m.model_path = :'gelu';

CREATE TABLE cells_csv (cell int, min_lat float8, min_lon float8, max_lat float8, max_lon float8,
						mean_lat float8, mean_lon float8);
COPY cells_csv FROM :'csv' WITH (FORMAT csv, HEADER true);
SELECT count(*) AS cells, count(*) FILTER (WHERE greatest(abs(min_lat), abs(max_lat)) >= 60) AS high_latitude,
	   count(*) FILTER (WHERE min_lon < -179 OR max_lon > 179) AS next_to_antimeridian,
	   count(*) FILTER (WHERE min_lon > max_lon) AS across_antimeridian
FROM cells_csv;

-- the boxes are the CSV's rectangles
SELECT count(*) AS boxes_equal_to_csv
FROM osv5m_cells() c JOIN cells_csv q USING (cell)
WHERE abs(ST_XMin(c.box) - q.min_lon) < 1e-9 AND abs(ST_XMax(c.box) - q.max_lon) < 1e-9
  AND abs(ST_YMin(c.box) - q.min_lat) < 1e-9 AND abs(ST_YMax(c.box) - q.max_lat) < 1e-9
  AND ST_SRID(c.box) = 4326 AND ST_NPoints(c.box) = 5;

-- probes: (fraction along longitude, fraction along latitude, offset
-- direction) around each cell, 1e-6 degrees in or out
CREATE TABLE cells_probe AS
SELECT q.cell, p.kind,
	   q.min_lon + p.fx * (q.max_lon - q.min_lon) + p.dx * 1e-6 AS lon,
	   q.min_lat + p.fy * (q.max_lat - q.min_lat) + p.dy * 1e-6 AS lat
FROM cells_csv q
CROSS JOIN (VALUES
	('south in', 0.5, 0.0, 0, 1), ('south out', 0.5, 0.0, 0, -1),
	('north in', 0.5, 1.0, 0, -1), ('north out', 0.5, 1.0, 0, 1),
	('west in', 0.0, 0.5, 1, 0), ('west out', 0.0, 0.5, -1, 0),
	('east in', 1.0, 0.5, -1, 0), ('east out', 1.0, 0.5, 1, 0),
	('sw corner in', 0.0, 0.0, 1, 1), ('ne corner in', 1.0, 1.0, -1, -1),
	('sw corner out', 0.0, 0.0, -1, 1), ('ne corner out', 1.0, 1.0, -1, 1))
	AS p(kind, fx, fy, dx, dy)
WHERE q.min_lat + p.fy * (q.max_lat - q.min_lat) + p.dy * 1e-6 BETWEEN -90 AND 90
  AND q.min_lon + p.fx * (q.max_lon - q.min_lon) + p.dx * 1e-6 BETWEEN -180 AND 180;

-- every probe against its cell: box says exactly what the raw
-- coordinates say; the geography rectangle does not
SELECT count(*) AS probes,
	   count(*) FILTER (WHERE ST_Covers(c.box, ST_SetSRID(ST_MakePoint(p.lon, p.lat), 4326))
						 IS DISTINCT FROM (p.lat BETWEEN q.min_lat AND q.max_lat
										   AND p.lon BETWEEN q.min_lon AND q.max_lon)) AS box_wrong,
	   count(*) FILTER (WHERE ST_Covers(c.bounds, ST_SetSRID(ST_MakePoint(p.lon, p.lat), 4326)::geography)
						 IS DISTINCT FROM (p.lat BETWEEN q.min_lat AND q.max_lat
										   AND p.lon BETWEEN q.min_lon AND q.max_lon)) > 0 AS geography_rectangle_wrong
FROM cells_probe p JOIN cells_csv q USING (cell) JOIN osv5m_cells() c USING (cell);
SELECT count(*) FILTER (WHERE kind LIKE '% in') AS inside_probes,
	   count(*) FILTER (WHERE kind LIKE '% out') AS outside_probes
FROM cells_probe;

-- The issue's example: cell rectangles at 50..60 degrees north.
SELECT ST_Covers(ST_MakeEnvelope(0, 50, 10, 60, 4326), 'SRID=4326;POINT(5 60.05)'::geometry) AS box_north_of_edge,
	   ST_Covers(ST_MakeEnvelope(0, 50, 10, 60, 4326), 'SRID=4326;POINT(5 50.05)'::geometry) AS box_inside_south_edge,
	   ST_Covers(ST_MakeEnvelope(0, 50, 10, 60, 4326)::geography, 'SRID=4326;POINT(5 60.05)'::geography) AS geography_north_of_edge,
	   ST_Covers(ST_MakeEnvelope(0, 50, 10, 60, 4326)::geography, 'SRID=4326;POINT(5 50.05)'::geography) AS geography_inside_south_edge;

-- Which cell holds a point: exactly one for a point inside a cell (two
-- or more only on a shared edge), none outside every cell.
SELECT p.cell, p.kind, array_agg(c.cell ORDER BY c.cell) AS holding_cells
FROM cells_probe p JOIN osv5m_cells() c ON ST_Covers(c.box, ST_SetSRID(ST_MakePoint(p.lon, p.lat), 4326))
WHERE p.cell IN (8, 35, 54) AND p.kind LIKE '% in'
GROUP BY p.cell, p.kind ORDER BY p.cell, p.kind;

-- geolocate_topk gives the same boxes
SELECT count(*) AS topk_boxes_equal
FROM geolocate_topk(pg_read_binary_file(:'abs_srcdir' || '/test/data/images/jpeg_224x224.jpg'), 10) t
JOIN osv5m_cells() c USING (cell)
WHERE ST_Equals(t.cell_box, c.box);
