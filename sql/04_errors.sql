--
-- 04_errors: bad input gives an ERROR with a fitting SQLSTATE and a
-- PostgreSQL-style message, never a crash; the session goes on.
-- (sql/hostile_images.sql throws many more mutated images at the decoder.)
--
\getenv abs_srcdir PG_ABS_SRCDIR
\set gelu :abs_srcdir '/test/models/tiny-gelu'
SET osv5m.model_path = :'gelu';

-- One call: its SQLSTATE, message, detail and hint.
CREATE FUNCTION pg_temp.error_of(query text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
	detail text;
	hint text;
BEGIN
	EXECUTE query;
	RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL, hint = PG_EXCEPTION_HINT;
	RETURN SQLSTATE || ': ' || SQLERRM
		|| CASE WHEN detail <> '' THEN ' (detail: ' || detail || ')' ELSE '' END
		|| CASE WHEN hint <> '' THEN ' (hint: ' || hint || ')' ELSE '' END;
END $$;

CREATE TEMP TABLE bad (what text, img bytea);
INSERT INTO bad VALUES
	('empty', ''::bytea),
	('text', convert_to('not an image at all', 'UTF8')),
	('gif', convert_to('GIF89a', 'UTF8') || '\x0100010000000000'::bytea),
	('jpeg header only', '\xffd8ffe000104a46494600010100000100010000'::bytea),
	('png signature only', '\x89504e470d0a1a0a'::bytea),
	('truncated jpeg', (SELECT substring(img FROM 1 FOR length(img) / 2) FROM photos WHERE name = 'jpeg_420_640x480.jpg')),
	('truncated png', (SELECT substring(img FROM 1 FOR length(img) / 2) FROM photos WHERE name = 'png_rgb8_300x200.png')),
	('png with a bad checksum', (SELECT set_byte(img, 30, get_byte(img, 30) # 1) FROM photos WHERE name = 'png_rgb8_300x200.png'));

-- each function of an image fails the same way
SELECT what, pg_temp.error_of(format('SELECT geolocate(%L::bytea)', img)) AS geolocate
FROM bad ORDER BY what;
SELECT what,
	   left(pg_temp.error_of(format('SELECT geolocate(%L::bytea)', img)), 5) =
	   left(pg_temp.error_of(format('SELECT * FROM geolocate_topk(%L::bytea)', img)), 5) AS topk_same,
	   left(pg_temp.error_of(format('SELECT geolocate(%L::bytea)', img)), 5) =
	   left(pg_temp.error_of(format('SELECT geolocate_embedding(%L::bytea)', img)), 5) AS embedding_same
FROM bad ORDER BY what;

-- the plain ERROR lines, as a client sees them
SELECT geolocate(img) FROM bad WHERE what = 'text';
SELECT geolocate(img) FROM bad WHERE what = 'truncated jpeg';

-- the pixel limit is checked before decoding (640 x 480 = 307200 pixels)
SET osv5m.max_pixels = 307199;
SELECT pg_temp.error_of($$SELECT geolocate(img) FROM photos WHERE name = 'jpeg_420_640x480.jpg'$$);
SET osv5m.max_pixels = 307200;
SELECT geolocate(img) IS NOT NULL AS at_the_limit FROM photos WHERE name = 'jpeg_420_640x480.jpg';
RESET osv5m.max_pixels;

-- NULL in, NULL out (STRICT), everywhere
SELECT geolocate(NULL) IS NULL AS geolocate,
	   geolocate_embedding(NULL) IS NULL AS embedding,
	   (SELECT count(*) FROM geolocate_topk(NULL)) = 0 AS topk,
	   haversine_km(NULL, 'POINT(0 0)') IS NULL AS haversine,
	   geoscore('POINT(0 0)', NULL) IS NULL AS geoscore;

-- after all these errors the backend still answers
SELECT count(geolocate(img)) AS located FROM photos;
