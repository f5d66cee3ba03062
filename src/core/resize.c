/*
 * resize.c: PIL's bicubic Image.resize for 8-bit RGB, and the model's test
 * transform (torchvision Resize(S, BICUBIC) on a PIL image, CenterCrop(S),
 * ToTensor, Normalize) built on it.
 *
 * The resampler reproduces Pillow 9.4's ImagingResample bit for bit:
 *  - separable, the horizontal pass first (only when the width changes),
 *    then the vertical pass (only when the height changes), with the 8-bit
 *    result rounded and clipped in between;
 *  - the bicubic kernel with a = -0.5, its support widened by the
 *    downscale factor (antialiasing), evaluated in double precision and
 *    normalised to sum 1 over each output pixel's source window;
 *  - coefficients in fixed point with 22 fractional bits (Pillow's
 *    PRECISION_BITS = 32 - 8 - 2), rounded half away from zero, and pixel
 *    sums that start at one half and are clipped to 0..255.
 * Each output pixel depends only on its own coefficients, so a window of
 * the resized image (the center crop) can be computed without the rest:
 * osv_preprocess never materialises the full resized image, which for a
 * 10000 x 1 photo would be 2240000 x 224 pixels.
 *
 * Invariant: every buffer is malloc'ed with overflow-checked sizes and freed
 * on every path; nothing here can longjmp.
 */
#include "internal.h"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Pillow: 8 bits of result, 2 bits of headroom for the kernel's lobes. */
#define PRECISION_BITS (32 - 8 - 2)

/* Bicubic support in source pixels at scale 1. */
#define BICUBIC_SUPPORT 2.0

/*
 * Force x to be rounded to double here.  Pillow is compiled without FMA, and
 * a fused multiply-add (which -march=native lets the compiler form from a
 * product followed by a sum) rounds once instead of twice: a coefficient
 * one ulp off can move a pixel across a rounding boundary.
 */
static inline double
no_fma(double x)
{
	__asm__("" : "+m"(x));
	return x;
}

/* Keys' cubic convolution kernel with a = -0.5, as Pillow evaluates it. */
static double
bicubic(double x)
{
	double		p;

	if (x < 0.0)
		x = -x;
	if (x < 1.0)
	{
		/* ((a + 2) x - (a + 3)) x x + 1 */
		p = no_fma(1.5 * x) - 2.5;
		p = no_fma(p * x);
		p = no_fma(p * x);
		return p + 1.0;
	}
	if (x < 2.0)
	{
		/* (((x - 5) x + 8) x - 4) a */
		p = x - 5.0;
		p = no_fma(p * x) + 8.0;
		p = no_fma(p * x) - 4.0;
		/* the caller adds the result up: no fusing there either */
		return no_fma(p * -0.5);
	}
	return 0.0;
}

/* The fixed-point coefficients of one pass, for output indices first.. */
typedef struct resample_plan
{
	int			count;			/* output pixels planned */
	int			ksize;			/* coefficients stored per output pixel */
	int		   *start;			/* [count] first source pixel */
	int		   *taps;			/* [count] source pixels used */
	int32_t    *coeffs;			/* [count * ksize] */
} resample_plan;

static void
plan_free(resample_plan *plan)
{
	free(plan->start);
	free(plan->taps);
	free(plan->coeffs);
	memset(plan, 0, sizeof(*plan));
}

/*
 * Pillow's precompute_coeffs + normalize_coeffs_8bpc for resizing in_size
 * pixels to out_size, restricted to output pixels [first, first + count).
 */
