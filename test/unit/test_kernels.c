/*
 * test_kernels.c: accuracy of the network's own vectorizable erf and exp
 * (network.c) over dense sweeps of float bit patterns, against libm's
 * double-precision erf and exp (the correctly rounded value within a
 * fraction of an ulp).  Errors are measured in ulps of the float result.
 * And the AVX-512 forms of exp, erf, GELU and quick_gelu (activation.h),
 * which the products' epilogue and the network use on AVX-512 CPUs,
 * against the scalar definitions: the same bits for every float, NaNs,
 * infinities and subnormals included (every 61st bit pattern, 70 million).
 */
#include "network.h"

#include "check.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Sweep size: one bit pattern in STRIDE, about 10M evaluations per sweep. */
#define STRIDE 97
#define CHUNK 4096

/* The ulp of float y: the gap to the next float away from zero. */
static double
ulp_of(double y)
{
	float		f = (float) fabs(y);

	if (f == 0.0f)
		return ldexp(1.0, -149);
	return (double) nextafterf(f, INFINITY) - (double) f;
}

/* Max error in ulps of fn over floats with bits in [lo, hi), and its argument. */
static double
sweep(void (*fn) (float *, const float *, size_t), double (*ref) (double),
	  uint32_t lo, uint32_t hi, bool negate, float *worst_x)
{
	float	   *x = malloc(CHUNK * sizeof(float));
	float	   *y = malloc(CHUNK * sizeof(float));
	double		worst = 0.0;
	uint64_t	bits = lo;

	while (bits < hi)
	{
		size_t		n = 0;

		for (; n < CHUNK && bits < hi; n++, bits += STRIDE)
		{
			uint32_t	b = (uint32_t) bits;

			memcpy(&x[n], &b, sizeof(float));
			if (negate)
				x[n] = -x[n];
		}
		fn(y, x, n);
		for (size_t i = 0; i < n; i++)
		{
			double		exact = ref((double) x[i]);
			double		e = fabs((double) y[i] - exact) / ulp_of(exact);

			if (e > worst)
			{
				worst = e;
				*worst_x = x[i];
			}
		}
	}
	free(x);
	free(y);
	return worst;
}

/* Of the floats with bit patterns 0, 61, 122, ... (*tested of them), those where the AVX-512 form of fn differs from the scalar. */
static long
vector_mismatches(int fn, float *first, long *tested)
{
	enum
	{
		BATCH = 1 << 16
	};
	float	   *x = malloc(BATCH * sizeof(float));
	float	   *scalar = malloc(BATCH * sizeof(float));
	float	   *vector = malloc(BATCH * sizeof(float));
	long		bad = 0;
	uint64_t	bits = 0;

	*tested = 0;
	while (bits <= UINT32_MAX)
	{
		for (int i = 0; i < BATCH; i++)
		{
			uint32_t	b = (uint32_t) bits;

			memcpy(&x[i], &b, sizeof(float));
			/* the last batch is padded with the last pattern */
			if (bits + 61 <= UINT32_MAX)
				bits += 61;
			else if (i == BATCH - 1)
				bits = (uint64_t) UINT32_MAX + 1;
		}
		*tested += BATCH;
		osv_vec_scalar(fn, scalar, x, BATCH);
		osv_vec_avx512(fn, vector, x, BATCH);
		for (int i = 0; i < BATCH; i++)
			if (memcmp(&scalar[i], &vector[i], sizeof(float)) != 0 && bad++ == 0)
				*first = x[i];
	}
	free(x);
	free(scalar);
	free(vector);
	return bad;
}

int
main(void)
{
	float		wx = 0.0f;
	float		x[8] = {0.0f, -0.0f, 1e-30f, -3.0f, 3.95f, 10.0f, -100.0f, INFINITY};
	float		y[8];
	double		e;
	uint32_t	four,
				minus90;

	memcpy(&four, &(float) {4.5f}, sizeof(four));
	memcpy(&minus90, &(float) {87.3f}, sizeof(minus90));

	/* erf over [0, 4.5] and [-4.5, 0]: all floats of interest to GELU */
	e = sweep(osv_vec_erf, erf, 0, four, false, &wx);
	printf("erf max error %.3f ulp at %.9g\n", e, wx);
	CHECK(e <= 2.0, "erf error %.3f ulp at %.9g", e, wx);
	e = sweep(osv_vec_erf, erf, 0, four, true, &wx);
	CHECK(e <= 2.0, "erf error %.3f ulp at %.9g", e, wx);

	osv_vec_erf(y, x, 8);
	CHECK(y[0] == 0.0f && y[1] == 0.0f, "erf(+-0) = %g, %g", y[0], y[1]);
	CHECK(y[3] == erff(-3.0f) || fabsf(y[3] - erff(-3.0f)) <= 6e-8f, "erf(-3) = %.9g", y[3]);
	CHECK(y[4] == 1.0f && y[5] == 1.0f && y[6] == -1.0f && y[7] == 1.0f,
		  "erf tails %g %g %g %g", y[4], y[5], y[6], y[7]);

	/* exp over [-87.3, 0] (the softmax and erf domain) */
	e = sweep(osv_vec_exp, exp, 0, minus90, true, &wx);
	printf("exp max error %.3f ulp at %.9g\n", e, wx);
	CHECK(e <= 2.0, "exp error %.3f ulp at %.9g", e, wx);
	{
		float		xe[4] = {0.0f, -88.0f, -1000.0f, -INFINITY};

		osv_vec_exp(y, xe, 4);
		CHECK(y[0] == 1.0f && y[1] == 0.0f && y[2] == 0.0f && y[3] == 0.0f,
			  "exp edges %g %g %g %g", y[0], y[1], y[2], y[3]);
	}

	/* the AVX-512 forms against the scalar definitions */
	{
		static const char *const names[] = {"exp", "erf", "gelu", "quick_gelu"};
		float		probe[16] = {0},
					out[16];

		if (!osv_vec_avx512(0, out, probe, 16))
			printf("no AVX-512 on this CPU: the vector forms are not run\n");
		else
			for (int fn = 0; fn < 4; fn++)
			{
				float		first = 0.0f;
				long		tested;
				long		bad = vector_mismatches(fn, &first, &tested);

				printf("%s: AVX-512 form and scalar definition on %ld floats, %ld differ\n",
					   names[fn], tested, bad);
				CHECK(bad == 0, "%s: the AVX-512 form differs from the scalar on %ld floats, first %.9g",
					  names[fn], bad, first);
			}
	}
	return check_summary("test_kernels");
}
