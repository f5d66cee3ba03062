/*
 * activation.h: the network's elementwise functions (exp for softmax, erf,
 * GELU and quick_gelu), as scalar definitions and as AVX-512 forms that
 * compute the very same bits 16 lanes at a time.
 *
 * The scalar functions are the definition: branch-free polynomials of our
 * own (libm's cannot be vectorized), each operation written out so that,
 * with the core's -ffp-contract=off, every compiler and every instruction
 * set rounds the same operations in the same order.  Each AVX-512 form
 * repeats its scalar function operation for operation (a multiply, then an
 * add: never a fused one; each select with the comparison that keeps the
 * scalar's NaN behaviour), so the products' epilogue (gemm.c) and the
 * network's steps (network.c) may use either and results do not depend on
 * the CPU.  test_kernels checks scalar against vector over dense sweeps of
 * bit patterns, and the scalar ones against libm.
 */
#ifndef OSV5M_ACTIVATION_H
#define OSV5M_ACTIVATION_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/*
 * exp(x) for x <= 0, within about 1 ulp of expf; 0 below -87.33 (results that
 * would be subnormal are flushed: they only ever weigh nothing in a softmax).
 */
static inline float
osv_exp_nonpos(float x)
{
	/* 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits */
	const float shifter = 12582912.0f;
	/*
	 * Clamp to [-87.33, 0], written so that a NaN (from non-finite weights
	 * or inputs) also lands on -87.33: the int conversion below is
	 * undefined behaviour for NaN and for values out of range.
	 */
	float		xc = x >= -87.33f ? (x <= 0.0f ? x : 0.0f) : -87.33f;
	float		n,
				r,
				p,
				scale;
	int32_t		bits;

	n = (xc * 1.44269504f + shifter) - shifter;
	/* Cody-Waite: ln 2 split so that n * ln2_hi is exact */
	r = xc - n * 0.693145752f;
	r = r - n * 1.42860677e-06f;
	/* degree 6 fit of e^r on [-ln2/2, ln2/2], relative error 1.9e-9 */
	p = 1.38294206e-03f;
	p = p * r + 8.37477152e-03f;
	p = p * r + 4.16683580e-02f;
	p = p * r + 1.66664208e-01f;
	p = p * r + 4.99999915e-01f;
	p = p * r + 1.00000004e+00f;
	p = p * r + 1.00000000e+00f;
	/* 2^n built in the exponent field; n is in [-126, 0] after the clamp */
	bits = ((int32_t) n + 127) << 23;
	memcpy(&scale, &bits, sizeof(scale));
	return x < -87.33f ? 0.0f : p * scale;
}

/*
 * erf(x) within about 1 ulp of erff.  |x| < 1: x P(x^2); 1 <= |x| < 3.92:
 * 1 - exp(-x^2) Q(|x|), Q fitted for the absolute error of erfc (what the
 * ulp of a result in [0.84, 1) needs); beyond, erf rounds to +-1 in float.
 */
static inline float
osv_erf(float x)
{
	float		a = fabsf(x);
	float		a2 = a * a;
	float		small,
				large,
				u,
				q,
				y;

	/*
	 * degree 6 fit of erf(x)/x in x^2 on [0, 1], relative error 1.4e-9,
	 * written a + a R(a^2) so that the rounding errors of the polynomial
	 * fall on the correction (an eighth of the result), not on the result
	 */
	small = 7.89821012e-05f;
	small = small * a2 - 8.02435410e-04f;
	small = small * a2 + 5.19005357e-03f;
	small = small * a2 - 2.68548085e-02f;
	small = small * a2 + 1.12836124e-01f;
	small = small * a2 - 3.76126288e-01f;
	small = small * a2 + 1.28379166e-01f;
	small = a + a * small;

	/* degree 8 fit of erfc(a) e^(a^2) in a - 2.465 on [1, 3.93] */
	u = (a < 3.93f ? a : 3.93f) - 2.465f;
	q = 1.023991777e-04f;
	q = q * u + 1.709980597e-04f;
	q = q * u + 4.427013177e-04f;
	q = q * u - 8.117862175e-04f;
	q = q * u + 2.422573772e-03f;
	q = q * u - 8.448788772e-03f;
	q = q * u + 2.579378928e-02f;
	q = q * u - 7.611552179e-02f;
	q = q * u + 2.134403576e-01f;
	large = 1.0f - osv_exp_nonpos(-(a < 3.93f ? a2 : 15.4449f)) * q;

	y = a < 1.0f ? small : (a < 3.92f ? large : 1.0f);
	return x < 0.0f ? -y : y;
}

/* Exact GELU, 0.5 x (1 + erf(x / sqrt 2)), in PyTorch's order of operations. */
static inline float
osv_gelu(float x)
{
	return x * 0.5f * (1.0f + osv_erf(x * 0.70710678f));
}

/* quick_gelu, x sigmoid(1.702 x); exp only of non-positive arguments. */
static inline float
osv_quick_gelu(float x)
{
	float		z = 1.702f * x;
	float		e = osv_exp_nonpos(-fabsf(z));
	float		sig = z >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);

	return x * sig;
}

/* ---- the AVX-512 forms --------------------------------------------------- */

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define OSV_HAVE_AVX512_ACTIVATION 1
#define OSV_AVX512_INLINE static inline __attribute__((always_inline, target("avx512f")))

/* Constants and the two operations the polynomials repeat. */
#define OSV_V(c) _mm512_set1_ps(c)
#define OSV_MUL_ADD(p, r, c) _mm512_add_ps(_mm512_mul_ps(p, r), OSV_V(c))
#define OSV_MUL_SUB(p, r, c) _mm512_sub_ps(_mm512_mul_ps(p, r), OSV_V(c))

