/*
 * evaluate.c: distances and the evaluation aggregate of OSV-5M
 * (metrics/distance_based.py of the authors' code).
 *
 *   osv5m_haversine(a point, b point)  great-circle km on a 6371 km sphere
 *   osv5m_evaluate(pred geography, truth geography)  aggregate -> jsonb:
 *       n, mean GeoScore (5000 exp(-d / 1492.7)), mean and median km, and
 *       the fraction of rows with d < 1, 25, 200, 750 and 2500 km
 *
 * Points are PostgreSQL's native point with x = longitude, y = latitude in
 * degrees.  The aggregate receives geography values and turns each into a
 * point through PostGIS's own casts (geography -> geometry -> point), looked
 * up once per call site: the glue never reads PostGIS's serialized format.
 *
 * The aggregate's state keeps every distance (8 bytes a row) so that the
 * median is exact; it is sorted once in the final function.  A million rows
 * take 8 MB.  The state serializes to bytea, so the aggregate runs in
 * parallel plans (workers accumulate, the leader combines).
 */
#include "postgres.h"

#include <math.h>

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "common/shortest_dec.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "libpq/pqformat.h"
#include "parser/parse_coerce.h"
#include "utils/builtins.h"
#include "utils/geo_decls.h"
#include "utils/json.h"
#include "utils/memutils.h"
#include "utils/syscache.h"

PG_FUNCTION_INFO_V1(osv5m_haversine);
PG_FUNCTION_INFO_V1(osv5m_evaluate_accum);
PG_FUNCTION_INFO_V1(osv5m_evaluate_combine);
PG_FUNCTION_INFO_V1(osv5m_evaluate_serialize);
PG_FUNCTION_INFO_V1(osv5m_evaluate_deserialize);
PG_FUNCTION_INFO_V1(osv5m_evaluate_final);

#define EARTH_RADIUS_KM 6371.0
#define GEOSCORE_SCALE_KM 1492.7

/* The accuracy radii of OSV-5M, in km. */
static const double radii_km[] = {1, 25, 200, 750, 2500};

#define NUM_RADII ((int) lengthof(radii_km))

/* Great-circle distance in km between two (lon, lat) points in degrees. */
static double
HaversineKm(double lon1, double lat1, double lon2, double lat2)
{
	double		phi1 = lat1 * (M_PI / 180.0);
	double		phi2 = lat2 * (M_PI / 180.0);
	double		dphi = (lat2 - lat1) * (M_PI / 180.0);
	double		dlambda = (lon2 - lon1) * (M_PI / 180.0);
	double		s = sin(dphi / 2) * sin(dphi / 2) +
		cos(phi1) * cos(phi2) * sin(dlambda / 2) * sin(dlambda / 2);

	/* rounding can push s a hair past 1 for antipodal points: asin would NaN */
	if (s > 1.0)
		s = 1.0;
	return 2.0 * EARTH_RADIUS_KM * asin(sqrt(s));
}

/* osv5m_haversine(a point, b point) RETURNS float8: km between two points. */
Datum
osv5m_haversine(PG_FUNCTION_ARGS)
{
	Point	   *a = PG_GETARG_POINT_P(0);
	Point	   *b = PG_GETARG_POINT_P(1);

	PG_RETURN_FLOAT8(HaversineKm(a->x, a->y, b->x, b->y));
}

/* The aggregate's state; lives in the aggregate memory context. */
typedef struct EvalState
{
	int64		n;
	double		sum_score;
	double		sum_km;
	int64		within[NUM_RADII];
	int64		capacity;		/* allocated entries of km */
	double	   *km;				/* n distances, unordered until the final */
} EvalState;

/* PostGIS's casts from geography to point, found once per call site. */
typedef struct PointCasts
{
	FmgrInfo	to_geometry;	/* geometry(geography) */
	FmgrInfo	to_point;		/* point(geometry) */
} PointCasts;

/*
 * Find the casts geography -> geometry -> point.  The geography type is the
 * aggregate's declared argument type, and geometry is looked up in the same
 * schema, so search_path does not matter.
 */
