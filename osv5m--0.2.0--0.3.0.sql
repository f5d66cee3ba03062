-- osv5m--0.2.0--0.3.0.sql: from version 0.2.0 to 0.3.0.
--
-- CREATE EXTENSION osv5m installs 0.1.0 and then runs the upgrade scripts
-- in turn, so a fresh install and an upgraded one are the same by
-- construction.
--
-- What 0.3.0 changes:
--  1. The model comparison across servers uses the weights' SHA-256.
--     osv5m_model_info() reports it as "fingerprint"; 0.2.0 looked for a
--     key that was never there and compared file size and architecture
--     only, so two servers with different weights of the same shape passed
--     as the same model.
--  2. Citus: osv5m_enrich on a distributed table runs on every worker at
--     once, each worker enriching the shards it holds, one after the
--     other, with its own osv5m_enrich (batches committed, bad rows in
--     that worker's osv5m_errors, resumable); the model is compared on all
--     workers first.  osv5m_enrich_local_shards does one worker's part;
--     osv5m_citus_progress() and osv5m_citus_errors() show every worker's
--     state from the coordinator.  Reference tables, tables with several
--     placements per shard and shards on the coordinator are refused with
--     a hint (README, Scaling out).

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION osv5m UPDATE" to load this file. \quit

-- ==== the model's identity across servers ====

-- What identifies a model across servers: the SHA-256 of its weights file
-- ("fingerprint" of osv5m_model_info()); for a server that reports none,
-- its file size and architecture (paths and load times differ from server
-- to server and are left out).
CREATE OR REPLACE FUNCTION @extschema@.osv5m_model_fingerprint(info jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE WHEN $1 ? 'fingerprint' THEN $1 ->> 'fingerprint'
				ELSE pg_catalog.format('%s bytes, %s, %s layers x %s, %s heads, %s cells, %s parameters, %s',
						 $1 ->> 'file_size', $1 ->> 'dtype', $1 ->> 'num_layers', $1 ->> 'hidden_size',
						 $1 ->> 'num_heads', $1 ->> 'num_cells', $1 ->> 'num_parameters', $1 ->> 'hidden_act') END
$$;
