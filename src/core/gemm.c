/*
 * gemm.c: our matrix-product kernels, chosen at run time from the CPU.
 *
 * The classic register-blocked scheme (GotoBLAS, BLIS; ggml and ONNX
 * Runtime's MLAS do the same): A is packed once per product into blocks of
 * MR rows laid out [k][MR]; each thread takes a contiguous range of
 * NR-column panels of C, packs the panel's NR columns of B into [k][NR]
 * in its scratch, and runs a microkernel that keeps an MR x NR tile of C
 * in registers over the whole k, reading one vector row of B and
 * broadcasting MR values of A per step.
 *
 *   path       MR x NR    accumulators   where
 *   avx512     14 x 32    28 zmm         AVX-512F CPUs (Skylake-SP on, Zen 4, Zen 5)
 *   avx2        6 x 16    12 ymm         AVX2 + FMA CPUs (Haswell on, Zen 1-3)
 *   portable    4 x 16    plain C        anything else, through fmaf()
 *
 * Determinism, by construction: every output is one chain of fused
 * multiply-adds over k in increasing order, starting from zero, then
 * alpha, bias, the accumulated value and post in a fixed order.  No path
 * splits k, and the threads split only the columns, so a result is the
 * same bits on any thread count, for any number of rows (the images of a
 * run), and on every path: an AVX-512 lane, an AVX2 lane and fmaf() round
 * the same fused operation the same way.  That is what makes the SQL
 * functions honestly IMMUTABLE across servers with different CPUs.
 *
 * Weights stay shared by every backend: either read from the model's pack
 * cache (packcache.c: the panels packed once, in a file mapped read-only),
 * or packed on the fly from the read-only mapping of the model file, one
 * panel of k x NR floats at a time in the thread's scratch, which then
 * serves all the rows of the product (a quarter of a one-image inference
 * on the full model, less for a run of several images; no memory per
 * backend either way).
 *
 * Compiled without -march: each path's functions carry their own target
 * attribute, so one build runs everywhere and uses what the CPU has.
 */
#include "gemm.h"

#include "activation.h"
#include "pool.h"

#include <float.h>
#include <math.h>
#include <string.h>

/*
 * The x86 kernels, except in clang's instrumented fuzzing builds: there the
 * unrolled tiles take minutes and gigabytes to compile, and the fuzzers
 * test the loaders and the network's logic, which the portable path runs
 * alike (test_gemm checks the x86 kernels under GCC's sanitizers).
 */
#if defined(__clang__) && defined(__has_feature)
#if __has_feature(address_sanitizer)
#define NO_X86_KERNELS 1
#endif
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(NO_X86_KERNELS)
#include <immintrin.h>
#define HAVE_X86_KERNELS 1
#endif

#ifndef PREFETCH_FLOATS
#define PREFETCH_FLOATS 64
#endif
#define MR_AVX512 14
#define NR_AVX512 32
#define MR_AVX2 6
#define NR_AVX2 16
#define MR_PORTABLE 4
#define NR_PORTABLE 16

/* The largest MR and NR of any path: sizes of the scratch buffers. */
#define MR_MAX 14
#define NR_MAX 32

/*
 * Computes the columns [n0, n0 + cols) of C from the packed operands, and
 * meanwhile prefetches `ahead` (the next panel's weights, packed or not).
 */
typedef struct prefetch
{
	const char *start;
	size_t		bytes;
} prefetch;

typedef void (*panel_fn) (const osv_gemm *g, const float *packed_a, const float *packed_b,
						  int n0, int cols, prefetch ahead);

typedef void (*pack_a_fn) (const osv_gemm *g, int lo, int hi, float *dst);
typedef void (*pack_b_fn) (const osv_gemm *g, int n0, float *dst);

/* The native bf16 counterparts: A and B packed in pairs of bf16 ([k/2][MR or NR][2]). */
typedef void (*pack_a16_fn) (const osv_gemm *g, int lo, int hi, uint16_t *dst);
typedef void (*pack_b16_fn) (const osv_gemm *g, int n0, uint16_t *dst);
typedef void (*panel16_fn) (const osv_gemm *g, const uint16_t *packed_a, const uint16_t *packed_b,
							int n0, int cols, prefetch ahead);

/*
 * The int8 counterparts: A quantized into blocks [k/4][MR][4] of unsigned
 * bytes with a float scale per row (int8_a), B panels [k/4][NR][4] of
 * signed bytes with a scale and a sum per column (int8_b).
 */
typedef struct int8_a
{
	uint8_t    *q;
	float	   *scales;
} int8_a;

typedef struct int8_b
{
	const uint8_t *q;
	const float *scales;
	const int32_t *sums;
} int8_b;

typedef void (*pack_a8_fn) (const osv_gemm *g, int lo, int hi, int8_a dst);
typedef void (*panel8_fn) (const osv_gemm *g, int8_a a, int8_b b, int n0, int cols, prefetch ahead);

typedef struct kernel_path
{
	const char *name;
	int			mr,
				nr;
	pack_a_fn	pack_a;			/* blocks [lo, hi) of A */
	pack_b_fn	pack_b;
	panel_fn	panel;
	/* native bf16 products, or NULL: emulated with the float32 kernels */
	pack_a16_fn pack_a16;
	pack_b16_fn pack_b16;
	panel16_fn	panel16;
	/* int8 products (every path has them: native ones, or integer C) */
	pack_a8_fn	pack_a8;
	panel8_fn	panel8;
} kernel_path;

/* ---- packing ------------------------------------------------------------- */

static size_t
round_up(size_t x, size_t to)
{
	return (x + to - 1) / to * to;
}

/* Blocks of mr rows of A, [k][mr] each, zero rows past m: blocks [lo, hi). */
static void
pack_a(const osv_gemm *g, int mr, int lo, int hi, float *dst)
{
	for (int blk = lo; blk < hi; blk++)
	{
		float	   *out = dst + (size_t) blk * mr * g->k;

		for (int i = 0; i < mr; i++)
		{
			int			row = blk * mr + i;

			if (row < g->m)
			{
				const float *src = g->a + (size_t) row * g->lda;

				for (int p = 0; p < g->k; p++)
					out[(size_t) p * mr + i] = src[p];
			}
			else
				for (int p = 0; p < g->k; p++)
					out[(size_t) p * mr + i] = 0.0f;
		}
	}
}

/* Columns [n0, n0 + nr) of B as [k][nr], zero past n. */
static void
pack_b(const osv_gemm *g, int nr, int n0, float *dst)
{
	int			cols = g->n - n0 < nr ? g->n - n0 : nr;

	if (g->b_is_nk)
	{
		for (int j = 0; j < cols; j++)
		{
			const float *src = g->b + (size_t) (n0 + j) * g->ldb;

			for (int p = 0; p < g->k; p++)
				dst[(size_t) p * nr + j] = src[p];
		}
		for (int j = cols; j < nr; j++)
			for (int p = 0; p < g->k; p++)
				dst[(size_t) p * nr + j] = 0.0f;
	}
	else
	{
		for (int p = 0; p < g->k; p++)
		{
			memcpy(dst + (size_t) p * nr, g->b + (size_t) p * g->ldb + n0,
				   (size_t) cols * sizeof(float));
			for (int j = cols; j < nr; j++)
				dst[(size_t) p * nr + j] = 0.0f;
		}
	}
}

/* ---- bfloat16 -------------------------------------------------------------- */

