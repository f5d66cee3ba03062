/*
 * weights.c: one tensor table over the weights formats the core reads,
 * model.safetensors (safetensors.c) and PyTorch's pytorch_model.bin
 * (zip.c, pytorch.c), and the element access both share.
 *
 * The model loader and the network see only osv_tensor: a name, a dtype, a
 * shape, strides and a pointer into the read-only mapping.  Which file the
 * tensor came from is recorded in osv_weights.format for reporting only.
 *
 * Invariant of every osv_tensor a parser hands out: data[0..nbytes) lies
 * inside the mapping, and every element the shape and strides address lies
 * inside it too (element i at data + dtype_size * sum(index_d * stride_d)).
 */
#include "internal.h"

#include <string.h>

size_t
osv_dtype_size(osv_dtype dtype)
{
	switch (dtype)
	{
		case OSV_DTYPE_F64:
		case OSV_DTYPE_I64:
			return 8;
		case OSV_DTYPE_F32:
		case OSV_DTYPE_I32:
			return 4;
		case OSV_DTYPE_F16:
		case OSV_DTYPE_BF16:
		case OSV_DTYPE_I16:
			return 2;
		case OSV_DTYPE_I8:
		case OSV_DTYPE_U8:
		case OSV_DTYPE_BOOL:
			return 1;
		case OSV_DTYPE_UNKNOWN:
			break;
	}
	return 0;
}

const osv_tensor *
osv_tensor_find(const osv_tensor *tensors, int n, const char *name)
{
	int			lo = 0,
				hi = n - 1;

	while (lo <= hi)
	{
		int			mid = lo + (hi - lo) / 2;
		int			c = strcmp(name, tensors[mid].name);

		if (c == 0)
			return &tensors[mid];
		if (c < 0)
			hi = mid - 1;
		else
			lo = mid + 1;
	}
	return NULL;
}

/* The value at p (little-endian, possibly misaligned) of a float dtype. */
static double
load(const uint8_t *p, osv_dtype dtype)
{
	switch (dtype)
	{
		case OSV_DTYPE_F32:
			{
				float		f;

				memcpy(&f, p, sizeof(f));
				return f;
			}
		case OSV_DTYPE_F64:
			{
				double		d;

				memcpy(&d, p, sizeof(d));
				return d;
			}
		case OSV_DTYPE_F16:
			return osv_f16_to_f32((uint16_t) (p[0] | (p[1] << 8)));
		case OSV_DTYPE_BF16:
			return osv_bf16_to_f32((uint16_t) (p[0] | (p[1] << 8)));
		default:
			return 0;
	}
}

/* Byte offset of row-major element i from t->data. */
static size_t
element_offset(const osv_tensor *t, uint64_t i)
{
	uint64_t	off = 0;

	for (int d = t->ndim - 1; d >= 0; d--)
	{
		uint64_t	n = (uint64_t) t->shape[d];

		off += (i % n) * (uint64_t) t->stride[d];
		i /= n;
	}
	return (size_t) off * osv_dtype_size(t->dtype);
}

double
osv_tensor_get(const osv_tensor *t, uint64_t i)
{
	size_t		off = t->contiguous ? (size_t) i * osv_dtype_size(t->dtype) :
		element_offset(t, i);

	return load((const uint8_t *) t->data + off, t->dtype);
}

/*
 * Convert with an odometer over the shape, so that a strided view costs
 * one addition per element, not a division per dimension.
 */
void
osv_tensor_to_f32(const osv_tensor *t, float *dst)
{
	const uint8_t *base = t->data;
	size_t		es = osv_dtype_size(t->dtype);
	int64_t		index[OSV_MAX_DIMS] = {0};
	size_t		off = 0;

	if (t->num_elements == 0)
		return;
	if (t->contiguous)
	{
		if (t->dtype == OSV_DTYPE_F32)
			memcpy(dst, base, (size_t) t->num_elements * sizeof(float));
		else
			for (uint64_t i = 0; i < t->num_elements; i++)
				dst[i] = (float) load(base + (size_t) i * es, t->dtype);
		return;
	}
	for (uint64_t i = 0; i < t->num_elements; i++)
	{
		int			d;

		dst[i] = (float) load(base + off * es, t->dtype);
		for (d = t->ndim - 1; d >= 0; d--)
		{
			if (++index[d] < t->shape[d])
			{
				off += (size_t) t->stride[d];
				break;
			}
			off -= (size_t) (t->stride[d] * (t->shape[d] - 1));
			index[d] = 0;
		}
	}
}

osv_status
osv_weights_open(const char *path, osv_weights_format format, osv_weights *out,
				 osv_error *err)
{
	osv_status	st;

	memset(out, 0, sizeof(*out));
	out->format = format;
	if (format == OSV_WEIGHTS_PYTORCH)
	{
		st = osv_pytorch_open(path, &out->pt, err);
		if (st != OSV_OK)
			return st;
		out->tensors = out->pt.tensors;
		out->num_tensors = out->pt.num_tensors;
		out->map = out->pt.map;
		out->map_size = out->pt.map_size;
	}
	else
	{
		st = osv_safetensors_open(path, &out->st, err);
		if (st != OSV_OK)
			return st;
		out->tensors = out->st.tensors;
		out->num_tensors = out->st.num_tensors;
		out->map = out->st.map;
		out->map_size = out->st.map_size;
	}
	return OSV_OK;
}

void
osv_weights_close(osv_weights *w)
{
	if (w == NULL)
		return;
	if (w->format == OSV_WEIGHTS_PYTORCH)
		osv_pytorch_close(&w->pt);
	else
		osv_safetensors_close(&w->st);
	memset(w, 0, sizeof(*w));
}

const osv_tensor *
osv_weights_find(const osv_weights *w, const char *name)
{
	return osv_tensor_find(w->tensors, w->num_tensors, name);
}
