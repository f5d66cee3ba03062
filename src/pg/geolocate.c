/*
 * geolocate.c: the SQL-callable inference and model functions.
 *
 * Each function detoasts its argument into the per-call memory context,
 * runs the core through OsvRunImage (cache.c), or OsvRunImages for an
 * array of images, and builds its result in the caller's context from the
 * context's results.  The functions return plain
 * PostgreSQL types (point, float8 columns, real[], jsonb); the SQL wrappers
 * in osv5m--0.1.0.sql turn coordinates into geography, so this file never
 * sees PostGIS's serialized format.
 *
 * Coordinates: a point has x = longitude and y = latitude, in degrees, as
 * ST_MakePoint(lon, lat) and PostGIS's point cast expect.
 */
#include "osv5m_pg.h"

#include <math.h>

#include "catalog/pg_type.h"
#include "common/shortest_dec.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/geo_decls.h"
#include "utils/json.h"
#include "utils/tuplestore.h"

PG_FUNCTION_INFO_V1(osv5m_geolocate_point);
PG_FUNCTION_INFO_V1(osv5m_geolocate_batch);
PG_FUNCTION_INFO_V1(osv5m_enrich_images_per_run);
PG_FUNCTION_INFO_V1(osv5m_enrich_precision);
PG_FUNCTION_INFO_V1(osv5m_geolocate_topk_raw);
PG_FUNCTION_INFO_V1(geolocate_embedding);
PG_FUNCTION_INFO_V1(osv5m_cells_raw);
PG_FUNCTION_INFO_V1(osv5m_model_info);

/*
 * Detoast the image argument in the per-call context and run the network
 * on it.  The detoasted copy (up to 1 GB) is freed at the next call's reset.
 */
static OsvLoaded *
RunOnArgument(FunctionCallInfo fcinfo, int argno)
{
	MemoryContext old = MemoryContextSwitchTo(OsvCallContext());
	bytea	   *img = PG_GETARG_BYTEA_PP(argno);
	OsvLoaded  *loaded;

	loaded = OsvRunImage(VARDATA_ANY(img), VARSIZE_ANY_EXHDR(img));
	MemoryContextSwitchTo(old);
	return loaded;
}

/* osv5m_geolocate_point(img bytea) RETURNS point: the model's prediction. */
Datum
osv5m_geolocate_point(PG_FUNCTION_ARGS)
{
	OsvLoaded  *loaded = RunOnArgument(fcinfo, 0);
	osv_prediction best;
	Point	   *p;

	if (osv_context_topk(loaded->ctx, 1, &best) != 1)
		elog(ERROR, "osv5m model returned no prediction");
	p = (Point *) palloc(sizeof(Point));
	p->x = best.lon;
	p->y = best.lat;
	PG_RETURN_POINT_P(p);
}

/*
 * osv5m_geolocate_batch(imgs bytea[]) RETURNS TABLE(ord, location, sqlstate,
 * message, detail, hint): the prediction for each element of imgs, run
 * through the network osv5m.images_per_run at a time (osv_run_images).
 * Element ord (1-based) gives its location as osv5m_geolocate_point does,
 * or, when it is not an image
 * that can be decoded, the SQLSTATE, message, detail and hint that
 * geolocate() would raise for it; a NULL element gives a row of NULLs.
 * Errors that are not about one image (no model, a cancel) are raised.
 */