uint16_t
osv_bf16_round(float x)
{
	union
	{
		float		f;
		uint32_t	u;
	}			v = {x};

	if ((v.u & 0x7f800000u) == 0)	/* zero or subnormal: a zero of its sign */
		return (uint16_t) ((v.u >> 16) & 0x8000u);
	if ((v.u & 0x7fffffffu) > 0x7f800000u)	/* NaN: keep it one, quiet */
		return (uint16_t) ((v.u >> 16) | 0x0040u);
	return (uint16_t) ((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

/* x rounded to bfloat16, as a float. */
static inline float
bf16_value(float x)
{
	return osv_bf16_to_float(osv_bf16_round(x));
}

/*
 * Turn rows of a float32 packing ([k][width], as pack_a and pack_b lay them
 * out) into the emulation's operand: every value rounded to bf16, and the
 * rows of each pair of k swapped, so that the float32 chain adds the odd
 * term of a pair before the even one, as vdpbf16ps does.  A last unpaired
 * row stays last (its partner, a zero, adds nothing).
 */
static void
bf16_emulation_rows(float *rows, int k, int width)
{
	int			p = 0;

	for (; p + 1 < k; p += 2)
	{
		float	   *even = rows + (size_t) p * width;
		float	   *odd = even + width;

		for (int j = 0; j < width; j++)
		{
			float		e = bf16_value(even[j]);

			even[j] = bf16_value(odd[j]);
			odd[j] = e;
		}
	}
	for (; p < k; p++)
		for (int j = 0; j < width; j++)
			rows[(size_t) p * width + j] = bf16_value(rows[(size_t) p * width + j]);
}

/* A float32 panel [k][nr] for the emulation, from a bf16 packed panel [k/2][nr][2]. */
static void
bf16_unpack_panel(const uint16_t *src, int k, int nr, float *dst)
{
	for (int p = 0; p < k; p++)
	{
		/* row p of the emulation holds k index p ^ 1 (the odd one of a pair first) */
		int			q = (p ^ 1) < k ? (p ^ 1) : p;
		const uint16_t *s = src + (size_t) (q / 2) * nr * 2 + (q & 1);

		for (int j = 0; j < nr; j++)
			dst[(size_t) p * nr + j] = osv_bf16_to_float(s[(size_t) j * 2]);
	}
}

/* Blocks [lo, hi) of mr rows of A as bf16 pairs, [ceil(k/2)][mr][2] each, zero-padded. */
static void
pack_a16(const osv_gemm *g, int mr, int lo, int hi, uint16_t *dst)
{
	size_t		kp = (size_t) (g->k + 1) / 2;

	for (int blk = lo; blk < hi; blk++)
	{
		uint16_t   *out = dst + (size_t) blk * mr * kp * 2;

		for (int i = 0; i < mr; i++)
		{
			int			row = blk * mr + i;
			const float *src = g->a + (size_t) row * g->lda;

			for (int p = 0; p < (int) kp * 2; p++)
				out[((size_t) (p / 2) * mr + i) * 2 + (p & 1)] =
					row < g->m && p < g->k ? osv_bf16_round(src[p]) : 0;
		}
	}
}

/* Columns [n0, n0 + nr) of B as bf16 pairs, [ceil(k/2)][nr][2], zero-padded. */
static void
pack_b16(const osv_gemm *g, int nr, int n0, uint16_t *dst)
{
	size_t		kp = (size_t) (g->k + 1) / 2;

	for (int j = 0; j < nr; j++)
		for (int p = 0; p < (int) kp * 2; p++)
		{
			float		v = 0.0f;

			if (n0 + j < g->n && p < g->k)
				v = g->b_is_nk ? g->b[(size_t) (n0 + j) * g->ldb + p]
					: g->b[(size_t) p * g->ldb + n0 + j];
			dst[((size_t) (p / 2) * nr + j) * 2 + (p & 1)] = osv_bf16_round(v);
		}
}

/* ---- int8 ------------------------------------------------------------------ */

/* The largest magnitude of n values x[i * stride] (NaNs ignored). */
static float
largest_magnitude(const float *x, size_t stride, int n)
{
	float		m = 0.0f;

	for (int i = 0; i < n; i++)
	{
		float		v = fabsf(x[(size_t) i * stride]);

		m = v > m ? v : m;
	}
	return m;
}

/* 127 / the largest magnitude, or 0 when all values are 0. */
static float
quantize_factor(float largest)
{
	return largest > 0.0f ? 127.0f / largest : 0.0f;
}

/* x * factor rounded to nearest even and clamped to [-127, 127] (a NaN to -127). */
static inline int
quantize_one(float x, float factor)
{
	float		v = x * factor;

	v = fmaxf(v, -127.0f);
	v = fminf(v, 127.0f);
	/*
	 * nearbyintf(v) in the default rounding mode, without a libm call (one
	 * per value where the CPU lacks SSE4.1's roundss): adding 1.5 * 2^23
	 * rounds to an integer, to nearest even, exactly for |v| <= 127
	 */
	return (int) ((v + 12582912.0f) - 12582912.0f);
}

float
osv_quantize_int8(const float *x, size_t stride, int n, int8_t *q)
{
	float		largest = largest_magnitude(x, stride, n);
	float		factor = quantize_factor(largest);

	for (int i = 0; i < n; i++)
		q[i] = (int8_t) quantize_one(x[(size_t) i * stride], factor);
	return largest / 127.0f;
}

/* Bytes of A quantized for blocks of mr rows, before the row scales (64-byte aligned). */
static size_t
int8_a_bytes(int m, int k, int mr)
{
	size_t		blocks = (size_t) (m + mr - 1) / mr;

	return round_up(blocks * mr * ((size_t) (k + 3) / 4) * 4, 64);
}

static int8_a
int8_a_in(float *packed_a, const osv_gemm *g, int mr)
{
	return (int8_a) {(uint8_t *) packed_a, (float *) ((char *) packed_a + int8_a_bytes(g->m, g->k, mr))};
}

/* Blocks [lo, hi) of mr rows of A quantized: [ceil(k/4)][mr][4] bytes (value + 128, pads 0). */
static void
pack_a8(const osv_gemm *g, int mr, int lo, int hi, int8_a dst)
{
	size_t		kq = (size_t) (g->k + 3) / 4;

	for (int blk = lo; blk < hi; blk++)
	{
		uint8_t    *out = dst.q + (size_t) blk * mr * kq * 4;

		for (int i = 0; i < mr; i++)
		{
			int			row = blk * mr + i;
			const float *src = g->a + (size_t) row * g->lda;
			float		largest = row < g->m ? largest_magnitude(src, 1, g->k) : 0.0f;
			float		factor = quantize_factor(largest);

			for (int p = 0; p < (int) kq * 4; p++)
				out[((size_t) (p / 4) * mr + i) * 4 + (p & 3)] =
					row < g->m && p < g->k ? (uint8_t) (quantize_one(src[p], factor) + 128) : 0;
			if (row < g->m)
				dst.scales[row] = largest / 127.0f;
		}
	}
}

/*
 * Columns [n0, n0 + nr) of B quantized: [ceil(k/4)][nr][4] signed bytes
 * (zero-padded), and each column's scale and sum of values.
 */
static void
pack_b8(const osv_gemm *g, int nr, int n0, uint8_t *dst, float *scales, int32_t *sums)
{
	size_t		kq = (size_t) (g->k + 3) / 4;

	for (int j = 0; j < nr; j++)
	{
		const float *col = NULL;
		size_t		stride = 1;
		float		largest = 0.0f,
					factor;
		int32_t		sum = 0;

		if (n0 + j < g->n)
		{
			col = g->b_is_nk ? g->b + (size_t) (n0 + j) * g->ldb : g->b + n0 + j;
			stride = g->b_is_nk ? 1 : g->ldb;
			largest = largest_magnitude(col, stride, g->k);
		}
		factor = quantize_factor(largest);
		for (int p = 0; p < (int) kq * 4; p++)
		{
			int			q = col != NULL && p < g->k ? quantize_one(col[(size_t) p * stride], factor) : 0;

			dst[((size_t) (p / 4) * nr + j) * 4 + (p & 3)] = (uint8_t) (int8_t) q;
			sum += q;
		}
		scales[j] = largest / 127.0f;
		sums[j] = sum;
	}
}

/* g->post applied to cols outputs of a row, one at a time (the scalar definition). */
static inline void
post_row(const osv_gemm *g, float *row, int cols)
{
	if (g->post == OSV_POST_GELU)
		for (int j = 0; j < cols; j++)
			row[j] = osv_gelu(row[j]);
	else if (g->post == OSV_POST_QUICK_GELU)
		for (int j = 0; j < cols; j++)
			row[j] = osv_quick_gelu(row[j]);
}

/* The float32 value of an int8 output before the epilogue, in gemm.h's order. */
static inline float
int8_value(int32_t acc, int32_t sum, float a_scale, float b_scale)
{
	float		v = (float) (acc - 128 * sum);

	v = v * a_scale;
	return v * b_scale;
}

/* An int8 panel in integer C: every path without vpdpbusd. */
static void
panel8_c(const osv_gemm *g, int mr, int nr, int8_a a, int8_b b, int n0, int cols)
{
	int			kq = (g->k + 3) / 4;

	for (int i0 = 0; i0 < g->m; i0 += mr)
	{
		const uint8_t *ablk = a.q + (size_t) (i0 / mr) * mr * kq * 4;

		for (int i = 0; i < mr && i0 + i < g->m; i++)
		{
			int			row = i0 + i;
			float	   *out = g->c + (size_t) row * g->ldc + n0;

			for (int j = 0; j < cols; j++)
			{
				int32_t		acc = 0;
				float		v;

				for (int q = 0; q < kq; q++)
				{
					const uint8_t *av = ablk + ((size_t) q * mr + i) * 4;
					const int8_t *bv = (const int8_t *) b.q + ((size_t) q * nr + j) * 4;

					acc += av[0] * bv[0] + av[1] * bv[1] + av[2] * bv[2] + av[3] * bv[3];
				}
				v = int8_value(acc, b.sums[j], a.scales[row], b.scales[j]);
				if (g->alpha != 1.0f)
					v = v * g->alpha;
				if (g->bias != NULL)
					v = v + g->bias[n0 + j];
				if (g->accumulate)
					v = out[j] + v;
				out[j] = v;
			}
			post_row(g, out, cols);
		}
	}
}

/*
 * Part `part` of `parts` of the prefetch into L2: spread over a panel's
 * tiles, so that reading the next panel's weights from memory overlaps
 * with this panel's arithmetic instead of stalling its packing (the 32
 * rows of a panel are more streams than the hardware prefetchers follow).
 */
static inline void
prefetch_part(prefetch ahead, int part, int parts)
{
	size_t		lo = ahead.bytes * part / parts & ~(size_t) 63;
	size_t		hi = ahead.bytes * (part + 1) / parts;

	for (size_t off = lo; off < hi; off += 64)
		__builtin_prefetch(ahead.start + off, 0, 2);
}

/* ---- the portable path --------------------------------------------------- */

/* One tile of mr (<= MR_PORTABLE) rows of C at row i0, columns [n0, n0 + cols). */
static void
tile_portable(const osv_gemm *g, int mr, int i0, const float *a, const float *b,
			  int n0, int cols)
{
	float		acc[MR_PORTABLE][NR_PORTABLE] = {{0}};

	for (int p = 0; p < g->k; p++)
		for (int i = 0; i < mr; i++)
			for (int j = 0; j < NR_PORTABLE; j++)
			{
				acc[i][j] = fmaf(a[(size_t) p * MR_PORTABLE + i],
								 b[(size_t) p * NR_PORTABLE + j], acc[i][j]);
				/* the bf16 emulation: a subnormal sum is flushed, as vdpbf16ps does */
				if (g->bf16 && fabsf(acc[i][j]) < FLT_MIN)
					acc[i][j] = copysignf(0.0f, acc[i][j]);
			}
	for (int i = 0; i < mr; i++)
	{
		float	   *row = g->c + (size_t) (i0 + i) * g->ldc + n0;

		for (int j = 0; j < cols; j++)
		{
			float		v = acc[i][j];

			if (g->alpha != 1.0f)
				v = v * g->alpha;
			if (g->bias != NULL)
				v = v + g->bias[n0 + j];
			if (g->accumulate)
				v = row[j] + v;
			row[j] = v;
		}
		post_row(g, row, cols);
	}
}

static void
panel_portable(const osv_gemm *g, const float *packed_a, const float *packed_b,
			   int n0, int cols, prefetch ahead)
{
	int			tiles = (g->m + MR_PORTABLE - 1) / MR_PORTABLE;

	for (int i0 = 0; i0 < g->m; i0 += MR_PORTABLE)
	{
		prefetch_part(ahead, i0 / MR_PORTABLE, tiles);
		tile_portable(g, g->m - i0 < MR_PORTABLE ? g->m - i0 : MR_PORTABLE, i0,
					  packed_a + (size_t) i0 * g->k, packed_b, n0, cols);
	}
}

#ifdef HAVE_X86_KERNELS

/* ---- the AVX-512 path ---------------------------------------------------- */

#define AVX512_TARGET __attribute__((target("avx512f,fma")))

/* Lanes of the first and second 16 of cols (<= 32) columns. */
static inline __mmask16
cols_mask(int cols, int half)
{
	int			n = cols - 16 * half;

	return n >= 16 ? 0xffff : n > 0 ? (__mmask16) ((1u << n) - 1) : 0;
}

/*
 * The epilogue of one row of a tile, C row i, columns [n0, n0 + cols):
 * alpha, bias, the accumulated value and post, in gemm.h's order.
 */
static inline __attribute__((always_inline)) AVX512_TARGET void
store_row_avx512(const osv_gemm *g, int i, int n0, int cols, __m512 v0, __m512 v1)
{
	float	   *row = g->c + (size_t) i * g->ldc + n0;
	__mmask16	mask0 = cols_mask(cols, 0),
				mask1 = cols_mask(cols, 1);

	if (g->alpha != 1.0f)
	{
		v0 = _mm512_mul_ps(v0, _mm512_set1_ps(g->alpha));
		v1 = _mm512_mul_ps(v1, _mm512_set1_ps(g->alpha));
	}
	if (g->bias != NULL)
	{
		v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(mask0, g->bias + n0));
		v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(mask1, g->bias + n0 + 16));
	}
	if (g->accumulate)
	{
		v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(mask0, row), v0);
		v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(mask1, row + 16), v1);
	}
	if (g->post == OSV_POST_GELU)
	{
		v0 = osv_gelu16(v0);
		v1 = osv_gelu16(v1);
	}
	else if (g->post == OSV_POST_QUICK_GELU)
	{
		v0 = osv_quick_gelu16(v0);
		v1 = osv_quick_gelu16(v1);
	}
	_mm512_mask_storeu_ps(row, mask0, v0);
	_mm512_mask_storeu_ps(row + 16, mask1, v1);
}

