/*
 * safetensors.c: validate and index a safetensors file.
 *
 * Layout: an 8-byte little-endian header length N, N bytes of JSON
 * ({"name": {"dtype", "shape", "data_offsets": [begin, end]}, ...,
 * "__metadata__": {...}}), then the data; offsets are relative to the end
 * of the header.
 *
 * The file is untrusted input.  After osv_safetensors_parse succeeds:
 *   - 2 <= N < SAFETENSORS_MAX_HEADER and 8 + N <= size;
 *   - every tensor has a known dtype, 0..OSV_MAX_DIMS non-negative
 *     dimensions whose product (and that times the dtype size) fits in
 *     64 bits, and begin <= end <= size - 8 - N with end - begin equal to
 *     its byte size, so data[0..nbytes) lies inside the buffer;
 *   - no two non-empty byte ranges overlap and no name appears twice;
 *   - tensors[] is sorted by name (osv_safetensors_find is a binary search).
 * Tensor names point into the parsed header, which lives as long as the
 * osv_safetensors.
 */
#include "internal.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* the real header is ~100 kB; anything near this is an attack or garbage */
#define SAFETENSORS_MAX_HEADER ((uint64_t) 100 * 1000 * 1000)
/* the largest integer a double holds exactly */
#define JSON_MAX_EXACT_INT 9007199254740992.0

static const struct
{
	const char *name;
	osv_dtype	dtype;
	size_t		size;
}			dtype_table[] =
{
	{"F32", OSV_DTYPE_F32, 4},
	{"F16", OSV_DTYPE_F16, 2},
	{"BF16", OSV_DTYPE_BF16, 2},
	{"F64", OSV_DTYPE_F64, 8},
	{"I64", OSV_DTYPE_I64, 8},
	{"I32", OSV_DTYPE_I32, 4},
	{"I16", OSV_DTYPE_I16, 2},
	{"I8", OSV_DTYPE_I8, 1},
	{"U8", OSV_DTYPE_U8, 1},
	{"BOOL", OSV_DTYPE_BOOL, 1},
};

/* Format a shape as "[1024, 3, 14, 14]" into buf. */
static const char *
format_shape(char *buf, size_t size, const int64_t *shape, int ndim)
{
	size_t		used = 0;

	buf[0] = '\0';
	used += snprintf(buf, size, "[");
	for (int i = 0; i < ndim && used < size; i++)
		used += snprintf(buf + used, size - used, "%s%lld", i ? ", " : "",
						 (long long) shape[i]);
	if (used < size)
		snprintf(buf + used, size - used, "]");
	return buf;
}

/* A JSON number that is an integer in [0, 2^53], or -1. */
static double
json_uint(const osv_json *json, int node)
{
	double		v;

	if (node < 0 || json->nodes[node].type != OSV_JSON_NUMBER)
		return -1;
	v = json->nodes[node].number;
	if (v < 0 || v > JSON_MAX_EXACT_INT || v != floor(v))
		return -1;
	return v;
}

