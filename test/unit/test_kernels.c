/*
 * test_kernels.c: accuracy of the network's own vectorizable erf and exp
 * (network.c) over dense sweeps of float bit patterns, against libm's
 * double-precision erf and exp (the correctly rounded value within a
 * fraction of an ulp).  Errors are measured in ulps of the float result.
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
	return check_summary("test_kernels");
}