/* The epilogue of a tile of mr rows at row i0. */
static inline __attribute__((always_inline)) AVX512_TARGET void
store_tile_avx512(const osv_gemm *g, const int mr, int i0, int n0, int cols,
				  const __m512 *c0, const __m512 *c1)
{
#pragma GCC unroll 14
	for (int i = 0; i < mr; i++)
		store_row_avx512(g, i0 + i, n0, cols, c0[i], c1[i]);
}

/*
 * One tile of MR rows (a constant after inlining, so that the accumulators
 * live in registers) at row i0, columns [n0, n0 + cols), cols <= 32.
 */
/*
 * One tile of MR rows (a constant after inlining, so that the accumulators
 * live in registers) at row i0, columns [n0, n0 + cols), cols <= 32.
 */
static inline __attribute__((always_inline)) AVX512_TARGET void
tile_avx512(const osv_gemm *g, const int mr, int i0, const float *a,
			const float *b, int n0, int cols)
{
	__m512		c0[MR_AVX512],
				c1[MR_AVX512];

#pragma GCC unroll 14
	for (int i = 0; i < mr; i++)
	{
		c0[i] = _mm512_setzero_ps();
		c1[i] = _mm512_setzero_ps();
	}
	for (int p = 0; p < g->k; p++)
	{
		__m512		b0 = _mm512_load_ps(b + (size_t) p * NR_AVX512);
		__m512		b1 = _mm512_load_ps(b + (size_t) p * NR_AVX512 + 16);

#pragma GCC unroll 14
		for (int i = 0; i < mr; i++)
		{
			__m512		av = _mm512_set1_ps(a[(size_t) p * MR_AVX512 + i]);

			c0[i] = _mm512_fmadd_ps(av, b0, c0[i]);
			c1[i] = _mm512_fmadd_ps(av, b1, c1[i]);
		}
	}
	store_tile_avx512(g, mr, i0, n0, cols, c0, c1);
}