/* Fill t from the header entry at node; buf/data_size locate the data. */
static osv_status
parse_entry(const osv_json *json, int node, const uint8_t *data,
			uint64_t data_size, osv_tensor *t, osv_error *err)
{
	const char *name = json->nodes[node].key;
	int			n_dtype = osv_json_get(json, node, "dtype");
	int			n_shape = osv_json_get(json, node, "shape");
	int			n_off = osv_json_get(json, node, "data_offsets");
	size_t		elem_size = 0;
	uint64_t	count = 1;
	uint64_t	nbytes;
	double		begin,
				end;
	char		shape_text[160];

	memset(t, 0, sizeof(*t));
	t->name = name;
	if (json->nodes[node].type != OSV_JSON_OBJECT)
		return osv_fail(err, OSV_ERR_MODEL, "tensor %s: header entry is not an object",
						name);

	if (n_dtype < 0 || json->nodes[n_dtype].type != OSV_JSON_STRING)
		return osv_fail(err, OSV_ERR_MODEL, "tensor %s: missing or non-string dtype",
						name);
	t->dtype = OSV_DTYPE_UNKNOWN;
	for (size_t i = 0; i < sizeof(dtype_table) / sizeof(dtype_table[0]); i++)
	{
		if (strcmp(json->nodes[n_dtype].string, dtype_table[i].name) == 0)
		{
			t->dtype = dtype_table[i].dtype;
			elem_size = dtype_table[i].size;
			break;
		}
	}
	if (t->dtype == OSV_DTYPE_UNKNOWN)
		return osv_fail(err, OSV_ERR_MODEL, "tensor %s: unsupported dtype \"%.40s\"",
						name, json->nodes[n_dtype].string);

	if (n_shape < 0 || json->nodes[n_shape].type != OSV_JSON_ARRAY)
		return osv_fail(err, OSV_ERR_MODEL, "tensor %s: missing or non-array shape",
						name);
	if (json->nodes[n_shape].num_children > OSV_MAX_DIMS)
		return osv_fail(err, OSV_ERR_MODEL, "tensor %s: %d dimensions, at most %d supported",
						name, json->nodes[n_shape].num_children, OSV_MAX_DIMS);
	t->ndim = json->nodes[n_shape].num_children;
	for (int i = 0, c = json->nodes[n_shape].first_child; c >= 0;
		 i++, c = json->nodes[c].next_sibling)
	{
		double		d = json_uint(json, c);

		if (d < 0)
			return osv_fail(err, OSV_ERR_MODEL,
							"tensor %s: shape dimension %d is not a non-negative integer",
							name, i);
		t->shape[i] = (int64_t) d;
		/* the product must fit: a 2^40 x 2^40 shape must not wrap to 0 */
		if (__builtin_mul_overflow(count, (uint64_t) d, &count))
			return osv_fail(err, OSV_ERR_MODEL,
							"tensor %s: element count of shape %s overflows",
							name, format_shape(shape_text, sizeof(shape_text),
											   t->shape, i + 1));
	}
	if (__builtin_mul_overflow(count, (uint64_t) elem_size, &nbytes))
		return osv_fail(err, OSV_ERR_MODEL, "tensor %s: byte size of shape %s overflows",
						name, format_shape(shape_text, sizeof(shape_text),
										   t->shape, t->ndim));
	t->num_elements = count;

	if (n_off < 0 || json->nodes[n_off].type != OSV_JSON_ARRAY ||
		json->nodes[n_off].num_children != 2)
		return osv_fail(err, OSV_ERR_MODEL,
						"tensor %s: data_offsets must be an array of two integers", name);
	begin = json_uint(json, osv_json_at(json, n_off, 0));
	end = json_uint(json, osv_json_at(json, n_off, 1));
	if (begin < 0 || end < 0)
		return osv_fail(err, OSV_ERR_MODEL,
						"tensor %s: data_offsets must be non-negative integers", name);
	if (begin > end)
		return osv_fail(err, OSV_ERR_MODEL,
						"tensor %s: data_offsets [%.0f, %.0f] begin after they end",
						name, begin, end);
	if ((uint64_t) end > data_size)
		return osv_fail(err, OSV_ERR_MODEL,
						"tensor %s: data_offsets [%.0f, %.0f] run past the end of the data (%llu bytes)",
						name, begin, end, (unsigned long long) data_size);
	if ((uint64_t) end - (uint64_t) begin != nbytes)
		return osv_fail(err, OSV_ERR_MODEL,
						"tensor %s: data_offsets [%.0f, %.0f] do not match shape %s of %s (%llu bytes)",
						name, begin, end,
						format_shape(shape_text, sizeof(shape_text), t->shape, t->ndim),
						osv_dtype_name(t->dtype), (unsigned long long) nbytes);
	t->data = data + (size_t) begin;
	t->nbytes = (size_t) nbytes;
	/* row-major strides (an empty tensor's may saturate: never used) */
	t->contiguous = true;
	{
		int64_t		step = 1;

		for (int i = t->ndim - 1; i >= 0; i--)
		{
			t->stride[i] = step;
			if (__builtin_mul_overflow(step, t->shape[i], &step))
				step = INT64_MAX;
		}
	}
	return OSV_OK;
}

