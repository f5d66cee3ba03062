/*
 * test_gemm.c: our matrix-product kernels (gemm.c) on random shapes that
 * cover every remainder of the tiles (rows not a multiple of MR, columns
 * not a multiple of NR, k not a multiple of the transposition's 16), both
 * layouts of B, strided A and C, alpha, bias, accumulation and post.
 *
 * Three independent yardsticks:
 *   - a double-precision product computed here, with the epilogue in the
 *     same order (each output within a bound of the float rounding of a
 *     k-term sum);
 *   - OpenBLAS's SGEMM, the library the core used before (cross-check);
 *   - the same FMA chain written out with fmaf() here: every path must
 *     give exactly these bits, on every thread count, through both the
 *     threaded and the serial entry points.
 */
#include "activation.h"
#include "gemm.h"
#include "pool.h"
#include "blas.h"

#include "check.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static unsigned long long rng_state = 88172645463325252ULL;

static float
uniform(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return (float) ((double) (rng_state >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

/* g's post on the n values of a row: the scalar definitions (activation.h). */
static void
apply_post(const osv_gemm *g, float *row, int n)
{
	for (int i = 0; i < n; i++)
		if (g->post == OSV_POST_GELU)
			row[i] = osv_gelu(row[i]);
		else if (g->post == OSV_POST_QUICK_GELU)
			row[i] = osv_quick_gelu(row[i]);
}

/* g's post of v in double precision, from libm. */
static double
post_double(const osv_gemm *g, double v)
{
	if (g->post == OSV_POST_GELU)
		return 0.5 * v * (1.0 + erf(v / sqrt(2.0)));
	if (g->post == OSV_POST_QUICK_GELU)
		return v / (1.0 + exp(-1.702 * v));
	return v;
}

/* B(k, j) of g. */
static float
b_at(const osv_gemm *g, int p, int j)
{
	return g->b_is_nk ? g->b[(size_t) j * g->ldb + p] : g->b[(size_t) p * g->ldb + j];
}

/* The exact expected bits: one fmaf chain per output, then the epilogue. */
static void
expected_bits(const osv_gemm *g, const float *c_before, float *out)
{
	for (int i = 0; i < g->m; i++)
	{
		for (int j = 0; j < g->n; j++)
		{
			float		acc = 0.0f;
			float		v;

			for (int p = 0; p < g->k; p++)
				acc = fmaf(g->a[(size_t) i * g->lda + p], b_at(g, p, j), acc);
			v = acc;
			if (g->alpha != 1.0f)
				v = v * g->alpha;
			if (g->bias != NULL)
				v = v + g->bias[j];
			if (g->accumulate)
				v = c_before[(size_t) i * g->ldc + j] + v;
			out[(size_t) i * g->ldc + j] = v;
		}
		apply_post(g, out + (size_t) i * g->ldc, g->n);
	}
}

/* Largest error of C against a double-precision product, in units of its bound. */
static double
error_vs_double(const osv_gemm *g, const float *c_before, const float *c)
{
	double		worst = 0.0;

	for (int i = 0; i < g->m; i++)
		for (int j = 0; j < g->n; j++)
		{
			double		sum = 0.0,
						mag = 0.0,
						v,
						bound;

			for (int p = 0; p < g->k; p++)
			{
				double		t = (double) g->a[(size_t) i * g->lda + p] * b_at(g, p, j);

				sum += t;
				mag += fabs(t);
			}
			v = sum * g->alpha;
			mag *= fabs(g->alpha);
			if (g->bias != NULL)
			{
				v += g->bias[j];
				mag += fabs(g->bias[j]);
			}
			if (g->accumulate)
			{
				v += c_before[(size_t) i * g->ldc + j];
				mag += fabs(c_before[(size_t) i * g->ldc + j]);
			}
			if (g->post != OSV_POST_NONE)
			{
				/*
				 * both activations have slopes below 1.13, so the sum's
				 * error carries over scaled by that; plus their own error,
				 * a few ulps of v (8 of them, counted in mag)
				 */
				mag = mag * 1.13 + 8.0 * fabs(v);
				v = post_double(g, v);
			}
			/* a k-term float sum: at most about (k + 3) eps of the magnitudes */
			bound = (g->k + 4) * 1.2e-7 * mag + 1e-30;
			v = fabs(c[(size_t) i * g->ldc + j] - v) / bound;
			if (v > worst)
				worst = v;
		}
	return worst;
}

/* C of OpenBLAS's SGEMM with the same epilogue, for the cross-check. */
static double
relative_vs_openblas(const osv_gemm *g, const float *c_before, const float *c)
{
	float	   *t = calloc((size_t) g->m * g->n, sizeof(float));
	double		worst = 0.0,
				scale = 0.0;

	osv_sgemm(CblasNoTrans, g->b_is_nk ? CblasTrans : CblasNoTrans, g->m, g->n, g->k,
			  g->alpha, g->a, (int) g->lda, g->b, (int) g->ldb, 0.0f, t, g->n);
	for (int i = 0; i < g->m; i++)
	{
		for (int j = 0; j < g->n; j++)
		{
			float	   *v = t + (size_t) i * g->n + j;

			if (g->bias != NULL)
				*v += g->bias[j];
			if (g->accumulate)
				*v = c_before[(size_t) i * g->ldc + j] + *v;
		}
		apply_post(g, t + (size_t) i * g->n, g->n);
		for (int j = 0; j < g->n; j++)
		{
			double		d = fabs((double) c[(size_t) i * g->ldc + j] - t[(size_t) i * g->n + j]);

			worst = d > worst ? d : worst;
			scale = fabs(t[(size_t) i * g->n + j]) > scale ? fabs(t[(size_t) i * g->n + j]) : scale;
		}
	}
	free(t);
	return worst / (scale > 0.0 ? scale : 1.0);
}

static const char *const path_names[] = {"auto", "avx512_bf16_vnni", "avx512_bf16", "avx512_vnni",
"avx512", "avx2", "portable"};

/* 0 for a subnormal, as vdpbf16ps flushes its sums. */
static float
flushed(float x)
{
	return fabsf(x) < 1.17549435e-38f ? copysignf(0.0f, x) : x;
}

/*
 * The bf16 product's expected bits, written from the definition (gemm.h)
 * in double precision rather than with fmaf: each term, a product of two
 * bfloat16 values, is exact in double; the float32 sum plus the term is
 * rounded once to double, then to float, which gives the correctly
 * rounded float sum (double has more than twice float's precision).
 */
static void
expected_bits_bf16(const osv_gemm *g, const float *c_before, float *out)
{
	for (int i = 0; i < g->m; i++)
	{
		for (int j = 0; j < g->n; j++)
		{
			float		acc = 0.0f;
			float		v;

			for (int p = 0; p < g->k; p += 2)
				for (int q = p + 1; q >= p; q--)	/* the odd term of the pair first */
				{
					double		term;

					if (q >= g->k)
						continue;
					term = (double) osv_bf16_to_float(osv_bf16_round(g->a[(size_t) i * g->lda + q])) *
						(double) osv_bf16_to_float(osv_bf16_round(b_at(g, q, j)));
					acc = flushed((float) ((double) acc + term));
				}
			v = acc;
			if (g->alpha != 1.0f)
				v = v * g->alpha;
			if (g->bias != NULL)
				v = v + g->bias[j];
			if (g->accumulate)
				v = c_before[(size_t) i * g->ldc + j] + v;
			out[(size_t) i * g->ldc + j] = v;
		}
		apply_post(g, out + (size_t) i * g->ldc, g->n);
	}
}

/*
 * g (bf16 or int8) on every path the CPU runs, on 1 and 2 threads, serially,
 * and with B packed in advance in g's precision when B is a weight: each
 * must give exactly want's bits.
 */
static void
check_every_path(const osv_gemm *g, const float *c0, const float *want, float *c, float *packed,
				 float *scratch, const char *what)
{
	size_t		bytes = (size_t) g->m * g->ldc * sizeof(float);
	const char *precision = g->int8 ? "int8" : "bf16";
	bool		weight = g->b_is_nk && g->ldb == (size_t) g->k;
	size_t		packed_bytes = g->int8 ? osv_gemm_packed_weight_int8_bytes(g->n, g->k, 32) :
		osv_gemm_packed_weight_halves(g->n, g->k, 32) * sizeof(uint16_t);
	void	   *prepacked = weight ? aligned_alloc(64, (packed_bytes + 63) / 64 * 64) : NULL;
	osv_error	err;

	for (int path = OSV_KERNELS_AVX512_BF16_VNNI; path <= OSV_KERNELS_PORTABLE; path++)
	{
		if (!osv_gemm_use_kernels((osv_kernels) path))
			continue;
		for (int threads = 1; threads <= 2; threads++)
		{
			CHECK(osv_pool_prepare(threads, osv_gemm_scratch_floats(0, g->k) * sizeof(float), &err) == OSV_OK,
				  "pool: %s", err.message);
			memcpy(c, c0, bytes);
			osv_gemm_run(g, packed);
			CHECK(memcmp(c, want, bytes) == 0, "%s %s: %s kernels on %d threads are not the definition's bits",
				  what, precision, path_names[path], threads);
		}
		memcpy(c, c0, bytes);
		osv_gemm_serial(g, scratch);
		CHECK(memcmp(c, want, bytes) == 0, "%s %s: %s kernels, serial, are not the definition's bits",
			  what, precision, path_names[path]);
		if (prepacked != NULL)
		{
			osv_gemm	gp = *g;

			if (g->int8)
			{
				gp.b_packed8_nr = osv_gemm_nr();
				osv_gemm_pack_weight_int8(g->b, g->n, g->k, gp.b_packed8_nr, prepacked);
				gp.b_packed8 = prepacked;
			}
			else
			{
				gp.b_packed16_nr = osv_gemm_nr();
				osv_gemm_pack_weight_bf16(g->b, g->n, g->k, gp.b_packed16_nr, prepacked);
				gp.b_packed16 = prepacked;
			}
			memcpy(c, c0, bytes);
			osv_gemm_run(&gp, packed);
			CHECK(memcmp(c, want, bytes) == 0,
				  "%s %s: %s kernels, weights packed in advance, are not the definition's bits",
				  what, precision, path_names[path]);
		}
	}
	osv_gemm_use_kernels(OSV_KERNELS_AUTO);
	free(prepacked);
}

/*
 * The bf16 products of g (on every path, thread count and entry point, and
 * from weights packed in advance when B is a weight) against the bits
 * written from the definition; and those bits against the float32
 * product: within the rounding of both operands to bf16 (each off by at
 * most 2^-8 of itself, so a term by 2^-7 + 2^-16; summed over the terms'
 * magnitudes) plus the float sum's own rounding.
 */
static void
check_bf16(osv_gemm g, const float *c0, float *want, float *c, float *packed, float *scratch,
		   const char *what)
{
	size_t		bytes = (size_t) g.m * g.ldc * sizeof(float);

	g.bf16 = true;
	memcpy(want, c0, bytes);
	expected_bits_bf16(&g, c0, want);
	check_every_path(&g, c0, want, c, packed, scratch, what);

	/* against the float32 product, before any epilogue */
	if (g.alpha == 1.0f && g.bias == NULL && !g.accumulate && g.post == OSV_POST_NONE)
		for (int i = 0; i < g.m; i++)
			for (int j = 0; j < g.n; j++)
			{
				double		exact = 0.0,
							magnitude = 0.0;

				for (int p = 0; p < g.k; p++)
				{
					double		t = (double) g.a[(size_t) i * g.lda + p] * b_at(&g, p, j);

					exact += t;
					magnitude += fabs(t);
				}
				CHECK(fabs(want[(size_t) i * g.ldc + j] - exact) <=
					  magnitude * (0x1p-7 + 0x1p-16 + g.k * 0x1p-24) + 1e-30,
					  "%s bf16: C[%d,%d] = %.9g, the float32 product %.9g: beyond bf16's rounding",
					  what, i, j, want[(size_t) i * g.ldc + j], exact);
			}
}

/* x quantized as gemm.h defines it: the value in [-127, 127], and the scale. */
static int
quantized(float x, float largest)
{
	float		factor = largest > 0.0f ? 127.0f / largest : 0.0f;
	float		v = x * factor;

	v = v < -127.0f ? -127.0f : v > 127.0f ? 127.0f : v;
	return (int) nearbyintf(v);
}

/*
 * The int8 product's expected bits, from the definition in gemm.h: each
 * row of A and column of B quantized with its own scale, the integer sum,
 * then the scales and the epilogue.
 */
static void
expected_bits_int8(const osv_gemm *g, const float *c_before, float *out, float *a_scale,
				   float *b_scale)
{
	float	   *a_largest = calloc((size_t) g->m, sizeof(float));
	float	   *b_largest = calloc((size_t) g->n, sizeof(float));

	for (int i = 0; i < g->m; i++)
		for (int p = 0; p < g->k; p++)
			a_largest[i] = fmaxf(a_largest[i], fabsf(g->a[(size_t) i * g->lda + p]));
	for (int j = 0; j < g->n; j++)
		for (int p = 0; p < g->k; p++)
			b_largest[j] = fmaxf(b_largest[j], fabsf(b_at(g, p, j)));
	for (int i = 0; i < g->m; i++)
	{
		a_scale[i] = a_largest[i] / 127.0f;
		for (int j = 0; j < g->n; j++)
		{
			long long	acc = 0;
			float		v;

			b_scale[j] = b_largest[j] / 127.0f;
			for (int p = 0; p < g->k; p++)
				acc += (long long) quantized(g->a[(size_t) i * g->lda + p], a_largest[i]) *
					quantized(b_at(g, p, j), b_largest[j]);
			v = (float) acc;
			v = v * a_scale[i];
			v = v * b_scale[j];
			if (g->alpha != 1.0f)
				v = v * g->alpha;
			if (g->bias != NULL)
				v = v + g->bias[j];
			if (g->accumulate)
				v = c_before[(size_t) i * g->ldc + j] + v;
			out[(size_t) i * g->ldc + j] = v;
		}
		apply_post(g, out + (size_t) i * g->ldc, g->n);
	}
	free(a_largest);
	free(b_largest);
}

/*
 * The int8 products of g on every path, thread count and entry point, and
 * from weights packed in advance, against the definition's bits; and those
 * against the float32 product: within the quantization's error (each
 * value off by at most half its scale) plus the float rounding.
 */
static void
check_int8(osv_gemm g, const float *c0, float *want, float *c, float *packed, float *scratch,
		   const char *what)
{
	size_t		bytes = (size_t) g.m * g.ldc * sizeof(float);
	float	   *a_scale = malloc((size_t) g.m * sizeof(float));
	float	   *b_scale = malloc((size_t) g.n * sizeof(float));

	g.int8 = true;
	memcpy(want, c0, bytes);
	expected_bits_int8(&g, c0, want, a_scale, b_scale);
	check_every_path(&g, c0, want, c, packed, scratch, what);

	if (g.alpha == 1.0f && g.bias == NULL && !g.accumulate && g.post == OSV_POST_NONE)
		for (int i = 0; i < g.m; i++)
			for (int j = 0; j < g.n; j++)
			{
				double		exact = 0.0,
							bound = 0.0;

				for (int p = 0; p < g.k; p++)
				{
					double		x = g.a[(size_t) i * g.lda + p],
								y = b_at(&g, p, j);

					exact += x * y;
					bound += 0.5 * a_scale[i] * fabs(y) + 0.5 * b_scale[j] * fabs(x) +
						0.25 * a_scale[i] * b_scale[j] + fabs(x * y) * 0x1p-21;
				}
				CHECK(fabs(want[(size_t) i * g.ldc + j] - exact) <= bound + 1e-30,
					  "%s int8: C[%d,%d] = %.9g, the float32 product %.9g: beyond the quantization's error %.3g",
					  what, i, j, want[(size_t) i * g.ldc + j], exact, bound);
			}
	free(a_scale);
	free(b_scale);
}

static void
check_shape(int m, int n, int k, bool nk, bool bias, bool accumulate, osv_gemm_post post,
			float alpha)
{
	size_t		lda = (size_t) k + 3,
				ldb = (nk ? (size_t) k : (size_t) n) + 5,
				ldc = (size_t) n + 7;
	float	   *a = malloc((size_t) m * lda * sizeof(float));
	float	   *b = malloc((nk ? (size_t) n : (size_t) k) * ldb * sizeof(float));
	float	   *bv = malloc((size_t) n * sizeof(float));
	float	   *c0 = malloc((size_t) m * ldc * sizeof(float));
	float	   *want = malloc((size_t) m * ldc * sizeof(float));
	float	   *c = malloc((size_t) m * ldc * sizeof(float));
	float	   *packed = malloc(osv_gemm_packed_a_floats(m, k) * sizeof(float));
	float	   *scratch = aligned_alloc(64, (osv_gemm_scratch_floats(m, k) * sizeof(float) + 63) / 64 * 64);
	osv_gemm	g = {
		.m = m,.n = n,.k = k,.a = a,.lda = lda,.b = b,.ldb = ldb,.b_is_nk = nk,
		.alpha = alpha,.bias = bias ? bv : NULL,.accumulate = accumulate,
		.c = c,.ldc = ldc,.post = post
	};
	osv_error	err;
	char		what[160];
	double		e;

	for (size_t i = 0; i < (size_t) m * lda; i++)
		a[i] = uniform();
	for (size_t i = 0; i < (nk ? (size_t) n : (size_t) k) * ldb; i++)
		b[i] = uniform();
	for (int i = 0; i < n; i++)
		bv[i] = uniform();
	for (size_t i = 0; i < (size_t) m * ldc; i++)
		c0[i] = uniform();
	memcpy(want, c0, (size_t) m * ldc * sizeof(float));
	expected_bits(&g, c0, want);
	snprintf(what, sizeof(what), "m=%d n=%d k=%d %s%s%s%s alpha=%g", m, n, k,
			 nk ? "[n,k]" : "[k,n]", bias ? " bias" : "", accumulate ? " accumulate" : "",
			 post == OSV_POST_GELU ? " gelu" : post == OSV_POST_QUICK_GELU ? " quick_gelu" : "",
			 alpha);

	for (int path = OSV_KERNELS_AVX512; path <= OSV_KERNELS_PORTABLE; path++)
	{
		if (!osv_gemm_use_kernels((osv_kernels) path))
			continue;
		for (int threads = 1; threads <= 3; threads++)
		{
			CHECK(osv_pool_prepare(threads, osv_gemm_scratch_floats(0, k) * sizeof(float), &err) == OSV_OK,
				  "pool: %s", err.message);
			memcpy(c, c0, (size_t) m * ldc * sizeof(float));
			osv_gemm_run(&g, packed);
			CHECK(memcmp(c, want, (size_t) m * ldc * sizeof(float)) == 0,
				  "%s: %s kernels on %d threads are not the fmaf chain's bits",
				  what, path_names[path], threads);
		}
		memcpy(c, c0, (size_t) m * ldc * sizeof(float));
		osv_gemm_serial(&g, scratch);
		CHECK(memcmp(c, want, (size_t) m * ldc * sizeof(float)) == 0,
			  "%s: %s kernels, serial, are not the fmaf chain's bits", what, path_names[path]);
	}
	osv_gemm_use_kernels(OSV_KERNELS_AUTO);

	e = error_vs_double(&g, c0, want);
	CHECK(e <= 1.0, "%s: %.3g times the rounding bound away from the double product", what, e);
	e = relative_vs_openblas(&g, c0, want);
	CHECK(e <= 1e-5, "%s: %.3g relative to OpenBLAS", what, e);
	check_bf16(g, c0, want, c, packed, scratch, what);
	check_int8(g, c0, want, c, packed, scratch, what);

	free(a);
	free(b);
	free(bv);
	free(c0);
	free(want);
	free(c);
	free(packed);
	free(scratch);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* vcvtneps2bf16 on 16 floats (CPUs with AVX512_BF16). */
__attribute__((target("avx512f,avx512bf16,avx512vl"))) static void
hardware_round(const float *x, uint16_t *out)
{
	__m256bh	r = _mm512_cvtneps_pbh(_mm512_loadu_ps(x));

	memcpy(out, &r, 32);
}
#endif

/* 32 random bits. */
static uint32_t
next_bits(void)
{
	rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
	return (uint32_t) (rng_state >> 32);
}

/* osv_bf16_round against the instruction it imitates, where the CPU has it. */
static void
check_rounding(void)
{
#if defined(__x86_64__) && defined(__GNUC__)
	static const uint32_t special[16] = {
		0x00000000, 0x80000000, 0x00000001, 0x807fffff, 0x00800000, 0x7f7fffff, 0x7f800000, 0xff800000,
		0x7fc00000, 0x7f800001, 0xffbfffff, 0x3f808000, 0x3f818000, 0x3f807fff, 0x3f808001, 0x7f7f8000
	};
	float		x[16];
	uint16_t	hw[16];
	int			checked = 0;

	__builtin_cpu_init();
	if (!__builtin_cpu_supports("avx512bf16"))
	{
		printf("bf16 rounding: this CPU has no vcvtneps2bf16 to compare with\n");
		return;
	}
	for (int round = 0; round < 20000; round++)
	{
		for (int i = 0; i < 16; i++)
		{
			uint32_t	u = round == 0 ? special[i] : next_bits();

			memcpy(&x[i], &u, 4);
		}
		hardware_round(x, hw);
		for (int i = 0; i < 16; i++, checked++)
			CHECK(osv_bf16_round(x[i]) == hw[i], "bf16 rounding of %a (bits %08x): %04x, the instruction %04x",
				  x[i], ((const uint32_t *) x)[i], osv_bf16_round(x[i]), hw[i]);
	}
	printf("bf16 rounding: %d values as vcvtneps2bf16 rounds them\n", checked);
#endif
}

int
main(void)
{
	static const int ms[] = {1, 5, 13, 14, 15, 29, 257};
	static const int ns[] = {1, 16, 17, 31, 32, 33, 64, 100};
	static const int ks[] = {1, 7, 16, 17, 64, 257};
	osv_error	err;
	int			shapes = 0;

	CHECK(osv_blas_load(&err) == OSV_OK, "OpenBLAS: %s", err.message);
	printf("kernels chosen for this CPU: %s\n", osv_gemm_kernels_name());
	check_rounding();
	for (size_t mi = 0; mi < sizeof(ms) / sizeof(ms[0]); mi++)
		for (size_t ni = 0; ni < sizeof(ns) / sizeof(ns[0]); ni++)
			for (size_t ki = 0; ki < sizeof(ks) / sizeof(ks[0]); ki++)
			{
				int			v = (int) (mi + ni + ki);

				check_shape(ms[mi], ns[ni], ks[ki], v % 2 == 0, v % 3 != 0, v % 4 < 2,
							v % 5 == 0 ? OSV_POST_GELU : v % 5 == 1 ? OSV_POST_QUICK_GELU : OSV_POST_NONE,
							v % 7 == 0 ? 0.125f : 1.0f);
				shapes++;
			}
	/* the model's own shapes, one of each kind */
	check_shape(257, 1024, 1024, true, true, true, OSV_POST_NONE, 1.0f);
	check_shape(4, 96, 4096, true, true, false, OSV_POST_GELU, 1.0f);
	check_shape(4, 96, 4096, true, true, false, OSV_POST_QUICK_GELU, 1.0f);
	check_shape(257, 257, 64, true, false, false, OSV_POST_NONE, 0.125f);
	check_shape(257, 64, 257, false, false, false, OSV_POST_NONE, 1.0f);
	printf("%d shapes on every kernel path this CPU runs, 1 to 3 threads and serial\n", shapes + 5);
	osv_pool_prepare(1, 0, &err);
	return check_summary("test_gemm");
}