/*
 * dst[i * ldd + j] = src[j * lds + i] for i < 16 and j < rows (<= 16), the
 * lanes of keep of each output row stored: the packings' transposition, 16
 * values of up to 16 rows at a time in registers (unpack, then 64-bit,
 * then two 128-bit shuffle stages).
 */
static inline __attribute__((always_inline)) AVX512_TARGET void
transpose_avx512(const float *src, size_t lds, int rows, float *dst, size_t ldd,
				 __mmask16 keep)
{
	__m512		r[16],
				t[16];

	for (int i = 0; i < 16; i++)
		r[i] = i < rows ? _mm512_loadu_ps(src + (size_t) i * lds) : _mm512_setzero_ps();
	for (int i = 0; i < 16; i += 2)
	{
		t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
		t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
	}
	for (int i = 0; i < 16; i += 4)
	{
		r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
		r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xee);
		r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
		r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xee);
	}
	for (int i = 0; i < 4; i++)
	{
		t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
		t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
		t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
		t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
	}
	for (int i = 0; i < 8; i++)
	{
		r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
		r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
	}
	for (int i = 0; i < 16; i++)
		_mm512_mask_storeu_ps(dst + (size_t) i * ldd, keep, r[i]);
}

/* pack_b for NR = 32, with the transposition of full weight panels in registers. */
static AVX512_TARGET void
pack_b_avx512(const osv_gemm *g, int n0, float *dst)
{
	int			p = 0;

	if (!g->b_is_nk || g->n - n0 < NR_AVX512)
	{
		pack_b(g, NR_AVX512, n0, dst);
		return;
	}
	/*
	 * 16 rows at a time from start to end: 16 streams through memory, which
	 * the hardware prefetchers follow (all 32 rows at once are too many)
	 */
	for (int j = 0; j < NR_AVX512; j += 16)
		for (p = 0; p + 16 <= g->k; p += 16)
			transpose_avx512(g->b + (size_t) (n0 + j) * g->ldb + p, g->ldb, 16,
							 dst + (size_t) p * NR_AVX512 + j, NR_AVX512, 0xffff);
	for (; p < g->k; p++)
		for (int j = 0; j < NR_AVX512; j++)
			dst[(size_t) p * NR_AVX512 + j] = g->b[(size_t) (n0 + j) * g->ldb + p];
}

/* The rows of A in block blk of MR_AVX512 rows: MR_AVX512, or fewer in the last block. */
static inline int
block_rows(const osv_gemm *g, int blk)
{
	int			rows = g->m - blk * MR_AVX512;

	return rows < MR_AVX512 ? rows : MR_AVX512;
}

/* pack_a for MR = 14: transposed in registers, 16 values of k at a time (zero rows past m). */
static AVX512_TARGET void
pack_a_avx512(const osv_gemm *g, int lo, int hi, float *dst)
{
	for (int blk = lo; blk < hi; blk++)
	{
		float	   *out = dst + (size_t) blk * MR_AVX512 * g->k;
		const float *src = g->a + (size_t) blk * MR_AVX512 * g->lda;
		int			rows = block_rows(g, blk);
		int			p = 0;

		for (; p + 16 <= g->k; p += 16)
			transpose_avx512(src + p, g->lda, rows, out + (size_t) p * MR_AVX512,
							 MR_AVX512, (1 << MR_AVX512) - 1);
		for (; p < g->k; p++)
			for (int i = 0; i < MR_AVX512; i++)
				out[(size_t) p * MR_AVX512 + i] = i < rows ? src[(size_t) i * g->lda + p] : 0.0f;
	}
}

/*
 * The rows of an AVX-512 panel: full tiles of MR_AVX512 rows, each starting
 * part of the prefetch of the next panel, then the last rows with one copy
 * of the tile per count (each with its registers).  TILE(r, i0) runs the
 * tile of r rows at row i0; g, tiles and ahead are the panel's.
 */
#define AVX512_PANEL_ROWS(TILE) \
	do { \
		int			i0_ = 0; \
		int			tiles_ = (g->m + MR_AVX512 - 1) / MR_AVX512; \
		for (; i0_ + MR_AVX512 <= g->m; i0_ += MR_AVX512) \
		{ \
			prefetch_part(ahead, i0_ / MR_AVX512, tiles_); \
			TILE(MR_AVX512, i0_); \
		} \
		if (i0_ == g->m) \
			break; \
		prefetch_part(ahead, tiles_ - 1, tiles_); \
		switch (g->m - i0_) \
		{ \
			case 1: TILE(1, i0_); break; \
			case 2: TILE(2, i0_); break; \
			case 3: TILE(3, i0_); break; \
			case 4: TILE(4, i0_); break; \
			case 5: TILE(5, i0_); break; \
			case 6: TILE(6, i0_); break; \
			case 7: TILE(7, i0_); break; \
			case 8: TILE(8, i0_); break; \
			case 9: TILE(9, i0_); break; \
			case 10: TILE(10, i0_); break; \
			case 11: TILE(11, i0_); break; \
			case 12: TILE(12, i0_); break; \
			case 13: TILE(13, i0_); break; \
		} \
	} while (0)

static AVX512_TARGET void
panel_avx512(const osv_gemm *g, const float *packed_a, const float *packed_b,
			 int n0, int cols, prefetch ahead)
{
#define TILE(r, i0) tile_avx512(g, r, i0, packed_a + (size_t) (i0) * g->k, packed_b, n0, cols)
	AVX512_PANEL_ROWS(TILE);
#undef TILE
}

/* ---- the AVX-512 path's native bf16 products ------------------------------ */

#define AVX512BF16_TARGET __attribute__((target("avx512f,avx512bf16,fma")))

/* 16 floats rounded to bf16 as osv_bf16_round does, in 16 bits each. */
static inline __attribute__((always_inline)) AVX512_TARGET __m256i
bf16_round16(__m512 x)
{
	__m512i		u = _mm512_castps_si512(x);
	__m512i		exponent = _mm512_set1_epi32(0x7f800000);
	__mmask16	tiny = _mm512_testn_epi32_mask(u, exponent);
	__mmask16	nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
											  exponent);
	__m512i		lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
	__m512i		r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));

	r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
	r = _mm512_mask_mov_epi32(r, tiny, _mm512_and_si512(u, _mm512_set1_epi32((int) 0x80000000u)));
	return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

/*
 * rows (<= 16) rows of 32 floats at src (stride lds) as 16 bf16 pairs each,
 * transposed: dst[q * ldd + j] = the pair q of row j, for q < 16.
 */
