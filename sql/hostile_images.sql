--
-- hostile_images: malformed image bytes through geolocate().  Every input
-- must give a point or an ERROR with a fitting SQLSTATE, and the backend
-- must survive (test/pg/hostile_log.sh checks the server log afterwards).
--
-- The mutated inputs are made here, from test images, with a fixed-seed
-- generator, so the counts below are deterministic.  Outcomes are counted
-- per SQLSTATE ('ok' for a result); "fitting" lists the SQLSTATEs a class
-- may give:
--   22P03 invalid_binary_representation  corrupt image
--   0A000 feature_not_supported          not a JPEG or PNG
--   54000 program_limit_exceeded         over osv5m.max_pixels
--
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS osv5m CASCADE;
RESET client_min_messages;
\getenv abs_srcdir PG_ABS_SRCDIR
\set model :abs_srcdir '/test/models/tiny-gelu'
SET osv5m.model_path = :'model';
\set images :abs_srcdir '/test/data/images/'
\set seeds :abs_srcdir '/test/fuzz/corpus/image/'

-- the test images mutated below: a baseline JPEG, a progressive JPEG with
-- restart markers and a PNG with alpha
CREATE TEMP TABLE base (name text, img bytea);
INSERT INTO base
SELECT name, pg_read_binary_file(:'images' || f)
FROM (VALUES ('jpeg', 'jpeg_420_640x480.jpg'),
			 ('progressive', 'jpeg_progressive_restart_333x500.jpg'),
			 ('png', 'png_ga8_140x100.png')) AS b(name, f);

-- the untouched images work
SELECT name, geolocate(img) IS NOT NULL AS located FROM base ORDER BY name;

-- One call: 'ok' or the SQLSTATE of its ERROR.
CREATE FUNCTION pg_temp.outcome(b bytea) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
	PERFORM geolocate(b);
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE;
END $$;

-- A deterministic pseudo-random generator (the classic LCG of ANSI C).
CREATE FUNCTION pg_temp.lcg(state bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$ SELECT (state * 1103515245 + 12345) % 2147483648 $$;

CREATE TEMP TABLE cases (class text, n int, img bytea);

-- 20 truncations of each image, from 5 % to 100 % - 1 byte
INSERT INTO cases
SELECT 'truncated ' || name, i,
	   substring(img FROM 1 FOR least(length(img) * i / 20, length(img) - 1))
FROM base, generate_series(1, 20) AS i;

-- 30 inputs of each image with 1 to 8 random bit flips; half of them in
-- the first 512 bytes, where the headers and tables are
DO $$
DECLARE
	r record;
	state bigint := 20240601;
	b bytea;
	pos int;
	span int;
BEGIN
	FOR r IN SELECT name, img FROM base ORDER BY name LOOP
		FOR i IN 1..30 LOOP
			b := r.img;
			span := CASE WHEN i % 2 = 0 THEN least(512, length(b)) ELSE length(b) END;
			FOR j IN 1..(1 + i % 8) LOOP
				state := pg_temp.lcg(state);
				pos := (state >> 4) % span;
				state := pg_temp.lcg(state);
				b := set_byte(b, pos, get_byte(b, pos) # (1 << ((state >> 8) % 8)::int));
			END LOOP;
			INSERT INTO cases VALUES ('bit flips ' || r.name, i, b);
		END LOOP;
	END LOOP;
END $$;

-- each tenth of each image zeroed in turn, and the whole image zeroed
INSERT INTO cases
SELECT 'zeroed ' || name, k,
	   overlay(img PLACING decode(repeat('00', length(img) / 10), 'hex')
			   FROM 1 + (length(img) / 10) * k FOR length(img) / 10)
FROM base, generate_series(0, 9) AS k;
INSERT INTO cases
SELECT 'zeroed ' || name, 10, decode(repeat('00', length(img)), 'hex') FROM base;

-- the JPEG's frame header patched to claim 65000 x 65000 (and 0 x 0)
INSERT INTO cases
SELECT 'jpeg claims huge size', s.n,
	   set_byte(set_byte(set_byte(set_byte(img,
			p + 5, s.hi), p + 6, s.lo), p + 7, s.hi), p + 8, s.lo)
FROM (SELECT img, position('\xffc0'::bytea IN img) - 1 AS p
	  FROM base WHERE name = 'jpeg') AS j,
	 (VALUES (1, 253, 232), (2, 0, 0)) AS s(n, hi, lo);

-- single hand-made inputs of the seed corpus
INSERT INTO cases
SELECT 'corpus ' || f, 1, pg_read_binary_file(:'seeds' || f)
FROM unnest(ARRAY['1x1.jpg', '1x1.png', 'wide-10000x1.jpg', 'wide-10000x1.png',
				  'tall-1x300.jpg', 'claims-65000x65000.jpg', 'claims-huge.png',
				  'claims-3000x3000.png', 'bad-crc.png', 'gif.gif', 'cmyk.jpg',
				  'gray16.png', 'palette-trns.png', 'soi-only.jpg',
				  'signature-only.png']) AS f;
INSERT INTO cases VALUES
	('empty bytea', 1, ''::bytea),
	('text', 1, convert_to('SELECT ''this is not an image'';', 'UTF8')),
	('one byte', 1, '\xff'::bytea),
	('jpeg magic only', 1, '\xffd8ffe0'::bytea),
	('png magic only', 1, '\x89504e470d0a1a0a'::bytea);

-- the results, counted per SQLSTATE
CREATE TEMP TABLE results AS
SELECT class, n, pg_temp.outcome(img) AS outcome FROM cases;

SELECT class, sum(cnt) AS inputs,
	   string_agg(outcome || ':' || cnt, ' ' ORDER BY outcome) AS outcomes
FROM (SELECT class, outcome, count(*) AS cnt FROM results GROUP BY 1, 2) AS g
GROUP BY class
ORDER BY class;

-- no outcome outside the fitting SQLSTATEs
SELECT class, n, outcome FROM results
WHERE outcome NOT IN ('ok', '22P03', '0A000', '54000')
ORDER BY class, n;

-- the NULL image gives NULL (STRICT), and the session still works
SELECT geolocate(NULL) IS NULL AS null_in_null_out;
SELECT name, geolocate(img) IS NOT NULL AS located FROM base ORDER BY name;
