--
-- 01_install: the extension, its functions' declarations and its settings.
--
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS osv5m CASCADE;
RESET client_min_messages;

-- The functions of the SQL surface: inference functions are IMMUTABLE,
-- STRICT (or, for the inlinable set-returning wrapper, strict through the
-- C function under it), PARALLEL SAFE and expensive.
SELECT p.oid::regprocedure AS function,
	   l.lanname, p.provolatile, p.proisstrict, p.proparallel, p.procost, p.prorows
FROM pg_proc p
JOIN pg_language l ON l.oid = p.prolang
JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'osv5m'
WHERE p.proname IN ('geolocate', 'geolocate_topk', 'geolocate_embedding',
					'osv5m_cells', 'osv5m_model_info', 'haversine_km', 'geoscore',
					'osv5m_evaluate', 'osv5m_geolocate_point', 'osv5m_geolocate_topk_raw',
					'osv5m_cells_raw', 'osv5m_haversine', 'osv5m_evaluate_accum',
					'osv5m_evaluate_combine', 'osv5m_evaluate_serialize',
					'osv5m_evaluate_deserialize', 'osv5m_evaluate_final')
ORDER BY p.proname;

-- osv5m_evaluate is an aggregate that can run in parallel.
SELECT aggfnoid::regprocedure, aggtransfn, aggfinalfn, aggcombinefn,
	   aggserialfn, aggdeserialfn, aggtranstype::regtype
FROM pg_aggregate WHERE aggfnoid = 'osv5m_evaluate'::regproc;

-- The settings, their contexts and ranges.
SELECT name, setting, unit, context, vartype, min_val, max_val, boot_val
FROM pg_settings WHERE name LIKE 'osv5m.%' ORDER BY name;

-- The prefix is reserved: a misspelled setting is an error, not a placeholder.
SET osv5m.thread = 2;

-- Out of range values are refused.
SET osv5m.threads = 0;
SET osv5m.threads = 65;
SET osv5m.max_pixels = 0;

-- A relative model path is refused when set.
SET osv5m.model_path = 'models/baseline';

-- Without a model, inference says what to do.
SHOW osv5m.model_path;
SELECT geolocate('\xffd8ff'::bytea);
SELECT osv5m_model_info();