static inline __attribute__((always_inline)) AVX512_TARGET void
pairs_transposed(const float *src, size_t lds, int rows, uint16_t *dst, size_t ldd,
				 __mmask16 keep)
{
	uint32_t	words[16 * 16] __attribute__((aligned(64)));

	for (int j = 0; j < rows; j++)
	{
		const float *row = src + (size_t) j * lds;
		__m256i		lo = bf16_round16(_mm512_loadu_ps(row));
		__m256i		hi = bf16_round16(_mm512_loadu_ps(row + 16));

		_mm512_store_si512(words + j * 16, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
	}
	/* the transposition moves 32-bit words: any bits, read and written as floats */
	transpose_avx512((const float *) words, 16, rows, (float *) dst, ldd, keep);
}

/* pack_a16 for MR = 14: 32 values of k at a time when k allows, else as pack_a16 does. */
static AVX512_TARGET void
pack_a16_avx512(const osv_gemm *g, int lo, int hi, uint16_t *dst)
{
	size_t		kp = (size_t) (g->k + 1) / 2;

	for (int blk = lo; blk < hi; blk++)
	{
		uint16_t   *out = dst + (size_t) blk * MR_AVX512 * kp * 2;
		const float *src = g->a + (size_t) blk * MR_AVX512 * g->lda;
		int			p = 0;

		if (g->k % 32 != 0)
		{
			pack_a16(g, MR_AVX512, blk, blk + 1, dst);
			continue;
		}
		/* rows past m: zeros, as pack_a16 pads */
		for (; p < g->k; p += 32)
			pairs_transposed(src + p, g->lda, block_rows(g, blk),
							 out + (size_t) p / 2 * MR_AVX512 * 2, MR_AVX512, (1 << MR_AVX512) - 1);
	}
}

/* pack_b16 for NR = 32: full weight panels 32 values of k at a time. */
static AVX512_TARGET void
pack_b16_avx512(const osv_gemm *g, int n0, uint16_t *dst)
{
	if (!g->b_is_nk || g->n - n0 < NR_AVX512 || g->k % 32 != 0)
	{
		pack_b16(g, NR_AVX512, n0, dst);
		return;
	}
	for (int j = 0; j < NR_AVX512; j += 16)
		for (int p = 0; p < g->k; p += 32)
			pairs_transposed(g->b + (size_t) (n0 + j) * g->ldb + p, g->ldb, 16,
							 dst + ((size_t) p / 2 * NR_AVX512 + j) * 2, NR_AVX512, 0xffff);
}

/* One tile of bf16 products: tile_avx512 with vdpbf16ps over the pairs of k. */
static inline __attribute__((always_inline)) AVX512BF16_TARGET void
tile_bf16(const osv_gemm *g, const int mr, int i0, const uint16_t *a,
		  const uint16_t *b, int n0, int cols)
{
	__m512		c0[MR_AVX512],
				c1[MR_AVX512];
	int			kp = (g->k + 1) / 2;

#pragma GCC unroll 14
	for (int i = 0; i < mr; i++)
	{
		c0[i] = _mm512_setzero_ps();
		c1[i] = _mm512_setzero_ps();
	}
	for (int q = 0; q < kp; q++)
	{
		__m512bh	b0 = (__m512bh) _mm512_load_si512(b + (size_t) q * NR_AVX512 * 2);
		__m512bh	b1 = (__m512bh) _mm512_load_si512(b + (size_t) q * NR_AVX512 * 2 + 32);

#pragma GCC unroll 14
		for (int i = 0; i < mr; i++)
		{
			int32_t		pair;
			__m512bh	av;

			memcpy(&pair, a + ((size_t) q * MR_AVX512 + i) * 2, sizeof(pair));
			av = (__m512bh) _mm512_set1_epi32(pair);
			c0[i] = _mm512_dpbf16_ps(c0[i], av, b0);
			c1[i] = _mm512_dpbf16_ps(c1[i], av, b1);
		}
	}
	store_tile_avx512(g, mr, i0, n0, cols, c0, c1);
}

static AVX512BF16_TARGET void
panel_bf16(const osv_gemm *g, const uint16_t *packed_a, const uint16_t *packed_b,
		   int n0, int cols, prefetch ahead)
{
	size_t		block = (size_t) MR_AVX512 * ((g->k + 1) / 2) * 2;	/* uint16 per block of A */

#define TILE(r, i0) tile_bf16(g, r, i0, packed_a + (size_t) ((i0) / MR_AVX512) * block, packed_b, n0, cols)
	AVX512_PANEL_ROWS(TILE);
#undef TILE
}

/* ---- the AVX-512 path's native int8 products --------------------------------- */

#define AVX512VNNI_TARGET __attribute__((target("avx512f,avx512vnni,fma")))

/* The largest magnitude of n floats, as largest_magnitude computes it. */
static inline __attribute__((always_inline)) AVX512_TARGET float
largest_magnitude16(const float *x, int n)
{
	__m512		m = _mm512_setzero_ps();
	float		lanes[16],
				largest = 0.0f;
	int			p = 0;

	/* max_ps(v, m) is v > m ? v : m, so a NaN is skipped as in the scalar loop */
	for (; p + 16 <= n; p += 16)
		m = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + p)), m);
	_mm512_storeu_ps(lanes, m);
	for (int i = 0; i < 16; i++)
		largest = lanes[i] > largest ? lanes[i] : largest;
	for (; p < n; p++)
	{
		float		v = fabsf(x[p]);

		largest = v > largest ? v : largest;
	}
	return largest;
}

/* 16 floats quantized as quantize_one does, plus 128, in 16 bytes. */
static inline __attribute__((always_inline)) AVX512_TARGET __m128i
quantize16(__m512 x, __m512 factor)
{
	__m512		v = _mm512_mul_ps(x, factor);

	/* max_ps(v, c) gives c for a NaN v, as fmaxf does */
	v = _mm512_max_ps(v, _mm512_set1_ps(-127.0f));
	v = _mm512_min_ps(v, _mm512_set1_ps(127.0f));
	/* the conversion rounds to nearest even, as nearbyintf in the default mode */
	return _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(v), _mm512_set1_epi32(128)));
}

/* pack_a8 for MR = 14: 64 values of k at a time when k allows, else as pack_a8 does. */
static AVX512_TARGET void
pack_a8_avx512(const osv_gemm *g, int lo, int hi, int8_a dst)
{
	size_t		kq = (size_t) (g->k + 3) / 4;

	for (int blk = lo; blk < hi; blk++)
	{
		uint8_t    *out = dst.q + (size_t) blk * MR_AVX512 * kq * 4;
		const float *src = g->a + (size_t) blk * MR_AVX512 * g->lda;
		__m512		factor[MR_AVX512];
		int			rows = block_rows(g, blk);

		if (g->k % 64 != 0)
		{
			pack_a8(g, MR_AVX512, blk, blk + 1, dst);
			continue;
		}
		for (int i = 0; i < rows; i++)
		{
			float		largest = largest_magnitude16(src + (size_t) i * g->lda, g->k);

			factor[i] = _mm512_set1_ps(quantize_factor(largest));
			dst.scales[blk * MR_AVX512 + i] = largest / 127.0f;
		}
		for (int p = 0; p < g->k; p += 64)
		{
			uint32_t	words[16 * 16] __attribute__((aligned(64)));

			for (int i = 0; i < rows; i++)
			{
				const float *row = src + (size_t) i * g->lda + p;

				for (int part = 0; part < 4; part++)
					_mm_store_si128((__m128i *) (words + i * 16 + part * 4),
									quantize16(_mm512_loadu_ps(row + part * 16), factor[i]));
			}
			/* quads of bytes, one 32-bit word each: transposed to [k/4][MR], rows past m 0 */
			transpose_avx512((const float *) words, 16, rows,
							 (float *) (out + (size_t) p / 4 * MR_AVX512 * 4), MR_AVX512,
							 (1 << MR_AVX512) - 1);
		}
	}
}

/*
 * acc + vpdpbusd(a, b), written as the instruction itself: with the
 * intrinsic, GCC 12 copies each accumulator through another register and
 * memory on every step (a third of the speed).
 */
static inline __attribute__((always_inline)) AVX512VNNI_TARGET __m512i
dpbusd(__m512i acc, __m512i a, __m512i b)
{
	__asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
	return acc;
}

