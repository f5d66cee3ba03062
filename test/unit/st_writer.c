/*
 * st_writer.c: the tests' safetensors writer (see st_writer.h).  Test code:
 * allocation failures abort the test run, which is the right outcome there.
 */
#include "st_writer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* malloc or abort: a test without memory cannot go on */
static void *
xmalloc(size_t n)
{
	void	   *p = malloc(n ? n : 1);

	if (p == NULL)
		abort();
	return p;
}

/* An empty builder. */
void
st_init(st_builder *b)
{
	memset(b, 0, sizeof(*b));
}

/* Free the entries and their data. */
void
st_free(st_builder *b)
{
	for (int i = 0; i < b->count; i++)
		free(b->entries[i].data);
	free(b->entries);
	memset(b, 0, sizeof(*b));
}

/* Append a copy of the raw bytes as one tensor. */
void
st_add_raw(st_builder *b, const char *name, const char *dtype,
		   const int64_t *shape, int ndim, const void *data, size_t nbytes)
{
	st_entry   *e;

	if (b->count == b->capacity)
	{
		b->capacity = b->capacity ? b->capacity * 2 : 64;
		b->entries = realloc(b->entries, (size_t) b->capacity * sizeof(st_entry));
		if (b->entries == NULL)
			abort();
	}
	e = &b->entries[b->count++];
	memset(e, 0, sizeof(*e));
	snprintf(e->name, sizeof(e->name), "%s", name);
	snprintf(e->dtype, sizeof(e->dtype), "%s", dtype);
	e->ndim = ndim;
	memcpy(e->shape, shape, (size_t) ndim * sizeof(int64_t));
	e->data = xmalloc(nbytes);
	if (nbytes)
		memcpy(e->data, data, nbytes);
	e->nbytes = nbytes;
}

/* Float to IEEE half (normal range; enough for test values). */
uint16_t
st_f32_to_f16(float f)
{
	uint32_t	x;
	uint32_t	sign,
				mant;
	int			exp;

	memcpy(&x, &f, 4);
	sign = (x >> 16) & 0x8000;
	exp = (int) ((x >> 23) & 0xff) - 127 + 15;
	mant = x & 0x7fffff;
	if ((x & 0x7fffffff) == 0 || exp <= 0)
		return (uint16_t) sign;	/* the tests use no subnormals */
	if (exp >= 31)
		return (uint16_t) (sign | 0x7c00);
	/* round to nearest even on the 13 dropped bits */
	{
		uint32_t	h = sign | ((uint32_t) exp << 10) | (mant >> 13);
		uint32_t	rest = mant & 0x1fff;

		if (rest > 0x1000 || (rest == 0x1000 && (h & 1)))
			h++;
		return (uint16_t) h;
	}
}

/* Append floats converted to the storage dtype. */
void
st_add_floats(st_builder *b, const char *name, const char *dtype,
			  const int64_t *shape, int ndim, const float *values)
{
	size_t		n = 1;
	size_t		size;
	uint8_t    *buf;

	for (int i = 0; i < ndim; i++)
		n *= (size_t) shape[i];
	size = strcmp(dtype, "F32") == 0 ? 4 : 2;
	buf = xmalloc(n * size);
	for (size_t i = 0; i < n; i++)
	{
		if (size == 4)
			memcpy(buf + 4 * i, &values[i], 4);
		else
		{
			uint16_t	h;
			uint32_t	x;

			if (strcmp(dtype, "F16") == 0)
				h = st_f32_to_f16(values[i]);
			else
			{
				memcpy(&x, &values[i], 4);
				h = (uint16_t) (x >> 16);	/* the tests' values are exact */
			}
			buf[2 * i] = (uint8_t) (h & 0xff);
			buf[2 * i + 1] = (uint8_t) (h >> 8);
		}
	}
	st_add_raw(b, name, dtype, shape, ndim, buf, n * size);
	free(buf);
}

/* Header JSON, space padding, then the data back to back. */
size_t
st_serialize(const st_builder *b, int misalign, uint8_t **out)
{
	size_t		cap = 256 + (size_t) b->count * 600;
	char	   *h = xmalloc(cap);
	size_t		len = 0,
				offset = 0,
				data_size = 0,
				padded,
				total;
	uint8_t    *buf;

	len += snprintf(h + len, cap - len, "{\"__metadata__\":{\"format\":\"pt\"}");
	for (int i = 0; i < b->count; i++)
	{
		const st_entry *e = &b->entries[i];

		len += snprintf(h + len, cap - len, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[",
						e->name, e->dtype);
		for (int d = 0; d < e->ndim; d++)
			len += snprintf(h + len, cap - len, "%s%lld", d ? "," : "",
							(long long) e->shape[d]);
		len += snprintf(h + len, cap - len, "],\"data_offsets\":[%zu,%zu]}",
						offset, offset + e->nbytes);
		offset += e->nbytes;
	}
	len += snprintf(h + len, cap - len, "}");
	data_size = offset;
	padded = (len + 7) / 8 * 8 + (size_t) misalign;
	total = 8 + padded + data_size;
	buf = xmalloc(total);
	for (int i = 0; i < 8; i++)
		buf[i] = (uint8_t) ((uint64_t) padded >> (8 * i));
	memcpy(buf + 8, h, len);
	memset(buf + 8 + len, ' ', padded - len);
	offset = 8 + padded;
	for (int i = 0; i < b->count; i++)
	{
		if (b->entries[i].nbytes)
			memcpy(buf + offset, b->entries[i].data, b->entries[i].nbytes);
		offset += b->entries[i].nbytes;
	}
	free(h);
	*out = buf;
	return total;
}

/* Write the bytes to a new file. */
int
st_write_file(const char *path, const void *data, size_t size)
{
	FILE	   *f = fopen(path, "wb");

	if (f == NULL)
		return -1;
	if (size && fwrite(data, 1, size, f) != size)
	{
		fclose(f);
		return -1;
	}
	return fclose(f) == 0 ? 0 : -1;
}

/* A hand-written header (possibly invalid) plus zeroed data. */
size_t
st_raw_image(const char *header, size_t data_size, uint8_t **out)
{
	size_t		n = strlen(header);
	size_t		total = 8 + n + data_size;
	uint8_t    *buf = xmalloc(total);

	for (int i = 0; i < 8; i++)
		buf[i] = (uint8_t) ((uint64_t) n >> (8 * i));
	memcpy(buf + 8, header, n);
	memset(buf + 8 + n, 0, data_size);
	*out = buf;
	return total;
}
