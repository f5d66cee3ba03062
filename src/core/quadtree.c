/*
 * quadtree.c: parse the quadtree CSV that maps each class of the model to a
 * cell on the globe (quadtree_10_1000.csv, built from the OSV-5M training
 * set).
 *
 * Format: the header line cluster_id,min_lat,min_lon,max_lat,max_lon,
 * mean_lat,mean_lon, then one line per class; line i + 2 describes class i
 * and its cluster_id must be i.  Lines may end in \n or \r\n; blank lines
 * are allowed only at the end.  Degrees.
 *
 * Invariants of a parsed table: every value finite, latitudes in [-90, 90],
 * longitudes in [-180, 180], min <= mean <= max in both coordinates (the
 * hybrid head regresses between mean and the bounds, so an inverted cell
 * would send points outside it).  Numbers are read with strtod, which the
 * core calls under LC_NUMERIC "C" (PostgreSQL forces it).
 */
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define QUADTREE_FIELDS 7
/* 11399 in the real file; the cap keeps the allocation sane */
#define QUADTREE_MAX_CELLS 10000000
/* a field longer than this is not a coordinate */
#define QUADTREE_MAX_FIELD 64

static const char quadtree_header[] =
"cluster_id,min_lat,min_lon,max_lat,max_lon,mean_lat,mean_lon";

/* The length of the line at text[pos..len) without its \n or \r\n. */
static size_t
line_length(const char *text, size_t len, size_t pos, size_t *next)
{
	const char *nl = memchr(text + pos, '\n', len - pos);
	size_t		end = nl ? (size_t) (nl - text) : len;

	*next = nl ? end + 1 : len;
	if (end > pos && text[end - 1] == '\r')
		end--;
	return end - pos;
}

/* Parse one field as a finite double, fully consumed. */
static bool
parse_field(const char *field, size_t n, double *value)
{
	char		buf[QUADTREE_MAX_FIELD + 1];
	char	   *end;

	/* strtod needs a terminated copy; it would also skip leading spaces */
	if (n == 0 || n > QUADTREE_MAX_FIELD || field[0] == ' ' || field[0] == '\t')
		return false;
	memcpy(buf, field, n);
	buf[n] = '\0';
	*value = strtod(buf, &end);
	return end == buf + n && isfinite(*value);
}

/* Parse one data line (class `index`, line `lineno`) into cell. */
static osv_status
parse_row(const char *line, size_t n, int index, int lineno, osv_cell *cell,
		  osv_error *err)
{
	static const char *const names[QUADTREE_FIELDS] = {
		"cluster_id", "min_lat", "min_lon", "max_lat", "max_lon", "mean_lat",
		"mean_lon"
	};
	double		v[QUADTREE_FIELDS];
	int			fields = 1;
	size_t		start = 0;

	for (size_t i = 0; i < n; i++)
		if (line[i] == ',')
			fields++;
	if (fields != QUADTREE_FIELDS)
		return osv_fail(err, OSV_ERR_MODEL, "quadtree line %d: %d fields, expected %d",
						lineno, fields, QUADTREE_FIELDS);
	for (int f = 0; f < QUADTREE_FIELDS; f++)
	{
		const char *comma = memchr(line + start, ',', n - start);
		size_t		end = comma ? (size_t) (comma - line) : n;

		if (!parse_field(line + start, end - start, &v[f]))
			return osv_fail(err, OSV_ERR_MODEL,
							"quadtree line %d: %s \"%.*s\" is not a finite number",
							lineno, names[f], (int) ((end - start) > 40 ? 40 : end - start),
							line + start);
		start = end + 1;
	}
	if (v[0] != (double) index)
		return osv_fail(err, OSV_ERR_MODEL,
						"quadtree line %d: cluster_id %.17g, expected %d (rows must be in class order)",
						lineno, v[0], index);
	for (int f = 1; f < QUADTREE_FIELDS; f++)
	{
		/* fields 1, 3, 5 are latitudes; 2, 4, 6 longitudes */
		double		limit = (f % 2 == 1) ? 90.0 : 180.0;

		if (v[f] < -limit || v[f] > limit)
			return osv_fail(err, OSV_ERR_MODEL,
							"quadtree line %d: %s %.17g is outside [-%g, %g]",
							lineno, names[f], v[f], limit, limit);
	}
	cell->min_lat = v[1];
	cell->min_lon = v[2];
	cell->max_lat = v[3];
	cell->max_lon = v[4];
	cell->mean_lat = v[5];
	cell->mean_lon = v[6];
	if (!(cell->min_lat <= cell->mean_lat && cell->mean_lat <= cell->max_lat))
		return osv_fail(err, OSV_ERR_MODEL,
						"quadtree line %d: latitudes must satisfy min <= mean <= max", lineno);
	if (!(cell->min_lon <= cell->mean_lon && cell->mean_lon <= cell->max_lon))
		return osv_fail(err, OSV_ERR_MODEL,
						"quadtree line %d: longitudes must satisfy min <= mean <= max", lineno);
	return OSV_OK;
}

/* Parse the CSV text[0..len); *cells is malloc'ed, all or nothing. */
osv_status
osv_quadtree_parse(const char *text, size_t len, osv_cell **cells,
				   int *num_cells, osv_error *err)
{
	size_t		pos = 0,
				next,
				n;
	size_t		rows = 0;
	osv_cell   *out;
	int			lineno;

	*cells = NULL;
	*num_cells = 0;
	if (text == NULL || len == 0)
		return osv_fail(err, OSV_ERR_MODEL, "quadtree file is empty");
	/* an Excel-saved file may start with a UTF-8 byte order mark */
	if (len >= 3 && memcmp(text, "\xef\xbb\xbf", 3) == 0)
		pos = 3;
	n = line_length(text, len, pos, &next);
	if (n != sizeof(quadtree_header) - 1 || memcmp(text + pos, quadtree_header, n) != 0)
		return osv_fail(err, OSV_ERR_MODEL,
						"quadtree line 1: header must be \"%s\"", quadtree_header);
	pos = next;

	/* count data lines first so that the table is one allocation */
	for (size_t p = pos; p < len; p = next)
	{
		if (line_length(text, len, p, &next) > 0)
			rows++;
	}
	if (rows == 0)
		return osv_fail(err, OSV_ERR_MODEL, "quadtree has no cells");
	if (rows > QUADTREE_MAX_CELLS)
		return osv_fail(err, OSV_ERR_MODEL, "quadtree has %zu cells, at most %d supported",
						rows, QUADTREE_MAX_CELLS);
	out = malloc(rows * sizeof(osv_cell));
	if (out == NULL)
		return osv_fail(err, OSV_ERR_NOMEM, "out of memory for %zu quadtree cells", rows);

	lineno = 2;
	for (size_t i = 0; i < rows; i++, lineno++, pos = next)
	{
		osv_status	st;

		n = line_length(text, len, pos, &next);
		if (n == 0)
		{
			/* a blank line before the last row would shift every class */
			free(out);
			return osv_fail(err, OSV_ERR_MODEL, "quadtree line %d: empty line", lineno);
		}
		st = parse_row(text + pos, n, (int) i, lineno, &out[i], err);
		if (st != OSV_OK)
		{
			free(out);
			return st;
		}
	}
	*cells = out;
	*num_cells = (int) rows;
	return OSV_OK;
}