static osv_status
plan_pass(int in_size, int out_size, int first, int count,
		  resample_plan *plan, osv_error *err)
{
	/* Pillow takes the input extent from a float box: (float) in_size */
	double		scale = (double) (float) in_size / out_size;
	double		filterscale = scale < 1.0 ? 1.0 : scale;
	double		support = BICUBIC_SUPPORT * filterscale;
	double		ss = 1.0 / filterscale;
	double	   *k = NULL;
	size_t		ncoeffs;
	int			ksize;

	memset(plan, 0, sizeof(*plan));
	/* support <= 2 * in_size, so ksize fits an int for any int in_size */
	ksize = (int) ceil(support) * 2 + 1;
	if (!osv_mul_size((size_t) count, (size_t) ksize, &ncoeffs) ||
		!osv_mul_size(ncoeffs, sizeof(int32_t), &ncoeffs))
		return osv_fail(err, OSV_ERR_LIMIT,
						"resampling %d to %d pixels needs too many coefficients",
						in_size, out_size);
	plan->count = count;
	plan->ksize = ksize;
	plan->start = malloc(sizeof(int) * (size_t) count);
	plan->taps = malloc(sizeof(int) * (size_t) count);
	plan->coeffs = malloc(ncoeffs);
	k = malloc(sizeof(double) * (size_t) ksize);
	if (plan->start == NULL || plan->taps == NULL || plan->coeffs == NULL ||
		k == NULL)
	{
		free(k);
		plan_free(plan);
		return osv_fail(err, OSV_ERR_NOMEM,
						"out of memory planning a resize from %d to %d pixels",
						in_size, out_size);
	}

	for (int i = 0; i < count; i++)
	{
		int			xx = first + i;
		/* the box starts at 0, so Pillow's in0 + adds nothing */
		double		center = no_fma((xx + 0.5) * scale);
		double		ww = 0.0;
		int			xmin,
					xmax;
		int32_t    *kk = plan->coeffs + (size_t) i * ksize;

		/* (int) truncates toward zero, as in Pillow, then clamps */
		xmin = (int) (center - support + 0.5);
		if (xmin < 0)
			xmin = 0;
		xmax = (int) (center + support + 0.5);
		if (xmax > in_size)
			xmax = in_size;
		xmax -= xmin;

		for (int x = 0; x < xmax; x++)
		{
			double		w = bicubic(no_fma((x + xmin - center + 0.5) * ss));

			k[x] = w;
			ww += w;
		}
		for (int x = 0; x < xmax; x++)
		{
			double		v = ww != 0.0 ? k[x] / ww : k[x];

			/* round half away from zero; the product by 2^22 is exact */
			if (v < 0)
				kk[x] = (int32_t) (-0.5 + v * (1 << PRECISION_BITS));
			else
				kk[x] = (int32_t) (0.5 + v * (1 << PRECISION_BITS));
		}
		for (int x = xmax; x < ksize; x++)
			kk[x] = 0;
		plan->start[i] = xmin;
		plan->taps[i] = xmax;
	}
	free(k);
	return OSV_OK;
}

/* A fixed-point sum back to 8 bits: Pillow's clip8. */
static inline uint8_t
clip8(int32_t ss)
{
	/* a negative sum is below 0 after the shift; avoid shifting it */
	if (ss < 0)
		return 0;
	ss >>= PRECISION_BITS;
	return ss > 255 ? 255 : (uint8_t) ss;
}

/* An RGB image view: rows of stride bytes, 3 bytes per pixel. */
typedef struct rgb_view
{
	const uint8_t *data;
	size_t		stride;
} rgb_view;

/* Horizontal pass: rows [0, rows) of src into dst (plan->count wide). */
static void
pass_horizontal(rgb_view src, int rows, const resample_plan *plan, uint8_t *dst)
{
	for (int y = 0; y < rows; y++)
	{
		const uint8_t *in = src.data + (size_t) y * src.stride;
		uint8_t    *o = dst + (size_t) y * plan->count * 3;

		for (int i = 0; i < plan->count; i++)
		{
			const int32_t *k = plan->coeffs + (size_t) i * plan->ksize;
			const uint8_t *p = in + (size_t) plan->start[i] * 3;
			int32_t		s0 = 1 << (PRECISION_BITS - 1);
			int32_t		s1 = s0,
						s2 = s0;

			for (int x = 0; x < plan->taps[i]; x++, p += 3)
			{
				s0 += p[0] * k[x];
				s1 += p[1] * k[x];
				s2 += p[2] * k[x];
			}
			o[3 * i] = clip8(s0);
			o[3 * i + 1] = clip8(s1);
			o[3 * i + 2] = clip8(s2);
		}
	}
}