static PointCasts *
GetPointCasts(FunctionCallInfo fcinfo)
{
	FmgrInfo   *flinfo = fcinfo->flinfo;
	PointCasts *casts = (PointCasts *) flinfo->fn_extra;
	Oid			geography;
	Oid			geometry;
	Oid			namespace;
	Oid			to_geometry;
	Oid			to_point;
	HeapTuple	tuple;

	if (casts != NULL)
		return casts;

	geography = get_fn_expr_argtype(flinfo, 1);
	if (!OidIsValid(geography))
		elog(ERROR, "could not determine the argument type of osv5m_evaluate");
	tuple = SearchSysCache1(TYPEOID, ObjectIdGetDatum(geography));
	if (!HeapTupleIsValid(tuple))
		elog(ERROR, "cache lookup failed for type %u", geography);
	namespace = ((Form_pg_type) GETSTRUCT(tuple))->typnamespace;
	ReleaseSysCache(tuple);
	geometry = GetSysCacheOid2(TYPENAMENSP, Anum_pg_type_oid,
							   CStringGetDatum("geometry"),
							   ObjectIdGetDatum(namespace));
	if (!OidIsValid(geometry) ||
		find_coercion_pathway(geometry, geography, COERCION_EXPLICIT,
							  &to_geometry) != COERCION_PATH_FUNC ||
		find_coercion_pathway(POINTOID, geometry, COERCION_EXPLICIT,
							  &to_point) != COERCION_PATH_FUNC)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("could not find the PostGIS casts from geography to point"),
				 errhint("Reinstall the postgis extension.")));

	casts = MemoryContextAlloc(flinfo->fn_mcxt, sizeof(PointCasts));
	fmgr_info_cxt(to_geometry, &casts->to_geometry, flinfo->fn_mcxt);
	fmgr_info_cxt(to_point, &casts->to_point, flinfo->fn_mcxt);
	flinfo->fn_extra = casts;
	return casts;
}

/* A geography point as a native point, through PostGIS's casts. */
static Point *
GeographyToPoint(PointCasts *casts, Datum geog)
{
	Datum		geom = FunctionCall1(&casts->to_geometry, geog);

	return DatumGetPointP(FunctionCall1(&casts->to_point, geom));
}

/* A new, empty state in the aggregate context. */
static EvalState *
NewState(MemoryContext aggcontext)
{
	return (EvalState *) MemoryContextAllocZero(aggcontext, sizeof(EvalState));
}

/* Make room for extra more distances (doubling; huge allocations allowed). */
static void
Reserve(MemoryContext aggcontext, EvalState *state, int64 extra)
{
	int64		need = state->n + extra;
	int64		capacity;

	if (need <= state->capacity)
		return;
	capacity = Max(state->capacity * 2, Max(need, 1024));
	if ((Size) capacity > MaxAllocHugeSize / sizeof(double))
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("osv5m_evaluate cannot keep more than %zu distances",
						MaxAllocHugeSize / sizeof(double))));
	if (state->km == NULL)
		state->km = MemoryContextAllocHuge(aggcontext, capacity * sizeof(double));
	else
		state->km = repalloc_huge(state->km, capacity * sizeof(double));
	state->capacity = capacity;
}

/* Add one distance to the state (room must be reserved). */
static void
AddDistance(EvalState *state, double km)
{
	state->km[state->n++] = km;
	state->sum_km += km;
	state->sum_score += 5000.0 * exp(-km / GEOSCORE_SCALE_KM);
	for (int i = 0; i < NUM_RADII; i++)
		if (km < radii_km[i])
			state->within[i]++;
}

/* The aggregate context, or an error when called outside an aggregate. */
static MemoryContext
AggregateContext(FunctionCallInfo fcinfo, const char *name)
{
	MemoryContext aggcontext;

	if (!AggCheckCallContext(fcinfo, &aggcontext))
		elog(ERROR, "%s called in non-aggregate context", name);
	return aggcontext;
}

/*
 * osv5m_evaluate_accum(state internal, pred geography, truth geography):
 * the transition function.  Rows where either point is NULL are skipped.
 */
Datum
osv5m_evaluate_accum(PG_FUNCTION_ARGS)
{
	MemoryContext aggcontext = AggregateContext(fcinfo, "osv5m_evaluate_accum");
	EvalState  *state = PG_ARGISNULL(0) ? NULL : (EvalState *) PG_GETARG_POINTER(0);
	PointCasts *casts;
	Point	   *pred;
	Point	   *truth;

	if (state == NULL)
		state = NewState(aggcontext);
	if (PG_ARGISNULL(1) || PG_ARGISNULL(2))
		PG_RETURN_POINTER(state);

	/* the casts' results go to the per-row context, reset by the executor */
	casts = GetPointCasts(fcinfo);
	pred = GeographyToPoint(casts, PG_GETARG_DATUM(1));
	truth = GeographyToPoint(casts, PG_GETARG_DATUM(2));
	Reserve(aggcontext, state, 1);
	AddDistance(state, HaversineKm(pred->x, pred->y, truth->x, truth->y));
	PG_RETURN_POINTER(state);
}

/* osv5m_evaluate_combine(a internal, b internal): merge b into a. */
Datum
osv5m_evaluate_combine(PG_FUNCTION_ARGS)
{
	MemoryContext aggcontext = AggregateContext(fcinfo, "osv5m_evaluate_combine");
	EvalState  *a = PG_ARGISNULL(0) ? NULL : (EvalState *) PG_GETARG_POINTER(0);
	EvalState  *b = PG_ARGISNULL(1) ? NULL : (EvalState *) PG_GETARG_POINTER(1);

	if (b == NULL)
		PG_RETURN_POINTER(a);
	if (a == NULL)
		a = NewState(aggcontext);
	Reserve(aggcontext, a, b->n);
	if (b->n > 0)
		memcpy(a->km + a->n, b->km, b->n * sizeof(double));
	a->n += b->n;
	a->sum_km += b->sum_km;
	a->sum_score += b->sum_score;
	for (int i = 0; i < NUM_RADII; i++)
		a->within[i] += b->within[i];
	PG_RETURN_POINTER(a);
}