/* One tile of int8 products: vpdpbusd over the quads of k, then int8_value and the epilogue. */
static inline __attribute__((always_inline)) AVX512VNNI_TARGET void
tile_int8(const osv_gemm *g, const int mr, int i0, const uint8_t *a, const float *a_scales,
		  int8_b b, int n0, int cols)
{
	__m512i		c0[MR_AVX512],
				c1[MR_AVX512];
	int			kq = (g->k + 3) / 4;
	__mmask16	mask0 = cols_mask(cols, 0),
				mask1 = cols_mask(cols, 1);
	__m512i		shift0,
				shift1;
	__m512		bs0,
				bs1;

#pragma GCC unroll 14
	for (int i = 0; i < mr; i++)
	{
		c0[i] = _mm512_setzero_si512();
		c1[i] = _mm512_setzero_si512();
	}
	for (int q = 0; q < kq; q++)
	{
		__m512i		b0 = _mm512_load_si512(b.q + (size_t) q * NR_AVX512 * 4);
		__m512i		b1 = _mm512_load_si512(b.q + (size_t) q * NR_AVX512 * 4 + 64);

#pragma GCC unroll 14
		for (int i = 0; i < mr; i++)
		{
			int32_t		quad;
			__m512i		av;

			memcpy(&quad, a + ((size_t) q * MR_AVX512 + i) * 4, sizeof(quad));
			av = _mm512_set1_epi32(quad);
			c0[i] = dpbusd(c0[i], av, b0);
			c1[i] = dpbusd(c1[i], av, b1);
		}
	}
	/* int8_value: (acc - 128 sum) as float, times the row's scale, then the column's */
	shift0 = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(mask0, b.sums), 7);
	shift1 = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(mask1, b.sums + 16), 7);
	bs0 = _mm512_maskz_loadu_ps(mask0, b.scales);
	bs1 = _mm512_maskz_loadu_ps(mask1, b.scales + 16);
#pragma GCC unroll 14
	for (int i = 0; i < mr; i++)
	{
		__m512		as = _mm512_set1_ps(a_scales[i0 + i]);

		store_row_avx512(g, i0 + i, n0, cols,
						 _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c0[i], shift0)), as), bs0),
						 _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c1[i], shift1)), as), bs1));
	}
}

static AVX512VNNI_TARGET void
panel_int8(const osv_gemm *g, int8_a a, int8_b b, int n0, int cols, prefetch ahead)
{
	size_t		block = (size_t) MR_AVX512 * ((g->k + 3) / 4) * 4;	/* bytes per block of A */

#define TILE(r, i0) tile_int8(g, r, i0, a.q + (size_t) ((i0) / MR_AVX512) * block, a.scales, b, n0, cols)
	AVX512_PANEL_ROWS(TILE);
#undef TILE
}

/* ---- the AVX2 path ------------------------------------------------------- */

#define AVX2_TARGET __attribute__((target("avx2,fma")))

/* Mask of the first n (0..8) lanes of a ymm, for maskload / maskstore. */
static inline AVX2_TARGET __m256i
lanes_avx2(int n)
{
	__m256i		idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);

	return _mm256_cmpgt_epi32(_mm256_set1_epi32(n < 0 ? 0 : n), idx);
}

static inline __attribute__((always_inline)) AVX2_TARGET void
tile_avx2(const osv_gemm *g, const int mr, int i0, const float *a,
		  const float *b, int n0, int cols)
{
	__m256		c0[MR_AVX2],
				c1[MR_AVX2];
	__m256i		mask0 = lanes_avx2(cols);
	__m256i		mask1 = lanes_avx2(cols - 8);
	__m256		alpha = _mm256_set1_ps(g->alpha);

#pragma GCC unroll 6
	for (int i = 0; i < mr; i++)
	{
		c0[i] = _mm256_setzero_ps();
		c1[i] = _mm256_setzero_ps();
	}
	for (int p = 0; p < g->k; p++)
	{
		__m256		b0 = _mm256_load_ps(b + (size_t) p * NR_AVX2);
		__m256		b1 = _mm256_load_ps(b + (size_t) p * NR_AVX2 + 8);

#pragma GCC unroll 6
		for (int i = 0; i < mr; i++)
		{
			__m256		av = _mm256_broadcast_ss(a + (size_t) p * MR_AVX2 + i);

			c0[i] = _mm256_fmadd_ps(av, b0, c0[i]);
			c1[i] = _mm256_fmadd_ps(av, b1, c1[i]);
		}
	}
#pragma GCC unroll 6
	for (int i = 0; i < mr; i++)
	{
		float	   *row = g->c + (size_t) (i0 + i) * g->ldc + n0;
		__m256		v0 = c0[i],
					v1 = c1[i];

		if (g->alpha != 1.0f)
		{
			v0 = _mm256_mul_ps(v0, alpha);
			v1 = _mm256_mul_ps(v1, alpha);
		}
		if (g->bias != NULL)
		{
			v0 = _mm256_add_ps(v0, _mm256_maskload_ps(g->bias + n0, mask0));
			v1 = _mm256_add_ps(v1, _mm256_maskload_ps(g->bias + n0 + 8, mask1));
		}
		if (g->accumulate)
		{
			v0 = _mm256_add_ps(_mm256_maskload_ps(row, mask0), v0);
			v1 = _mm256_add_ps(_mm256_maskload_ps(row + 8, mask1), v1);
		}
		_mm256_maskstore_ps(row, mask0, v0);
		_mm256_maskstore_ps(row + 8, mask1, v1);
		post_row(g, row, cols);
	}
}

static AVX2_TARGET void
panel_avx2(const osv_gemm *g, const float *packed_a, const float *packed_b,
		   int n0, int cols, prefetch ahead)
{
	int			i0 = 0;
	int			tiles = (g->m + MR_AVX2 - 1) / MR_AVX2;

	for (; i0 + MR_AVX2 <= g->m; i0 += MR_AVX2)
	{
		prefetch_part(ahead, i0 / MR_AVX2, tiles);
		tile_avx2(g, MR_AVX2, i0, packed_a + (size_t) i0 * g->k, packed_b, n0, cols);
	}
	if (i0 == g->m)
		return;
	prefetch_part(ahead, tiles - 1, tiles);
	packed_a += (size_t) i0 * g->k;
	switch (g->m - i0)
	{
#define REST(r) case r: tile_avx2(g, r, i0, packed_a, packed_b, n0, cols); break
			REST(1);
			REST(2);
			REST(3);
			REST(4);
			REST(5);
#undef REST
	}
}

#endif							/* HAVE_X86_KERNELS */

/* ---- choosing a path ----------------------------------------------------- */

/*
 * Each path's entry points at its own MR and NR (the generic packings and
 * the integer C int8 panel otherwise).
 */
#define GENERIC_ENTRIES(suffix, MR, NR) \
static void \
pack_a_##suffix(const osv_gemm *g, int lo, int hi, float *dst) \
{ \
	pack_a(g, MR, lo, hi, dst); \
} \
static void \
pack_b_##suffix(const osv_gemm *g, int n0, float *dst) \
{ \
	pack_b(g, NR, n0, dst); \
} \
static void \
pack_a8_##suffix(const osv_gemm *g, int lo, int hi, int8_a dst) \
{ \
	pack_a8(g, MR, lo, hi, dst); \
} \
static void \
panel8_##suffix(const osv_gemm *g, int8_a a, int8_b b, int n0, int cols, prefetch ahead) \
{ \
	(void) ahead; \
	panel8_c(g, MR, NR, a, b, n0, cols); \
}

GENERIC_ENTRIES(portable, MR_PORTABLE, NR_PORTABLE)

static const kernel_path path_portable = {"portable", MR_PORTABLE, NR_PORTABLE, pack_a_portable,
	pack_b_portable, panel_portable, NULL, NULL, NULL, pack_a8_portable, panel8_portable};

#ifdef HAVE_X86_KERNELS
GENERIC_ENTRIES(avx2, MR_AVX2, NR_AVX2)
/* the AVX-512 path's packings are its own; its int8 panel without VNNI is integer C */
static void
panel8_avx512(const osv_gemm *g, int8_a a, int8_b b, int n0, int cols, prefetch ahead)
{
	(void) ahead;
	panel8_c(g, MR_AVX512, NR_AVX512, a, b, n0, cols);
}

static const kernel_path path_avx512_bf16_vnni = {"avx512_bf16_vnni", MR_AVX512, NR_AVX512,
	pack_a_avx512, pack_b_avx512, panel_avx512, pack_a16_avx512, pack_b16_avx512, panel_bf16,
pack_a8_avx512, panel_int8};
static const kernel_path path_avx512_bf16 = {"avx512_bf16", MR_AVX512, NR_AVX512, pack_a_avx512,
	pack_b_avx512, panel_avx512, pack_a16_avx512, pack_b16_avx512, panel_bf16,
pack_a8_avx512, panel8_avx512};
static const kernel_path path_avx512_vnni = {"avx512_vnni", MR_AVX512, NR_AVX512, pack_a_avx512,
	pack_b_avx512, panel_avx512, NULL, NULL, NULL, pack_a8_avx512, panel_int8};