/*
 * Vertical pass: src row plan->start[i] - row0 is the first input of output
 * row i; width pixels per row.
 */
static void
pass_vertical(rgb_view src, int row0, int width, const resample_plan *plan,
			  uint8_t *dst)
{
	for (int i = 0; i < plan->count; i++)
	{
		const int32_t *k = plan->coeffs + (size_t) i * plan->ksize;
		const uint8_t *top = src.data + (size_t) (plan->start[i] - row0) * src.stride;
		uint8_t    *o = dst + (size_t) i * width * 3;

		for (int c = 0; c < width * 3; c++)
		{
			int32_t		s = 1 << (PRECISION_BITS - 1);
			const uint8_t *p = top + c;

			for (int y = 0; y < plan->taps[i]; y++, p += src.stride)
				s += *p * k[y];
			o[c] = clip8(s);
		}
	}
}

/*
 * The window [x0, x0 + cw) x [y0, y0 + ch) of PIL's bicubic resize of src
 * to out_w x out_h, written to dst (cw x ch RGB, rows packed).
 */
static osv_status
resize_window(const osv_image *src, int out_w, int out_h, int x0, int y0,
			  int cw, int ch, uint8_t *dst, osv_error *err)
{
	bool		need_h = out_w != src->width;
	bool		need_v = out_h != src->height;
	resample_plan ph,
				pv;
	rgb_view	in = {src->rgb, (size_t) src->width * 3};
	rgb_view	mid;
	uint8_t    *tmp = NULL;
	int			row0,
				row1;
	osv_status	status;

	memset(&ph, 0, sizeof(ph));
	memset(&pv, 0, sizeof(pv));

	/* the source rows the vertical pass will read */
	if (need_v)
	{
		status = plan_pass(src->height, out_h, y0, ch, &pv, err);
		if (status != OSV_OK)
			return status;
		row0 = pv.start[0];
		row1 = pv.start[ch - 1] + pv.taps[ch - 1];
	}
	else
	{
		row0 = y0;
		row1 = y0 + ch;
	}

	if (need_h)
	{
		size_t		n;

		status = plan_pass(src->width, out_w, x0, cw, &ph, err);
		if (status != OSV_OK)
			goto done;
		if (!osv_mul_size((size_t) cw * 3, (size_t) (row1 - row0), &n) ||
			(tmp = malloc(n > 0 ? n : 1)) == NULL)
		{
			status = osv_fail(err, OSV_ERR_NOMEM,
							  "out of memory resizing a %dx%d image to %dx%d",
							  src->width, src->height, out_w, out_h);
			goto done;
		}
		in.data = src->rgb + (size_t) row0 * in.stride;
		pass_horizontal(in, row1 - row0, &ph, tmp);
		mid.data = tmp;
		mid.stride = (size_t) cw * 3;
	}
	else
	{
		/* the width is unchanged: read the source columns in place */
		mid.data = src->rgb + (size_t) row0 * in.stride + (size_t) x0 * 3;
		mid.stride = in.stride;
	}

	if (need_v)
		pass_vertical(mid, row0, cw, &pv, dst);
	else
	{
		for (int y = 0; y < ch; y++)
			memcpy(dst + (size_t) y * cw * 3, mid.data + (size_t) y * mid.stride,
				   (size_t) cw * 3);
	}
	status = OSV_OK;

done:
	free(tmp);
	plan_free(&ph);
	plan_free(&pv);
	return status;
}

/* Check that image is a usable RGB image. */
static osv_status
check_image(const osv_image *image, const char *fn, osv_error *err)
{
	if (image == NULL || image->rgb == NULL || image->width <= 0 ||
		image->height <= 0)
		return osv_fail(err, OSV_ERR_ARGUMENT, "%s: empty image", fn);
	return OSV_OK;
}

