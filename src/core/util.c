/*
 * util.c: the small shared pieces of the core: error reporting into a
 * caller-owned osv_error, status and dtype names, half-precision widening,
 * the monotonic clock and the OpenBLAS thread controls.
 */
#include "internal.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

osv_status
osv_fail(osv_error *err, osv_status status, const char *fmt,...)
{
	va_list		ap;

	if (err == NULL)
		return status;
	err->status = status;
	err->detail[0] = '\0';
	va_start(ap, fmt);
	vsnprintf(err->message, sizeof(err->message), fmt, ap);
	va_end(ap);
	return status;
}

void
osv_fail_detail(osv_error *err, const char *fmt,...)
{
	va_list		ap;

	if (err == NULL)
		return;
	va_start(ap, fmt);
	vsnprintf(err->detail, sizeof(err->detail), fmt, ap);
	va_end(ap);
}

const char *
osv_status_name(osv_status status)
{
	switch (status)
	{
		case OSV_OK:
			return "ok";
		case OSV_ERR_NOMEM:
			return "out of memory";
		case OSV_ERR_IO:
			return "i/o error";
		case OSV_ERR_MODEL:
			return "invalid model";
		case OSV_ERR_IMAGE_UNSUPPORTED:
			return "unsupported image format";
		case OSV_ERR_IMAGE_CORRUPT:
			return "corrupt image";
		case OSV_ERR_LIMIT:
			return "limit exceeded";
		case OSV_ERR_ABORTED:
			return "aborted";
		case OSV_ERR_ARGUMENT:
			return "invalid argument";
	}
	return "unknown status";
}

const char *
osv_dtype_name(osv_dtype dtype)
{
	static const char *const names[] = {
		[OSV_DTYPE_F32] = "F32",[OSV_DTYPE_F16] = "F16",
		[OSV_DTYPE_BF16] = "BF16",[OSV_DTYPE_F64] = "F64",
		[OSV_DTYPE_I64] = "I64",[OSV_DTYPE_I32] = "I32",
		[OSV_DTYPE_I16] = "I16",[OSV_DTYPE_I8] = "I8",
		[OSV_DTYPE_U8] = "U8",[OSV_DTYPE_BOOL] = "BOOL",
		[OSV_DTYPE_UNKNOWN] = "unknown",
	};

	if ((unsigned) dtype > OSV_DTYPE_UNKNOWN)
		return "unknown";
	return names[dtype];
}

/* IEEE 754 binary16 to binary32, subnormals and NaN included. */
float
osv_f16_to_f32(uint16_t h)
{
	uint32_t	sign = (uint32_t) (h & 0x8000) << 16;
	uint32_t	exponent = (h >> 10) & 0x1f;
	uint32_t	mantissa = h & 0x3ff;
	uint32_t	bits;
	float		f;

	if (exponent == 0)
	{
		/* zero or subnormal: mantissa * 2^-24, exact in float */
		f = ldexpf((float) mantissa, -24);
		return sign ? -f : f;
	}
	if (exponent == 31)
		bits = sign | 0x7f800000u | (mantissa << 13);
	else
		bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
	memcpy(&f, &bits, sizeof(f));
	return f;
}

/* bfloat16 is the upper half of a binary32. */
float
osv_bf16_to_f32(uint16_t h)
{
	uint32_t	bits = (uint32_t) h << 16;
	float		f;

	memcpy(&f, &bits, sizeof(f));
	return f;
}

double
osv_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

osv_params
osv_default_params(void)
{
	osv_params	params;

	memset(&params, 0, sizeof(params));
	params.max_pixels = OSV_DEFAULT_MAX_PIXELS;
	return params;
}