/* qsort order of tensors by name. */
static int
cmp_name(const void *a, const void *b)
{
	return strcmp(((const osv_tensor *) a)->name, ((const osv_tensor *) b)->name);
}

/* qsort order of tensor pointers by data address. */
static int
cmp_data(const void *a, const void *b)
{
	const uint8_t *x = (*(const osv_tensor *const *) a)->data;
	const uint8_t *y = (*(const osv_tensor *const *) b)->data;

	return (x > y) - (x < y);
}

/* Fail if two non-empty byte ranges overlap (a crafted file could alias). */
static osv_status
check_overlaps(const osv_safetensors *st, osv_error *err)
{
	const osv_tensor **order;
	const osv_tensor *prev = NULL;

	if (st->num_tensors < 2)
		return OSV_OK;
	order = malloc((size_t) st->num_tensors * sizeof(*order));
	if (order == NULL)
		return osv_fail(err, OSV_ERR_NOMEM, "out of memory indexing %d tensors",
						st->num_tensors);
	for (int i = 0; i < st->num_tensors; i++)
		order[i] = &st->tensors[i];
	qsort(order, st->num_tensors, sizeof(*order), cmp_data);
	for (int i = 0; i < st->num_tensors; i++)
	{
		const osv_tensor *t = order[i];

		if (t->nbytes == 0)
			continue;
		if (prev != NULL &&
			(const uint8_t *) prev->data + prev->nbytes > (const uint8_t *) t->data)
		{
			osv_fail(err, OSV_ERR_MODEL, "tensors %s and %s have overlapping data_offsets",
					 prev->name, t->name);
			free(order);
			return OSV_ERR_MODEL;
		}
		prev = t;
	}
	free(order);
	return OSV_OK;
}

/* Validate and index buf[0..size); tensors point into buf. */
osv_status
osv_safetensors_parse(const uint8_t *buf, size_t size, osv_safetensors *out,
					  osv_error *err)
{
	uint64_t	header_len = 0;
	uint64_t	data_size;
	const uint8_t *data;
	osv_status	st;
	int			root;
	int			n = 0;

	memset(out, 0, sizeof(*out));
	if (buf == NULL && size > 0)
		return osv_fail(err, OSV_ERR_ARGUMENT, "no safetensors buffer");
	if (size < 8)
		return osv_fail(err, OSV_ERR_MODEL,
						"safetensors file too short: %zu bytes, the header length alone takes 8",
						size);
	for (int i = 7; i >= 0; i--)
		header_len = (header_len << 8) | buf[i];
	if (header_len < 2)
		return osv_fail(err, OSV_ERR_MODEL, "safetensors header length %llu is too small",
						(unsigned long long) header_len);
	if (header_len >= SAFETENSORS_MAX_HEADER)
		return osv_fail(err, OSV_ERR_MODEL,
						"safetensors header length %llu exceeds the limit of %llu bytes",
						(unsigned long long) header_len,
						(unsigned long long) SAFETENSORS_MAX_HEADER);
	if (header_len > size - 8)
		return osv_fail(err, OSV_ERR_MODEL,
						"safetensors header length %llu runs past the end of the file (%zu bytes)",
						(unsigned long long) header_len, size);
	data = buf + 8 + header_len;
	data_size = size - 8 - header_len;

	st = osv_json_parse((const char *) buf + 8, (size_t) header_len, &out->header, err);
	if (st != OSV_OK)
	{
		/* keep the parser's words as detail under a safetensors message */
		char		detail[sizeof(err->message)];

		if (err == NULL)
			return st;
		snprintf(detail, sizeof(detail), "%s", err->message);
		osv_fail(err, st, "safetensors header is not valid JSON");
		osv_fail_detail(err, "%s", detail);
		return st;
	}
	root = 0;
	if (out->header.nodes[root].type != OSV_JSON_OBJECT)
	{
		osv_safetensors_close(out);
		return osv_fail(err, OSV_ERR_MODEL, "safetensors header is not a JSON object");
	}

	for (int c = out->header.nodes[root].first_child; c >= 0;
		 c = out->header.nodes[c].next_sibling)
		if (strcmp(out->header.nodes[c].key, "__metadata__") != 0)
			n++;
	if (n > 0)
	{
		out->tensors = calloc((size_t) n, sizeof(osv_tensor));
		if (out->tensors == NULL)
		{
			osv_safetensors_close(out);
			return osv_fail(err, OSV_ERR_NOMEM, "out of memory indexing %d tensors", n);
		}
	}
	for (int c = out->header.nodes[root].first_child; c >= 0;
		 c = out->header.nodes[c].next_sibling)
	{
		if (strcmp(out->header.nodes[c].key, "__metadata__") == 0)
			continue;
		st = parse_entry(&out->header, c, data, data_size,
						 &out->tensors[out->num_tensors], err);
		if (st != OSV_OK)
		{
			osv_safetensors_close(out);
			return st;
		}
		out->num_tensors++;
	}

	st = check_overlaps(out, err);
	if (st != OSV_OK)
	{
		osv_safetensors_close(out);
		return st;
	}
	if (out->num_tensors > 1)
		qsort(out->tensors, out->num_tensors, sizeof(osv_tensor), cmp_name);
	for (int i = 1; i < out->num_tensors; i++)
	{
		if (strcmp(out->tensors[i - 1].name, out->tensors[i].name) == 0)
		{
			osv_fail(err, OSV_ERR_MODEL, "tensor %s appears twice in the safetensors header",
					 out->tensors[i].name);
			osv_safetensors_close(out);
			return OSV_ERR_MODEL;
		}
	}
	return OSV_OK;
}

