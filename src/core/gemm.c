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
} kernel_path;

/* ---- packing ------------------------------------------------------------- */

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
		if (g->post != NULL)
			g->post(row, cols);
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

/*
 * One tile of MR rows (a constant after inlining, so that the accumulators
 * live in registers) at row i0, columns [n0, n0 + cols), cols <= 32.
 */
/*
 * The epilogue of a tile of mr rows at row i0, columns [n0, n0 + cols):
 * alpha, bias, the accumulated value and post, in gemm.h's order.
 */
static inline __attribute__((always_inline)) AVX512_TARGET void
store_tile_avx512(const osv_gemm *g, const int mr, int i0, int n0, int cols,
				  const __m512 *c0, const __m512 *c1)
{
	__mmask16	mask0 = cols >= 16 ? 0xffff : (__mmask16) ((1u << cols) - 1);
	__mmask16	mask1 = cols >= 32 ? 0xffff : (cols > 16 ? (__mmask16) ((1u << (cols - 16)) - 1) : 0);
	__m512		alpha = _mm512_set1_ps(g->alpha);

#pragma GCC unroll 14
	for (int i = 0; i < mr; i++)
	{
		float	   *row = g->c + (size_t) (i0 + i) * g->ldc + n0;
		__m512		v0 = c0[i],
					v1 = c1[i];

		if (g->alpha != 1.0f)
		{
			v0 = _mm512_mul_ps(v0, alpha);
			v1 = _mm512_mul_ps(v1, alpha);
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
		_mm512_mask_storeu_ps(row, mask0, v0);
		_mm512_mask_storeu_ps(row + 16, mask1, v1);
		if (g->post != NULL)
			g->post(row, cols);
	}
}

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

/* pack_a for MR = 14: full blocks transposed in registers, the rest as pack_a does. */
static AVX512_TARGET void
pack_a_avx512(const osv_gemm *g, int lo, int hi, float *dst)
{
	for (int blk = lo; blk < hi; blk++)
	{
		float	   *out = dst + (size_t) blk * MR_AVX512 * g->k;
		const float *src = g->a + (size_t) blk * MR_AVX512 * g->lda;
		int			p = 0;

		if ((blk + 1) * MR_AVX512 > g->m)
		{
			pack_a(g, MR_AVX512, blk, blk + 1, dst);
			continue;
		}
		for (; p + 16 <= g->k; p += 16)
			transpose_avx512(src + p, g->lda, MR_AVX512, out + (size_t) p * MR_AVX512,
							 MR_AVX512, (1 << MR_AVX512) - 1);
		for (; p < g->k; p++)
			for (int i = 0; i < MR_AVX512; i++)
				out[(size_t) p * MR_AVX512 + i] = src[(size_t) i * g->lda + p];
	}
}

static AVX512_TARGET void
panel_avx512(const osv_gemm *g, const float *packed_a, const float *packed_b,
			 int n0, int cols, prefetch ahead)
{
	int			i0 = 0;
	int			tiles = (g->m + MR_AVX512 - 1) / MR_AVX512;

	for (; i0 + MR_AVX512 <= g->m; i0 += MR_AVX512)
	{
		prefetch_part(ahead, i0 / MR_AVX512, tiles);
		tile_avx512(g, MR_AVX512, i0, packed_a + (size_t) i0 * g->k, packed_b, n0, cols);
	}
	if (i0 == g->m)
		return;
	prefetch_part(ahead, tiles - 1, tiles);
	/* the last rows: one copy of the tile per count, each with its registers */
	packed_a += (size_t) i0 * g->k;
	switch (g->m - i0)
	{
#define REST(r) case r: tile_avx512(g, r, i0, packed_a, packed_b, n0, cols); break
			REST(1);
			REST(2);
			REST(3);
			REST(4);
			REST(5);
			REST(6);
			REST(7);
			REST(8);
			REST(9);
			REST(10);
			REST(11);
			REST(12);
			REST(13);
#undef REST
	}
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

/* pack_a16 for MR = 14: full blocks 32 values of k at a time, the rest as pack_a16 does. */
static AVX512_TARGET void
pack_a16_avx512(const osv_gemm *g, int lo, int hi, uint16_t *dst)
{
	size_t		kp = (size_t) (g->k + 1) / 2;

	for (int blk = lo; blk < hi; blk++)
	{
		uint16_t   *out = dst + (size_t) blk * MR_AVX512 * kp * 2;
		const float *src = g->a + (size_t) blk * MR_AVX512 * g->lda;
		int			p = 0;

		if ((blk + 1) * MR_AVX512 > g->m || g->k % 32 != 0)
		{
			pack_a16(g, MR_AVX512, blk, blk + 1, dst);
			continue;
		}
		for (; p < g->k; p += 32)
			pairs_transposed(src + p, g->lda, MR_AVX512, out + (size_t) p / 2 * MR_AVX512 * 2,
							 MR_AVX512, (1 << MR_AVX512) - 1);
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
	int			i0 = 0;
	int			tiles = (g->m + MR_AVX512 - 1) / MR_AVX512;
	size_t		block = (size_t) MR_AVX512 * ((g->k + 1) / 2) * 2;	/* uint16 per block of A */

	for (; i0 + MR_AVX512 <= g->m; i0 += MR_AVX512)
	{
		prefetch_part(ahead, i0 / MR_AVX512, tiles);
		tile_bf16(g, MR_AVX512, i0, packed_a + (size_t) (i0 / MR_AVX512) * block, packed_b, n0, cols);
	}
	if (i0 == g->m)
		return;
	prefetch_part(ahead, tiles - 1, tiles);
	packed_a += (size_t) (i0 / MR_AVX512) * block;
	switch (g->m - i0)
	{
#define REST(r) case r: tile_bf16(g, r, i0, packed_a, packed_b, n0, cols); break
			REST(1);
			REST(2);
			REST(3);
			REST(4);
			REST(5);
			REST(6);
			REST(7);
			REST(8);
			REST(9);
			REST(10);
			REST(11);
			REST(12);
			REST(13);
#undef REST
	}
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
		if (g->post != NULL)
			g->post(row, cols);
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

static void
pack_a_portable(const osv_gemm *g, int lo, int hi, float *dst)
{
	pack_a(g, MR_PORTABLE, lo, hi, dst);
}

static void
pack_b_portable(const osv_gemm *g, int n0, float *dst)
{
	pack_b(g, NR_PORTABLE, n0, dst);
}

static const kernel_path path_portable = {"portable", MR_PORTABLE, NR_PORTABLE, pack_a_portable,
pack_b_portable, panel_portable, NULL, NULL, NULL};
#ifdef HAVE_X86_KERNELS
static void
pack_a_avx2(const osv_gemm *g, int lo, int hi, float *dst)
{
	pack_a(g, MR_AVX2, lo, hi, dst);
}

static void
pack_b_avx2(const osv_gemm *g, int n0, float *dst)
{
	pack_b(g, NR_AVX2, n0, dst);
}

static const kernel_path path_avx512_bf16 = {"avx512_bf16", MR_AVX512, NR_AVX512, pack_a_avx512,
pack_b_avx512, panel_avx512, pack_a16_avx512, pack_b16_avx512, panel_bf16};
static const kernel_path path_avx512 = {"avx512", MR_AVX512, NR_AVX512, pack_a_avx512,
pack_b_avx512, panel_avx512, NULL, NULL, NULL};
static const kernel_path path_avx2 = {"avx2", MR_AVX2, NR_AVX2, pack_a_avx2, pack_b_avx2, panel_avx2,
NULL, NULL, NULL};
#endif

static const kernel_path *current;

static bool
cpu_runs(osv_kernels which)
{
#ifdef HAVE_X86_KERNELS
	/* __builtin_cpu_supports also checks that the OS saves the registers */
	__builtin_cpu_init();
	if (which == OSV_KERNELS_AVX512_BF16)
		return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma") &&
			__builtin_cpu_supports("avx512bf16");
	if (which == OSV_KERNELS_AVX512)
		return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
	if (which == OSV_KERNELS_AVX2)
		return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
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
#ifdef HAVE_X86_KERNELS
	if (which == OSV_KERNELS_AVX512_BF16)
		current = &path_avx512_bf16;
	else if (which == OSV_KERNELS_AVX512)
		current = &path_avx512;
	else if (which == OSV_KERNELS_AVX2)
		current = &path_avx2;
	else
#endif
		current = &path_portable;
	return true;
}

static const kernel_path *
path(void)
{
	if (current == NULL)
	{
		if (!osv_gemm_use_kernels(OSV_KERNELS_AVX512_BF16) &&
			!osv_gemm_use_kernels(OSV_KERNELS_AVX512) &&
			!osv_gemm_use_kernels(OSV_KERNELS_AVX2))
			osv_gemm_use_kernels(OSV_KERNELS_PORTABLE);
	}
	return current;
}

const char *
osv_gemm_kernels_name(void)
{
	return path()->name;
}

/* ---- running a product ---------------------------------------------------- */

static size_t
round_up(size_t x, size_t to)
{
	return (x + to - 1) / to * to;
}

size_t
osv_gemm_packed_a_floats(int m, int k)
{
	/* enough for m rounded up to the MR of any path */
	return ((size_t) m + MR_MAX - 1) * (size_t) k;
}

size_t
osv_gemm_scratch_floats(int max_m, int max_k)
{
	/* a B panel, then (serial use) the packed A; both 64-byte aligned */
	return round_up((size_t) max_k * NR_MAX, 16) + osv_gemm_packed_a_floats(max_m, max_k);
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
		const void *packed_b = panel_of_b(g, kp, pnl, pnl + 1 < hi, scratch, &ahead);

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

void
osv_gemm_run(const osv_gemm *g, float *packed_a)
{
	run_step	s = {g, path(), packed_a};

	osv_pool_run(pack_a_step, &s);
	osv_pool_run(panels_step, &s);
}

void
osv_gemm_serial(const osv_gemm *g, float *scratch)
{
	const kernel_path *kp = path();
	float	   *packed_a = scratch + round_up((size_t) g->k * NR_MAX, 16);

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
	return precision == OSV_PRECISION_BF16 ? "bf16" : "fp32";
}

bool
osv_precision_parse(const char *name, osv_precision *out)
{
	if (name != NULL && strcmp(name, "fp32") == 0)
		*out = OSV_PRECISION_FP32;
	else if (name != NULL && strcmp(name, "bf16") == 0)
		*out = OSV_PRECISION_BF16;
	else
		return false;
	return true;
}

bool
osv_precision_native(osv_precision precision)
{
	return precision == OSV_PRECISION_FP32 || path()->panel16 != NULL;
}