static const kernel_path path_avx512 = {"avx512", MR_AVX512, NR_AVX512, pack_a_avx512,
	pack_b_avx512, panel_avx512, NULL, NULL, NULL, pack_a8_avx512, panel8_avx512};
static const kernel_path path_avx2 = {"avx2", MR_AVX2, NR_AVX2, pack_a_avx2, pack_b_avx2, panel_avx2,
	NULL, NULL, NULL, pack_a8_avx2, panel8_avx2};
#endif

static const kernel_path *current;

static bool
cpu_runs(osv_kernels which)
{
#ifdef HAVE_X86_KERNELS
	bool		avx512;

	/* __builtin_cpu_supports also checks that the OS saves the registers */
	__builtin_cpu_init();
	avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
	switch (which)
	{
		case OSV_KERNELS_AVX512_BF16_VNNI:
			return avx512 && __builtin_cpu_supports("avx512bf16") &&
				__builtin_cpu_supports("avx512vnni");
		case OSV_KERNELS_AVX512_BF16:
			return avx512 && __builtin_cpu_supports("avx512bf16");
		case OSV_KERNELS_AVX512_VNNI:
			return avx512 && __builtin_cpu_supports("avx512vnni");
		case OSV_KERNELS_AVX512:
			return avx512;
		case OSV_KERNELS_AVX2:
			return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
		default:
			break;
	}
#endif
	return which == OSV_KERNELS_PORTABLE;
}

bool
osv_gemm_use_kernels(osv_kernels which)
{
	if (which == OSV_KERNELS_AUTO)
	{
		current = NULL;
		return true;
	}
	if (!cpu_runs(which))
		return false;
	switch (which)
	{
#ifdef HAVE_X86_KERNELS
		case OSV_KERNELS_AVX512_BF16_VNNI:
			current = &path_avx512_bf16_vnni;
			break;
		case OSV_KERNELS_AVX512_BF16:
			current = &path_avx512_bf16;
			break;
		case OSV_KERNELS_AVX512_VNNI:
			current = &path_avx512_vnni;
			break;
		case OSV_KERNELS_AVX512:
			current = &path_avx512;
			break;
		case OSV_KERNELS_AVX2:
			current = &path_avx2;
			break;
#endif
		default:
			current = &path_portable;
			break;
	}
	return true;
}

static const kernel_path *
path(void)
{
	if (current == NULL)
	{
		/* the first the CPU runs, fastest first */
		for (int which = OSV_KERNELS_AVX512_BF16_VNNI; which <= OSV_KERNELS_PORTABLE; which++)
			if (osv_gemm_use_kernels((osv_kernels) which))
				break;
	}
	return current;
}

const char *
osv_gemm_kernels_name(void)
{
	return path()->name;
}

bool
osv_gemm_avx512(void)
{
	return path()->mr == MR_AVX512;
}

/* ---- running a product ---------------------------------------------------- */


/*
 * Floats of a thread's B panel: k x NR floats, or for int8 the panel's
 * bytes (64-byte aligned) then a scale and a sum per column.
 */
static size_t
b_panel_floats(int k)
{
	return round_up((size_t) k * NR_MAX + 2 * NR_MAX + 16, 16);
}

size_t
osv_gemm_packed_a_floats(int m, int k)
{
	/*
	 * enough for m rounded up to the MR of any path; int8 needs less for the
	 * values (k rounded up to 4 bytes) but a scale per row after them
	 */
	return ((size_t) m + MR_MAX - 1) * ((size_t) k + 3) + (size_t) m + 32;
}

size_t
osv_gemm_scratch_floats(int max_m, int max_k)
{
	/* a B panel, then (serial use) the packed A; both 64-byte aligned */
	return b_panel_floats(max_k) + osv_gemm_packed_a_floats(max_m, max_k);
}

/* The weights the panel at column n0 packs, when they are one block of memory. */
static prefetch
next_panel(const osv_gemm *g, int n0, int nr)
{
	prefetch	none = {NULL, 0};
	int			cols = g->n - n0 < nr ? g->n - n0 : nr;

	if (!g->b_is_nk || n0 >= g->n || g->ldb != (size_t) g->k)
		return none;
	return (prefetch) {(const char *) (g->b + (size_t) n0 * g->ldb),
		(size_t) cols * g->ldb * sizeof(float)};
}

typedef struct run_step
{
	const osv_gemm *g;
	const kernel_path *kp;
	float	   *packed_a;
} run_step;

/* Whether g runs on the native bf16 kernels (else float32 or the emulation). */
static bool
native_bf16(const osv_gemm *g, const kernel_path *kp)
{
	return g->bf16 && kp->panel16 != NULL;
}

/* Blocks [lo, hi) of A, packed for the kernels that will read them. */
static void
pack_a_blocks(const osv_gemm *g, const kernel_path *kp, int lo, int hi, float *packed_a)
{
	if (g->int8)
	{
		kp->pack_a8(g, lo, hi, int8_a_in(packed_a, g, kp->mr));
		return;
	}
	if (native_bf16(g, kp))
	{
		kp->pack_a16(g, lo, hi, (uint16_t *) packed_a);
		return;
	}
	kp->pack_a(g, lo, hi, packed_a);
	if (g->bf16)
		for (int blk = lo; blk < hi; blk++)
			bf16_emulation_rows(packed_a + (size_t) blk * kp->mr * g->k, g->k, kp->mr);
}

static void
pack_a_step(void *arg, int ith, int nth)
{
	run_step   *s = arg;
	int			blocks = (s->g->m + s->kp->mr - 1) / s->kp->mr;
	int			lo,
				hi;

	osv_split(blocks, ith, nth, &lo, &hi);
	pack_a_blocks(s->g, s->kp, lo, hi, s->packed_a);
}

/*
 * The bf16 emulation's flush of subnormal sums to zero, on x86 through the
 * MXCSR (the float32 kernels' FMAs then flush as vdpbf16ps does); the
 * portable kernel flushes by itself.  Returns the state to restore.
 */
static unsigned
flush_to_zero_begin(const osv_gemm *g)
{
#if defined(__x86_64__) || defined(__i386__)
	unsigned	csr = __builtin_ia32_stmxcsr();

	if (g->bf16)
		__builtin_ia32_ldmxcsr(csr | 0x8000);	/* FTZ */
	return csr;
#else
	(void) g;
	return 0;
#endif
}

static void
flush_to_zero_end(unsigned csr)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_ldmxcsr(csr);
#else
	(void) csr;
#endif
}

/*
 * Panel pnl of B, packed for the kernels, either in place (a pack cache of
 * the right width and precision) or into scratch; *ahead is set to what
 * the following panel will read.
 */
static const void *
panel_of_b(const osv_gemm *g, const kernel_path *kp, int pnl, bool has_next, float *scratch,
		   prefetch *ahead)
{
	int			nr = kp->nr;
	int			n0 = pnl * nr;
	size_t		panel_floats = (size_t) nr * g->k;
	size_t		panel_halves = (size_t) nr * ((g->k + 1) / 2) * 2;

	*ahead = (prefetch) {NULL, 0};
	if (!g->bf16)
	{
		if (g->b_packed != NULL && g->b_packed_nr == nr)
		{
			const float *packed_b = g->b_packed + (size_t) pnl * panel_floats;

			if (has_next)
				*ahead = (prefetch) {(const char *) (packed_b + panel_floats),
				panel_floats * sizeof(float)};
			return packed_b;
		}
		kp->pack_b(g, n0, scratch);
	}
	else if (g->b_packed16 != NULL && g->b_packed16_nr == nr)
	{
		const uint16_t *packed_b = g->b_packed16 + (size_t) pnl * panel_halves;

		if (has_next)
			*ahead = (prefetch) {(const char *) (packed_b + panel_halves),
			panel_halves * sizeof(uint16_t)};
		if (native_bf16(g, kp))
			return packed_b;
		bf16_unpack_panel(packed_b, g->k, nr, scratch);
		return scratch;
	}
	else if (native_bf16(g, kp))
		kp->pack_b16(g, n0, (uint16_t *) scratch);
	else
	{
		kp->pack_b(g, n0, scratch);
		bf16_emulation_rows(scratch, g->k, nr);
	}
	if (has_next)
		*ahead = next_panel(g, n0 + nr, nr);
	return scratch;
}

