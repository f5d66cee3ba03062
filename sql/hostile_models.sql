--
-- hostile_models: broken and changing model directories.  Each broken
-- directory must give a clear ERROR (SQLSTATE F0000, config_file_error)
-- and leave the session usable; a model replaced under a session that has
-- it loaded must be reloaded cleanly at the next call, never crash.
--
-- The directories are made at test time by test/pg/hostile_models.py under
-- build/hostile-models/, one fault each, from test/models/tiny-gelu.
--
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS osv5m CASCADE;
RESET client_min_messages;
\getenv abs_srcdir PG_ABS_SRCDIR
\set good :abs_srcdir '/test/models/tiny-gelu'
\set other :abs_srcdir '/test/models/tiny-quickgelu'
\set good_pt :abs_srcdir '/test/models/tiny-gelu-pt'
\set broken :abs_srcdir '/build/hostile-models'
\set live :broken '/live'
\set img_path :abs_srcdir '/test/fuzz/corpus/image/rgb-444.jpg'
\setenv HOSTILE_OUT :broken
\setenv HOSTILE_GOOD :good
\setenv HOSTILE_OTHER :other
\setenv HOSTILE_GOOD_PT :good_pt
\! python3 "$PG_ABS_SRCDIR/test/pg/hostile_models.py" make "$HOSTILE_GOOD" "$HOSTILE_OUT" "$HOSTILE_GOOD_PT"

CREATE TEMP TABLE img AS SELECT pg_read_binary_file(:'img_path') AS img;

-- 'ok' or the SQLSTATE and message of the ERROR, the checkout's path hidden
CREATE FUNCTION pg_temp.try_model(dir text, root text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
	PERFORM set_config('osv5m.model_path', dir, false);
	PERFORM geolocate(img) FROM img;
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE || ': ' || replace(SQLERRM, root, '$ROOT');
END $$;

-- the reference answers of the two good models
SET osv5m.model_path = :'good';
CREATE TEMP TABLE ref AS SELECT 'good' AS model, geolocate(img)::text AS loc FROM img;
SET osv5m.model_path = :'other';
INSERT INTO ref SELECT 'other', geolocate(img)::text FROM img;
SELECT count(DISTINCT loc) AS distinct_answers FROM ref;

-- every broken directory, in turn, then the good one again
SELECT f AS fault, pg_temp.try_model(:'broken' || '/' || f, :'abs_srcdir') AS outcome
FROM unnest(ARRAY['truncated-weights', 'empty-weights', 'header-past-end',
				  'header-length-huge', 'header-not-json', 'overlapping-offsets',
				  'offsets-past-end', 'missing-tensor', 'missing-layer-tensor',
				  'wrong-shape', 'shape-bytes-mismatch', 'bad-dtype',
				  'integer-weights', 'csv-not-numbers', 'csv-too-few-rows',
				  'csv-missing-column', 'csv-binary', 'csv-missing',
				  'config-not-json', 'config-heads-not-dividing',
				  'config-wrong-image-size', 'weights-missing',
				  'weights-is-directory', 'no-such-directory']) AS f;
-- the same for the published layout (config.json + pytorch_model.bin);
-- pt-csv-agrees is not a fault: a CSV that matches the checkpoint's cells
SELECT f AS fault, pg_temp.try_model(:'broken' || '/' || f, :'abs_srcdir') AS outcome
FROM unnest(ARRAY['pt-truncated', 'pt-empty', 'pt-forbidden-global',
				  'pt-compressed-entry', 'pt-storage-short',
				  'pt-central-directory-past-end', 'pt-legacy-format',
				  'pt-unknown-backbone', 'pt-csv-disagrees', 'pt-csv-agrees']) AS f;
SELECT pg_temp.try_model('', '') AS unset_path;
SELECT pg_temp.try_model('relative/path', '') AS relative_path;

-- after all those errors the session works, with the same answer
SET osv5m.model_path = :'good';
SELECT geolocate(img)::text = (SELECT loc FROM ref WHERE model = 'good') AS same_answer
FROM img;

-- a model directory replaced while this session has it loaded:
-- a new directory renamed over the old one is picked up at the next call
\! python3 "$PG_ABS_SRCDIR/test/pg/hostile_models.py" swap "$HOSTILE_OUT" "$HOSTILE_GOOD"
SET osv5m.model_path = :'live';
SELECT geolocate(img)::text = (SELECT loc FROM ref WHERE model = 'good') AS live_is_good
FROM img;
\! python3 "$PG_ABS_SRCDIR/test/pg/hostile_models.py" swap "$HOSTILE_OUT" "$HOSTILE_OTHER"
SELECT geolocate(img)::text = (SELECT loc FROM ref WHERE model = 'other') AS live_is_other
FROM img;

-- the weights overwritten in place (same inode) with the other model's:
-- they no longer match config.json, which the reload must notice
\! python3 "$PG_ABS_SRCDIR/test/pg/hostile_models.py" inplace "$HOSTILE_OUT" model.safetensors "$HOSTILE_GOOD"
SELECT pg_temp.try_model(:'live', :'abs_srcdir') AS weights_of_good_config_of_other;
\! python3 "$PG_ABS_SRCDIR/test/pg/hostile_models.py" inplace "$HOSTILE_OUT" config.json "$HOSTILE_GOOD"
\! python3 "$PG_ABS_SRCDIR/test/pg/hostile_models.py" inplace "$HOSTILE_OUT" quadtree_10_1000.csv "$HOSTILE_GOOD"
SELECT geolocate(img)::text = (SELECT loc FROM ref WHERE model = 'good') AS live_is_good_again
FROM img;

-- the weights truncated in place under the loaded mapping: the next call
-- must reload (and fail cleanly), never touch the old mapping past the end
\! python3 "$PG_ABS_SRCDIR/test/pg/hostile_models.py" truncate "$HOSTILE_OUT" model.safetensors 4096
SELECT pg_temp.try_model(:'live', :'abs_srcdir') AS truncated_under_session;
SELECT pg_temp.try_model(:'live', :'abs_srcdir') AS truncated_again;

-- and back: the session is still usable
\! python3 "$PG_ABS_SRCDIR/test/pg/hostile_models.py" swap "$HOSTILE_OUT" "$HOSTILE_GOOD"
SELECT geolocate(img)::text = (SELECT loc FROM ref WHERE model = 'good') AS recovered
FROM img;
RESET osv5m.model_path;