Datum
osv5m_geolocate_batch(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	ArrayType  *imgs = PG_GETARG_ARRAYTYPE_P(0);
	int			per_run = osv5m_images_per_run;
	Datum	   *elems;
	bool	   *elem_nulls;
	int			n;
	const uint8_t **data = palloc(sizeof(*data) * per_run);
	size_t	   *sizes = palloc(sizeof(*sizes) * per_run);
	osv_error  *errs = palloc(sizeof(*errs) * per_run);
	int		   *which = palloc(sizeof(*which) * per_run);

	if (ARR_NDIM(imgs) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("osv5m_geolocate_batch expects a one-dimensional array")));
	/* array elements are never toasted: these point into imgs, no copies */
	deconstruct_array(imgs, BYTEAOID, -1, false, TYPALIGN_INT,
					  &elems, &elem_nulls, &n);
	InitMaterializedSRF(fcinfo, 0);

	for (int start = 0; start < n; start += per_run)
	{
		int			count = Min(per_run, n - start);
		int			m = 0;
		OsvLoaded  *loaded = NULL;

		/* which[i]: the place of element start + i among the images run */
		for (int i = 0; i < count; i++)
		{
			which[i] = -1;
			if (elem_nulls[start + i])
				continue;
			data[m] = (const uint8_t *) VARDATA_ANY(DatumGetPointer(elems[start + i]));
			sizes[m] = VARSIZE_ANY_EXHDR(DatumGetPointer(elems[start + i]));
			which[i] = m++;
		}
		if (m > 0)
			loaded = OsvRunImages(m, data, sizes, errs);

		for (int i = 0; i < count; i++)
		{
			Datum		values[6];
			bool		nulls[6] = {false, true, true, true, true, true};
			const osv_error *err = which[i] >= 0 ? &errs[which[i]] : NULL;

			values[0] = Int32GetDatum(start + i + 1);
			if (err != NULL && err->status != OSV_OK)
			{
				const char *hint;
				int			code = OsvErrorCode(err, OSV_STAGE_RUN, &hint);

				values[2] = CStringGetTextDatum(unpack_sql_state(code));
				values[3] = CStringGetTextDatum(err->message);
				nulls[2] = nulls[3] = false;
				if (err->detail[0] != '\0')
				{
					values[4] = CStringGetTextDatum(err->detail);
					nulls[4] = false;
				}
				if (hint != NULL)
				{
					values[5] = CStringGetTextDatum(hint);
					nulls[5] = false;
				}
			}
			else if (err != NULL)
			{
				osv_prediction best;
				Point	   *p;

				if (osv_context_topk_at(loaded->ctx, which[i], 1, &best) != 1)
					elog(ERROR, "osv5m model returned no prediction");
				p = (Point *) palloc(sizeof(Point));
				p->x = best.lon;
				p->y = best.lat;
				values[1] = PointPGetDatum(p);
				nulls[1] = false;
			}
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		}
	}
	return (Datum) 0;
}

/*
 * osv5m_enrich_images_per_run() RETURNS int: osv5m.images_per_run.  PL/pgSQL
 * cannot read the setting with current_setting() before the library is
 * loaded in the backend (the setting is not defined yet); calling a C
 * function loads it.
 */
Datum
osv5m_enrich_images_per_run(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT32(osv5m_images_per_run);
}

/*
 * osv5m_enrich_precision() RETURNS text: osv5m.precision, for the same
 * reason (it is the default of osv5m_jobs.precision, read before any
 * inference).
 */
Datum
osv5m_enrich_precision(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(osv_precision_name((osv_precision) osv5m_precision)));
}

/*
 * osv5m_geolocate_topk_raw(img bytea, k int) RETURNS TABLE(rank, cell,
 * probability, lat, lon, min_lat, min_lon, max_lat, max_lon): the k most
 * likely cells, with the cell's rectangle; k larger than the number of
 * cells gives all cells.
 */
Datum
osv5m_geolocate_topk_raw(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int32		k = PG_GETARG_INT32(1);
	OsvLoaded  *loaded;
	const osv_cell *cells;
	int			num_cells;
	osv_prediction *preds;
	int			n;

	/* check k before spending an inference on the call */
	if (k < 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("k must be at least 1, got %d", k)));

	loaded = RunOnArgument(fcinfo, 0);
	cells = osv_model_cells(loaded->model, &num_cells);
	if (k > num_cells)
		k = num_cells;

	InitMaterializedSRF(fcinfo, 0);
	preds = (osv_prediction *) palloc(sizeof(osv_prediction) * k);
	n = osv_context_topk(loaded->ctx, k, preds);
	for (int i = 0; i < n; i++)
	{
		const osv_cell *c = &cells[preds[i].cell];
		Datum		values[9];
		bool		nulls[9] = {0};

		values[0] = Int32GetDatum(i + 1);
		values[1] = Int32GetDatum(preds[i].cell);
		values[2] = Float8GetDatum(preds[i].probability);
		values[3] = Float8GetDatum(preds[i].lat);
		values[4] = Float8GetDatum(preds[i].lon);
		values[5] = Float8GetDatum(c->min_lat);
		values[6] = Float8GetDatum(c->min_lon);
		values[7] = Float8GetDatum(c->max_lat);
		values[8] = Float8GetDatum(c->max_lon);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	pfree(preds);
	return (Datum) 0;
}