/* lanes where a op b holds, the ordered (false for NaN) comparisons C uses */
#define OSV_LT(a, b) _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ)
#define OSV_LE(a, b) _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ)
#define OSV_GE(a, b) _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ)

/* |x| and -x: the sign bit cleared or flipped, as fabsf and unary minus do. */
OSV_AVX512_INLINE __m512
osv_abs16(__m512 x)
{
	return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x),
												_mm512_set1_epi32(0x7fffffff)));
}

OSV_AVX512_INLINE __m512
osv_neg16(__m512 x)
{
	return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x),
												_mm512_set1_epi32((int) 0x80000000u)));
}

/* osv_exp_nonpos of 16 lanes. */
OSV_AVX512_INLINE __m512
osv_exp_nonpos16(__m512 x)
{
	const __m512 shifter = OSV_V(12582912.0f);
	const __m512 lowest = OSV_V(-87.33f);
	__m512		xc = _mm512_mask_blend_ps(OSV_GE(x, lowest), lowest,
										  _mm512_maskz_mov_ps(OSV_LE(x, _mm512_setzero_ps()), x));
	__m512		n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(xc, OSV_V(1.44269504f)), shifter),
								  shifter);
	__m512		r = _mm512_sub_ps(xc, _mm512_mul_ps(n, OSV_V(0.693145752f)));
	__m512		p = OSV_V(1.38294206e-03f);
	__m512i		bits;

	r = _mm512_sub_ps(r, _mm512_mul_ps(n, OSV_V(1.42860677e-06f)));
	p = OSV_MUL_ADD(p, r, 8.37477152e-03f);
	p = OSV_MUL_ADD(p, r, 4.16683580e-02f);
	p = OSV_MUL_ADD(p, r, 1.66664208e-01f);
	p = OSV_MUL_ADD(p, r, 4.99999915e-01f);
	p = OSV_MUL_ADD(p, r, 1.00000004e+00f);
	p = OSV_MUL_ADD(p, r, 1.00000000e+00f);
	bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
	return _mm512_maskz_mov_ps((__mmask16) ~OSV_LT(x, lowest),
							   _mm512_mul_ps(p, _mm512_castsi512_ps(bits)));
}

/* osv_erf of 16 lanes. */
OSV_AVX512_INLINE __m512
osv_erf16(__m512 x)
{
	__m512		a = osv_abs16(x);
	__m512		a2 = _mm512_mul_ps(a, a);
	__m512		small = OSV_V(7.89821012e-05f);
	__m512		u,
				q,
				large,
				y;
	__mmask16	below_cap = OSV_LT(a, OSV_V(3.93f));

	small = OSV_MUL_SUB(small, a2, 8.02435410e-04f);
	small = OSV_MUL_ADD(small, a2, 5.19005357e-03f);
	small = OSV_MUL_SUB(small, a2, 2.68548085e-02f);
	small = OSV_MUL_ADD(small, a2, 1.12836124e-01f);
	small = OSV_MUL_SUB(small, a2, 3.76126288e-01f);
	small = OSV_MUL_ADD(small, a2, 1.28379166e-01f);
	small = _mm512_add_ps(a, _mm512_mul_ps(a, small));

	u = _mm512_sub_ps(_mm512_mask_blend_ps(below_cap, OSV_V(3.93f), a), OSV_V(2.465f));
	q = OSV_V(1.023991777e-04f);
	q = OSV_MUL_ADD(q, u, 1.709980597e-04f);
	q = OSV_MUL_ADD(q, u, 4.427013177e-04f);
	q = OSV_MUL_SUB(q, u, 8.117862175e-04f);
	q = OSV_MUL_ADD(q, u, 2.422573772e-03f);
	q = OSV_MUL_SUB(q, u, 8.448788772e-03f);
	q = OSV_MUL_ADD(q, u, 2.579378928e-02f);
	q = OSV_MUL_SUB(q, u, 7.611552179e-02f);
	q = OSV_MUL_ADD(q, u, 2.134403576e-01f);
	large = _mm512_sub_ps(OSV_V(1.0f),
						  _mm512_mul_ps(osv_exp_nonpos16(osv_neg16(_mm512_mask_blend_ps(below_cap, OSV_V(15.4449f), a2))),
										q));

	y = _mm512_mask_blend_ps(OSV_LT(a, OSV_V(3.92f)), OSV_V(1.0f), large);
	y = _mm512_mask_blend_ps(OSV_LT(a, OSV_V(1.0f)), y, small);
	return _mm512_mask_blend_ps(OSV_LT(x, _mm512_setzero_ps()), y, osv_neg16(y));
}

/* osv_gelu of 16 lanes. */
OSV_AVX512_INLINE __m512
osv_gelu16(__m512 x)
{
	return _mm512_mul_ps(_mm512_mul_ps(x, OSV_V(0.5f)),
						 _mm512_add_ps(OSV_V(1.0f), osv_erf16(_mm512_mul_ps(x, OSV_V(0.70710678f)))));
}

/* osv_quick_gelu of 16 lanes. */
OSV_AVX512_INLINE __m512
osv_quick_gelu16(__m512 x)
{
	__m512		z = _mm512_mul_ps(OSV_V(1.702f), x);
	__m512		e = osv_exp_nonpos16(osv_neg16(osv_abs16(z)));
	__m512		d = _mm512_add_ps(OSV_V(1.0f), e);
	__m512		sig = _mm512_mask_blend_ps(OSV_GE(z, _mm512_setzero_ps()), _mm512_div_ps(e, d),
										   _mm512_div_ps(OSV_V(1.0f), d));

	return _mm512_mul_ps(x, sig);
}
#endif

#endif							/* OSV5M_ACTIVATION_H */