/* Panel pnl of B for int8: in place from a pack cache of width nr, or quantized into scratch. */
static int8_b
int8_panel_of_b(const osv_gemm *g, int nr, int pnl, bool has_next, float *scratch,
				prefetch *ahead)
{
	size_t		panel_bytes = (size_t) nr * ((g->k + 3) / 4) * 4;

	*ahead = (prefetch) {NULL, 0};
	if (g->b_packed8 != NULL && g->b_packed8_nr == nr)
	{
		int			panels = (g->n + nr - 1) / nr;
		const uint8_t *tail = g->b_packed8 + round_up(panel_bytes * panels, 64);
		const uint8_t *q = g->b_packed8 + panel_bytes * pnl;

		if (has_next)
			*ahead = (prefetch) {(const char *) (q + panel_bytes), panel_bytes};
		return (int8_b) {q, (const float *) tail + (size_t) pnl * nr,
			(const int32_t *) (tail + (size_t) panels * nr * sizeof(float)) + (size_t) pnl * nr};
	}
	else
	{
		uint8_t    *q = (uint8_t *) scratch;
		float	   *scales = (float *) (q + round_up(panel_bytes, 64));
		int32_t    *sums = (int32_t *) (scales + nr);

		pack_b8(g, nr, pnl * nr, q, scales, sums);
		if (has_next)
			*ahead = next_panel(g, (pnl + 1) * nr, nr);
		return (int8_b) {q, scales, sums};
	}
}

/* Panels [lo, hi) of C, with the thread's scratch. */
static void
run_panels(const osv_gemm *g, const kernel_path *kp, const float *packed_a, int lo, int hi,
		   float *scratch)
{
	int			nr = kp->nr;
	unsigned	csr = flush_to_zero_begin(g);

	for (int pnl = lo; pnl < hi; pnl++)
	{
		int			n0 = pnl * nr;
		int			cols = g->n - n0 < nr ? g->n - n0 : nr;
		prefetch	ahead;
		const void *packed_b;

		if (g->int8)
		{
			kp->panel8(g, int8_a_in((float *) packed_a, g, kp->mr),
					   int8_panel_of_b(g, nr, pnl, pnl + 1 < hi, scratch, &ahead), n0, cols, ahead);
			continue;
		}
		packed_b = panel_of_b(g, kp, pnl, pnl + 1 < hi, scratch, &ahead);

		if (native_bf16(g, kp))
			kp->panel16(g, (const uint16_t *) packed_a, packed_b, n0, cols, ahead);
		else
			kp->panel(g, packed_a, packed_b, n0, cols, ahead);
	}
	flush_to_zero_end(csr);
}

static void
panels_step(void *arg, int ith, int nth)
{
	run_step   *s = arg;
	int			panels = (s->g->n + s->kp->nr - 1) / s->kp->nr;
	int			lo,
				hi;

	osv_split(panels, ith, nth, &lo, &hi);
	run_panels(s->g, s->kp, s->packed_a, lo, hi, osv_pool_scratch(ith));
}

int
osv_gemm_nr(void)
{
	return path()->nr;
}

size_t
osv_gemm_packed_weight_floats(int n, int k, int nr)
{
	return (size_t) ((n + nr - 1) / nr) * nr * (size_t) k;
}

void
osv_gemm_pack_weight(const float *w, int n, int k, int nr, float *dst)
{
	osv_gemm	g = {.n = n,.k = k,.b = w,.ldb = (size_t) k,.b_is_nk = true};

	/* the same values pack_b gives each panel on the fly: a transposition is exact */
	for (int n0 = 0; n0 < n; n0 += nr)
		pack_b(&g, nr, n0, dst + (size_t) n0 * k);
}

size_t
osv_gemm_packed_weight_halves(int n, int k, int nr)
{
	return (size_t) ((n + nr - 1) / nr) * nr * ((size_t) (k + 1) / 2 * 2);
}

void
osv_gemm_pack_weight_bf16(const float *w, int n, int k, int nr, uint16_t *dst)
{
	osv_gemm	g = {.n = n,.k = k,.b = w,.ldb = (size_t) k,.b_is_nk = true};

	/* the same values pack_b16 gives each panel on the fly */
	for (int n0 = 0; n0 < n; n0 += nr)
		pack_b16(&g, nr, n0, dst + (size_t) n0 * ((k + 1) / 2 * 2));
}

size_t
osv_gemm_packed_weight_int8_bytes(int n, int k, int nr)
{
	size_t		panels = (size_t) (n + nr - 1) / nr;

	return round_up(panels * nr * ((size_t) (k + 3) / 4) * 4, 64) +
		panels * nr * (sizeof(float) + sizeof(int32_t));
}

void
osv_gemm_pack_weight_int8(const float *w, int n, int k, int nr, uint8_t *dst)
{
	osv_gemm	g = {.n = n,.k = k,.b = w,.ldb = (size_t) k,.b_is_nk = true};
	size_t		panels = (size_t) (n + nr - 1) / nr;
	size_t		panel_bytes = (size_t) nr * ((k + 3) / 4) * 4;
	float	   *scales = (float *) (dst + round_up(panels * panel_bytes, 64));
	int32_t    *sums = (int32_t *) (scales + panels * nr);

	/* the same values pack_b8 gives each panel on the fly */
	for (size_t p = 0; p < panels; p++)
		pack_b8(&g, nr, (int) p * nr, dst + p * panel_bytes, scales + p * nr, sums + p * nr);
}

void
osv_gemm_run(const osv_gemm *g, float *packed_a)
{
	run_step	s = {g, path(), packed_a};

	if (!g->a_packed)
		osv_pool_run(pack_a_step, &s);
	osv_pool_run(panels_step, &s);
}

void
osv_gemm_serial(const osv_gemm *g, float *scratch)
{
	const kernel_path *kp = path();
	float	   *packed_a = scratch + b_panel_floats(g->k);

	pack_a_blocks(g, kp, 0, (g->m + kp->mr - 1) / kp->mr, packed_a);
	run_panels(g, kp, packed_a, 0, (g->n + kp->nr - 1) / kp->nr, scratch);
}

const char *
osv_kernels_name(void)
{
	return osv_gemm_kernels_name();
}

const char *
osv_precision_name(osv_precision precision)
{
	return precision == OSV_PRECISION_BF16 ? "bf16" : precision == OSV_PRECISION_INT8 ? "int8" : "fp32";
}

bool
osv_precision_parse(const char *name, osv_precision *out)
{
	if (name != NULL && strcmp(name, "fp32") == 0)
		*out = OSV_PRECISION_FP32;
	else if (name != NULL && strcmp(name, "bf16") == 0)
		*out = OSV_PRECISION_BF16;
	else if (name != NULL && strcmp(name, "int8") == 0)
		*out = OSV_PRECISION_INT8;
	else
		return false;
	return true;
}

/* The native int8 panel, or NULL in builds without x86 kernels. */
static panel8_fn
panel_int8_native(void)
{
#ifdef HAVE_X86_KERNELS
	return panel_int8;
#else
	return NULL;
#endif
}

bool
osv_precision_native(osv_precision precision)
{
	if (precision == OSV_PRECISION_BF16)
		return path()->panel16 != NULL;
	if (precision == OSV_PRECISION_INT8)
		return path()->panel8 == panel_int8_native();
	return true;
}