/* mmap path read-only and parse it; the mapping lives until close. */
osv_status
osv_safetensors_open(const char *path, osv_safetensors *out, osv_error *err)
{
	char		label[1100];
	uint64_t	size;
	void	   *map;
	int			fd;
	osv_status	st;

	memset(out, 0, sizeof(*out));
	/* a regular file or nothing: see file.c */
	osv_file_label(label, sizeof(label), NULL, path);
	st = osv_file_open(path, label, &fd, &size, NULL, err);
	if (st != OSV_OK)
		return st;
	if (size < 8)
	{
		/* mmap of an empty file fails; give the same message as parse */
		close(fd);
		return osv_fail(err, OSV_ERR_MODEL,
						"safetensors file too short: %lld bytes, the header length alone takes 8",
						(long long) size);
	}
	if (size > SIZE_MAX)
	{
		close(fd);
		return osv_fail(err, OSV_ERR_LIMIT, "\"%s\" is too large to map", path);
	}

	/*
	 * PROT_READ + MAP_SHARED: every backend maps the same page-cache pages,
	 * so N backends cost one copy of the weights.  The mapping keeps the
	 * file referenced, so the descriptor can go at once.  If the file is
	 * truncated while mapped, reads past the new end raise SIGBUS; that is
	 * the documented hazard of mmap and the price of sharing.
	 */
	map = mmap(NULL, (size_t) size, PROT_READ, MAP_SHARED, fd, 0);
	if (map == MAP_FAILED)
	{
		int			e = errno;

		close(fd);
		return osv_fail(err, OSV_ERR_IO, "could not map \"%s\": %s", path, strerror(e));
	}
	close(fd);
	/* the forward pass reads all of it: map it all now (file.c) */
	osv_map_populate(map, (size_t) size);

	st = osv_safetensors_parse(map, (size_t) size, out, err);
	if (st != OSV_OK)
	{
		munmap(map, (size_t) size);
		return st;
	}
	out->map = map;
	out->map_size = (size_t) size;
	return OSV_OK;
}

/* Unmap and free; safe on an emptied osv_safetensors. */
void
osv_safetensors_close(osv_safetensors *st)
{
	if (st == NULL)
		return;
	free(st->tensors);
	osv_json_free(&st->header);
	if (st->map != NULL)
		munmap(st->map, st->map_size);
	memset(st, 0, sizeof(*st));
}

/* Binary search of the name-sorted tensors. */
const osv_tensor *
osv_safetensors_find(const osv_safetensors *st, const char *name)
{
	return osv_tensor_find(st->tensors, st->num_tensors, name);
}