/* geolocate_embedding(img bytea) RETURNS real[]: the class-token feature. */
Datum
geolocate_embedding(PG_FUNCTION_ARGS)
{
	OsvLoaded  *loaded = RunOnArgument(fcinfo, 0);
	int			dim = osv_model_get_info(loaded->model)->hidden_size;
	const float *feature = osv_context_feature(loaded->ctx);
	Datum	   *elems = (Datum *) palloc(sizeof(Datum) * dim);
	ArrayType  *result;

	for (int i = 0; i < dim; i++)
		elems[i] = Float4GetDatum(feature[i]);
	result = construct_array(elems, dim, FLOAT4OID, sizeof(float4),
							 true, TYPALIGN_INT);
	pfree(elems);
	PG_RETURN_ARRAYTYPE_P(result);
}

/*
 * osv5m_cells_raw() RETURNS TABLE(cell, min_lat, min_lon, max_lat, max_lon,
 * mean_lat, mean_lon): the loaded model's quadtree.
 */
Datum
osv5m_cells_raw(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	OsvLoaded  *loaded = OsvGetModel();
	int			num_cells;
	const osv_cell *cells = osv_model_cells(loaded->model, &num_cells);

	InitMaterializedSRF(fcinfo, 0);
	for (int i = 0; i < num_cells; i++)
	{
		Datum		values[7];
		bool		nulls[7] = {0};

		values[0] = Int32GetDatum(i);
		values[1] = Float8GetDatum(cells[i].min_lat);
		values[2] = Float8GetDatum(cells[i].min_lon);
		values[3] = Float8GetDatum(cells[i].max_lat);
		values[4] = Float8GetDatum(cells[i].max_lon);
		values[5] = Float8GetDatum(cells[i].mean_lat);
		values[6] = Float8GetDatum(cells[i].mean_lon);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/* Append "key": to a JSON object under construction (comma handled by caller). */
static void
JsonKey(StringInfo buf, const char *key)
{
	if (buf->len > 1)
		appendStringInfoString(buf, ", ");
	escape_json(buf, key);
	appendStringInfoString(buf, ": ");
}

/* Append a string member, or null when value is NULL or empty. */
static void
JsonString(StringInfo buf, const char *key, const char *value)
{
	JsonKey(buf, key);
	if (value == NULL || value[0] == '\0')
		appendStringInfoString(buf, "null");
	else
		escape_json(buf, value);
}

/* Append a number in its shortest exact form; JSON has no NaN or Infinity. */
static void
JsonDouble(StringInfo buf, double value)
{
	char		digits[DOUBLE_SHORTEST_DECIMAL_LEN];

	if (!isfinite(value))
		appendStringInfoString(buf, "null");
	else
	{
		double_to_shortest_decimal_buf(value, digits);
		appendStringInfoString(buf, digits);
	}
}

/* The same for a float4 value, so that 1e-5f prints as 1e-05, not 9.99..e-06. */
static void
JsonFloat(StringInfo buf, float value)
{
	char		digits[FLOAT_SHORTEST_DECIMAL_LEN];

	if (!isfinite(value))
		appendStringInfoString(buf, "null");
	else
	{
		float_to_shortest_decimal_buf(value, digits);
		appendStringInfoString(buf, digits);
	}
}

/* Append a member holding a JSON array of n float4 values. */
static void
JsonFloatArray(StringInfo buf, const char *key, const float *values, int n)
{
	JsonKey(buf, key);
	appendStringInfoChar(buf, '[');
	for (int i = 0; i < n; i++)
	{
		if (i > 0)
			appendStringInfoString(buf, ", ");
		JsonFloat(buf, values[i]);
	}
	appendStringInfoChar(buf, ']');
}

/*
 * osv5m_model_info() RETURNS jsonb: what this backend loaded, from where,
 * how long it took, the kernels it runs on and in which precision.  Loads
 * the model if needed.
 */
Datum
osv5m_model_info(PG_FUNCTION_ARGS)
{
	OsvLoaded  *loaded = OsvGetModel();
	const osv_model_info *info = osv_model_get_info(loaded->model);
	osv_timings last = osv_context_timings(loaded->ctx);
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoChar(&buf, '{');
	JsonString(&buf, "model_path", loaded->path);
	JsonString(&buf, "weights_path", info->weights_path);
	JsonString(&buf, "quadtree_path", info->quadtree_path);
	JsonString(&buf, "config_path", info->config_path);
	JsonString(&buf, "pack_cache_path", info->pack_cache_path);
	JsonString(&buf, "pack_cache_path_bf16", info->pack_cache_path_bf16);
	JsonString(&buf, "pack_cache_path_int8", info->pack_cache_path_int8);
	/* which weights file and format, and its SHA-256 (computed once per load) */
	JsonString(&buf, "weights_format", info->weights_format);
	JsonString(&buf, "cells_source", info->cells_source);
	JsonString(&buf, "fingerprint",
			   psprintf("sha256:%s", osv_model_fingerprint(loaded->model)));
	JsonKey(&buf, "file_size");
	appendStringInfo(&buf, UINT64_FORMAT, info->file_size);
	JsonString(&buf, "dtype", osv_dtype_name(info->dtype));
	JsonKey(&buf, "hidden_size");
	appendStringInfo(&buf, "%d", info->hidden_size);
	JsonKey(&buf, "num_layers");
	appendStringInfo(&buf, "%d", info->num_layers);
	JsonKey(&buf, "num_heads");
	appendStringInfo(&buf, "%d", info->num_heads);
	JsonKey(&buf, "intermediate_size");
	appendStringInfo(&buf, "%d", info->intermediate_size);
	JsonKey(&buf, "patch_size");
	appendStringInfo(&buf, "%d", info->patch_size);
	JsonKey(&buf, "image_size");
	appendStringInfo(&buf, "%d", info->image_size);
	JsonKey(&buf, "mid_hidden");
	appendStringInfo(&buf, "[%d, %d]", info->mid_hidden[0], info->mid_hidden[1]);
	JsonKey(&buf, "num_cells");
	appendStringInfo(&buf, "%d", info->num_cells);
	JsonString(&buf, "hidden_act",
			   info->hidden_act == OSV_ACT_QUICK_GELU ? "quick_gelu" : "gelu");
	JsonKey(&buf, "layer_norm_eps");
	JsonFloat(&buf, info->layer_norm_eps);
	JsonFloatArray(&buf, "image_mean", info->image_mean, 3);
	JsonFloatArray(&buf, "image_std", info->image_std, 3);
	JsonKey(&buf, "scale_tanh");
	JsonDouble(&buf, info->scale_tanh);
	JsonKey(&buf, "num_parameters");
	appendStringInfo(&buf, UINT64_FORMAT, info->num_parameters);
	JsonKey(&buf, "gflop_per_image");
	JsonDouble(&buf, info->gflop_per_image);
	JsonString(&buf, "loaded_at", timestamptz_to_str(loaded->loaded_at));
	JsonKey(&buf, "load_ms");
	JsonDouble(&buf, loaded->load_seconds * 1000.0);
	JsonKey(&buf, "last_call_ms");
	appendStringInfoString(&buf, "{\"decode\": ");
	JsonDouble(&buf, last.decode * 1000.0);
	appendStringInfoString(&buf, ", \"preprocess\": ");
	JsonDouble(&buf, last.preprocess * 1000.0);
	appendStringInfoString(&buf, ", \"backbone\": ");
	JsonDouble(&buf, last.backbone * 1000.0);
	appendStringInfoString(&buf, ", \"head\": ");
	JsonDouble(&buf, last.head * 1000.0);
	appendStringInfoChar(&buf, '}');
	/* report the count this backend's next call will use */
	osv_set_threads(osv5m_threads);
	JsonString(&buf, "kernels", osv_kernels_name());
	JsonKey(&buf, "threads");
	appendStringInfo(&buf, "%d", osv_threads());
	/*
	 * The precision of this backend's next call, and which of those the
	 * setting offers this CPU runs natively.
	 */
	JsonString(&buf, "precision", osv_precision_name((osv_precision) osv5m_precision));
	JsonKey(&buf, "precisions_native");
	appendStringInfoChar(&buf, '{');
	for (const struct config_enum_entry *option = osv5m_precision_options;
		 option->name != NULL; option++)
	{
		Assert(strcmp(option->name, osv_precision_name((osv_precision) option->val)) == 0);
		if (option != osv5m_precision_options)
			appendStringInfoString(&buf, ", ");
		escape_json(&buf, option->name);
		appendStringInfoString(&buf, osv_precision_native((osv_precision) option->val) ?
							   ": true" : ": false");
	}
	appendStringInfoChar(&buf, '}');
	JsonKey(&buf, "backend_pid");
	appendStringInfo(&buf, "%d", MyProcPid);
	appendStringInfoChar(&buf, '}');

	PG_RETURN_DATUM(DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data)));
}