/* osv5m_evaluate_serialize(internal) RETURNS bytea, for parallel workers. */
Datum
osv5m_evaluate_serialize(PG_FUNCTION_ARGS)
{
	EvalState  *state = (EvalState *) PG_GETARG_POINTER(0);
	StringInfoData buf;

	pq_begintypsend(&buf);
	pq_sendint64(&buf, state->n);
	pq_sendfloat8(&buf, state->sum_km);
	pq_sendfloat8(&buf, state->sum_score);
	for (int i = 0; i < NUM_RADII; i++)
		pq_sendint64(&buf, state->within[i]);
	for (int64 i = 0; i < state->n; i++)
		pq_sendfloat8(&buf, state->km[i]);
	PG_RETURN_BYTEA_P(pq_endtypsend(&buf));
}

/* osv5m_evaluate_deserialize(bytea, internal) RETURNS internal. */
Datum
osv5m_evaluate_deserialize(PG_FUNCTION_ARGS)
{
	MemoryContext aggcontext = AggregateContext(fcinfo, "osv5m_evaluate_deserialize");
	bytea	   *bytes = PG_GETARG_BYTEA_PP(0);
	EvalState  *state = NewState(aggcontext);
	StringInfoData buf;
	int64		n;

	/* a read-only StringInfo over the bytea, as the built-in aggregates do */
	buf.data = VARDATA_ANY(bytes);
	buf.len = VARSIZE_ANY_EXHDR(bytes);
	buf.maxlen = 0;
	buf.cursor = 0;
	n = pq_getmsgint64(&buf);
	state->sum_km = pq_getmsgfloat8(&buf);
	state->sum_score = pq_getmsgfloat8(&buf);
	for (int i = 0; i < NUM_RADII; i++)
		state->within[i] = pq_getmsgint64(&buf);
	if (n < 0 || (Size) n > (Size) (buf.len - buf.cursor) / sizeof(double))
		elog(ERROR, "invalid osv5m_evaluate state");
	Reserve(aggcontext, state, n);
	for (int64 i = 0; i < n; i++)
		state->km[i] = pq_getmsgfloat8(&buf);
	state->n = n;
	pq_getmsgend(&buf);
	PG_RETURN_POINTER(state);
}

/* qsort comparator for distances (no NaN: inputs are finite points). */
static int
CompareDouble(const void *a, const void *b)
{
	double		x = *(const double *) a;
	double		y = *(const double *) b;

	return (x > y) - (x < y);
}

/* Append "key": value to a JSON object; NaN (no rows) becomes null. */
static void
JsonNumber(StringInfo buf, const char *key, double value)
{
	char		digits[DOUBLE_SHORTEST_DECIMAL_LEN];

	appendStringInfoString(buf, ", ");
	escape_json(buf, key);
	appendStringInfoString(buf, ": ");
	if (!isfinite(value))
		appendStringInfoString(buf, "null");
	else
	{
		double_to_shortest_decimal_buf(value, digits);
		appendStringInfoString(buf, digits);
	}
}

/*
 * osv5m_evaluate_final(internal) RETURNS jsonb.  Sorting the distances in
 * place leaves the state valid for further rows (order does not matter to
 * it), so the final function may run more than once on a state.
 */
Datum
osv5m_evaluate_final(PG_FUNCTION_ARGS)
{
	EvalState  *state = PG_ARGISNULL(0) ? NULL : (EvalState *) PG_GETARG_POINTER(0);
	int64		n = state == NULL ? 0 : state->n;
	double		median = NAN;
	StringInfoData buf;

	if (n > 0)
	{
		qsort(state->km, n, sizeof(double), CompareDouble);
		/* numpy's median: the mean of the two middle values when n is even */
		median = (n % 2 == 1) ? state->km[n / 2] :
			(state->km[n / 2 - 1] + state->km[n / 2]) / 2.0;
	}

	initStringInfo(&buf);
	appendStringInfo(&buf, "{\"n\": " INT64_FORMAT, n);
	JsonNumber(&buf, "geoscore", n > 0 ? state->sum_score / n : NAN);
	JsonNumber(&buf, "mean_km", n > 0 ? state->sum_km / n : NAN);
	JsonNumber(&buf, "median_km", median);
	for (int i = 0; i < NUM_RADII; i++)
	{
		char		key[32];

		snprintf(key, sizeof(key), "acc_%gkm", radii_km[i]);
		JsonNumber(&buf, key, n > 0 ? (double) state->within[i] / n : NAN);
	}
	appendStringInfoChar(&buf, '}');
	PG_RETURN_DATUM(DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data)));
}