osv_status
osv_image_resize(const osv_image *src, int width, int height,
				 osv_image *out, osv_error *err)
{
	osv_status	status;
	size_t		n;

	if (out == NULL)
		return osv_fail(err, OSV_ERR_ARGUMENT, "osv_image_resize: null output");
	memset(out, 0, sizeof(*out));
	status = check_image(src, "osv_image_resize", err);
	if (status != OSV_OK)
		return status;
	if (width <= 0 || height <= 0)
		return osv_fail(err, OSV_ERR_ARGUMENT,
						"osv_image_resize: invalid size %dx%d", width, height);
	if (!osv_mul_size((size_t) width, (size_t) height, &n) ||
		!osv_mul_size(n, 3, &n))
		return osv_fail(err, OSV_ERR_LIMIT, "resized image %dx%d is too large",
						width, height);
	out->rgb = malloc(n);
	if (out->rgb == NULL)
		return osv_fail(err, OSV_ERR_NOMEM,
						"out of memory for a %dx%d resized image", width, height);

	/* same size: Pillow returns a copy */
	status = resize_window(src, width, height, 0, 0, width, height, out->rgb, err);
	if (status != OSV_OK)
	{
		osv_image_free(out);
		return status;
	}
	out->width = width;
	out->height = height;
	return OSV_OK;
}

/* Python's round(d / 2.0) for d >= 0: halves go to the even neighbour. */
static int
half_round_even(int d)
{
	int			q = d / 2;

	if (d % 2 == 0)
		return q;
	return q % 2 == 0 ? q : q + 1;
}

osv_status
osv_preprocess(const osv_image *image, int size, const float mean[3],
			   const float std[3], float *out, osv_error *err)
{
	int			w,
				h,
				new_w,
				new_h,
				shorter,
				longer,
				top,
				left;
	double		new_long;
	size_t		plane,
				bytes;
	uint8_t    *crop;
	osv_status	status;

	status = check_image(image, "osv_preprocess", err);
	if (status != OSV_OK)
		return status;
	if (size <= 0 || mean == NULL || std == NULL || out == NULL)
		return osv_fail(err, OSV_ERR_ARGUMENT, "osv_preprocess: invalid arguments");
	if (!osv_mul_size((size_t) size, (size_t) size, &plane) ||
		!osv_mul_size(plane, 3, &bytes))
		return osv_fail(err, OSV_ERR_LIMIT, "preprocess size %d is too large", size);

	/*
	 * torchvision's rule: the shorter side becomes size, the longer
	 * int(size * long / short), a true division of exact integers (so the
	 * same double as Python's) then truncated.
	 */
	w = image->width;
	h = image->height;
	shorter = w <= h ? w : h;
	longer = w <= h ? h : w;
	new_long = floor((double) ((int64_t) size * longer) / shorter);
	if (new_long > INT_MAX)
		return osv_fail(err, OSV_ERR_LIMIT,
						"image %dx%d is too elongated to resize its shorter side to %d",
						w, h, size);
	new_w = w <= h ? size : (int) new_long;
	new_h = w <= h ? (int) new_long : size;

	/* CenterCrop: the resized image is never smaller than size x size */
	top = half_round_even(new_h - size);
	left = half_round_even(new_w - size);

	crop = malloc(bytes);
	if (crop == NULL)
		return osv_fail(err, OSV_ERR_NOMEM, "out of memory preprocessing an image");
	status = resize_window(image, new_w, new_h, left, top, size, size, crop, err);
	if (status != OSV_OK)
	{
		free(crop);
		return status;
	}

	/* ToTensor then Normalize, both in float32 as torch computes them */
	for (int c = 0; c < 3; c++)
	{
		float	   *o = out + (size_t) c * plane;

		for (size_t i = 0; i < plane; i++)
			o[i] = ((float) crop[3 * i + c] / 255.0f - mean[c]) / std[c];
	}
	free(crop);
	return OSV_OK;
}
