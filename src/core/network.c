/*
 * network.c: the forward pass of the OSV-5M baseline model (docs/MODEL.md
 * section 4): the CLIP ViT backbone, the two MLPCentroid branches and the
 * hybrid quadtree head, on the run state of one osv_context, for one or
 * several images at once (a batch: see block_forward).
 *
 * Every matrix product goes through osv_sgemm / osv_sgemv (OpenBLAS),
 * row-major, with the PyTorch [out, in] weights used transposed.  Biases are
 * folded into the products: the output is pre-filled with the bias rows (or
 * the bias is added to the residual stream) and the product accumulates
 * onto it with beta = 1, so no extra pass over the activations is needed.
 *
 * The remaining elementwise work (layer norm, GELU, softmax) runs on one
 * thread while OpenBLAS uses all of them, so it is written to be
 * auto-vectorized: reductions go through LANES independent accumulators
 * (a float sum may not be reordered by the compiler otherwise), and erf and
 * exp are our own branch-free polynomials instead of libm calls, which
 * cannot be vectorized and would cost as much as several transformer blocks.
 *
 * Invariants: the context's buffers were sized by osv_context_new_batch for
 * this model and at least as many images as a run is given; nothing here
 * allocates; a run either completes or stops before a block (abort)
 * leaving has_result false.  An image's result does not depend on the
 * thread count, nor on the other images of its batch except through the
 * row count of the matrix products.  OpenBLAS's AVX-512 kernels sum every
 * output in the same order whatever the row count at ViT-L/14's sizes, so
 * there a batched result is bit for bit the single one
 * (test/bench/batch_bench.py); its small-matrix kernels (the tiny test
 * models) and its AVX2 kernels do not, and there results are float32
 * rounding apart (test_fidelity).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE				/* qsort_r */
#endif
#include "network.h"

#include "blas.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Independent accumulators of the vectorizable reductions (one AVX-512 register). */
#define LANES 16

/* eps of the MLPCentroid LayerNorm and GroupNorm: PyTorch's default. */
#define MID_EPS 1e-5f

/* ---- elementary functions ---------------------------------------------- */

/*
 * exp(x) for x <= 0, within about 1 ulp of expf; 0 below -87.33 (results that
 * would be subnormal are flushed: they only ever weigh nothing in a softmax).
 * Branch-free so that loops over it vectorize.
 */
static inline float
exp_nonpos(float x)
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
 * erf(x) within about 1 ulp of erff, branch-free.  |x| < 1: x P(x^2);
 * 1 <= |x| < 3.92: 1 - exp(-x^2) Q(|x|), Q fitted for the absolute error of
 * erfc (what the ulp of a result in [0.84, 1) needs); beyond, erf rounds
 * to +-1 in float.
 */
static inline float
erf_approx(float x)
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
	large = 1.0f - exp_nonpos(-(a < 3.93f ? a2 : 15.4449f)) * q;

	y = a < 1.0f ? small : (a < 3.92f ? large : 1.0f);
	return x < 0.0f ? -y : y;
}

/* Exact GELU, 0.5 x (1 + erf(x / sqrt 2)), in PyTorch's order of operations. */
static inline float
gelu_exact(float x)
{
	return x * 0.5f * (1.0f + erf_approx(x * 0.70710678f));
}

/* quick_gelu, x sigmoid(1.702 x); exp only of non-positive arguments. */
static inline float
gelu_quick(float x)
{
	float		z = 1.702f * x;
	float		e = exp_nonpos(-fabsf(z));
	float		sig = z >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);

	return x * sig;
}

/* y = erf(x) elementwise, the kernel GELU uses (for the tests). */
void
osv_vec_erf(float *y, const float *x, size_t n)
{
	for (size_t i = 0; i < n; i++)
		y[i] = erf_approx(x[i]);
}

/* y = exp(x) elementwise for x <= 0, the kernel softmax uses (for the tests). */
void
osv_vec_exp(float *y, const float *x, size_t n)
{
	for (size_t i = 0; i < n; i++)
		y[i] = exp_nonpos(x[i]);
}

/* ---- vectorizable kernels ---------------------------------------------- */

/* Sum of x[0..n), LANES partial sums so that the compiler may vectorize. */
static float
sum_floats(const float *x, int n)
{
	float		acc[LANES] = {0};
	float		s = 0.0f;
	int			i = 0;

	for (; i + LANES <= n; i += LANES)
		for (int j = 0; j < LANES; j++)
			acc[j] += x[i + j];
	for (; i < n; i++)
		s += x[i];
	for (int j = 0; j < LANES; j++)
		s += acc[j];
	return s;
}

/* Sum of (x[i] - mean)^2, the biased variance times n (two-pass: no cancellation). */
static float
sum_squared_dev(const float *x, int n, float mean)
{
	float		acc[LANES] = {0};
	float		s = 0.0f;
	int			i = 0;

	for (; i + LANES <= n; i += LANES)
		for (int j = 0; j < LANES; j++)
		{
			float		d = x[i + j] - mean;

			acc[j] += d * d;
		}
	for (; i < n; i++)
		s += (x[i] - mean) * (x[i] - mean);
	for (int j = 0; j < LANES; j++)
		s += acc[j];
	return s;
}

/* y = (x - mean) / sqrt(var + eps) * w + b over n values; y may be x. */
static void
normalize(float *y, const float *x, int n, const float *w, const float *b,
		  float eps)
{
	float		mean = sum_floats(x, n) / (float) n;
	float		var = sum_squared_dev(x, n, mean) / (float) n;
	float		rstd = 1.0f / sqrtf(var + eps);

	for (int i = 0; i < n; i++)
		y[i] = (x[i] - mean) * rstd * w[i] + b[i];
}

/*
 * LayerNorm of rows rows of n values, row r at r * stride values from the
 * start of x and of y (stride >= n); y may be x.
 */
static void
layer_norm(float *y, const float *x, int rows, size_t stride, int n,
		   const float *w, const float *b, float eps)
{
	for (int r = 0; r < rows; r++)
		normalize(y + (size_t) r * stride, x + (size_t) r * stride, n, w, b, eps);
}

/* GroupNorm(4) of one vector of n values, in place: 4 groups of n / 4. */
static void
group_norm(float *x, int n, const float *w, const float *b)
{
	int			g = n / OSV_GROUPNORM_GROUPS;

	for (int i = 0; i < OSV_GROUPNORM_GROUPS; i++)
		normalize(x + i * g, x + i * g, g, w + i * g, b + i * g, MID_EPS);
}

/* Each of rows rows of y (n values, row r at r * stride) = bias. */
static void
fill_rows(float *y, const float *bias, int rows, size_t stride, int n)
{
	for (int r = 0; r < rows; r++)
		memcpy(y + (size_t) r * stride, bias, (size_t) n * sizeof(float));
}

/* Each of rows rows of y (n values, row r at r * stride) += bias. */
static void
add_rows(float *y, const float *bias, int rows, size_t stride, int n)
{
	for (int r = 0; r < rows; r++)
	{
		float	   *row = y + (size_t) r * stride;

		for (int i = 0; i < n; i++)
			row[i] += bias[i];
	}
}

/* The activation of the transformer MLP, in place over n values. */
static void
activation(float *x, size_t n, osv_activation act)
{
	if (act == OSV_ACT_QUICK_GELU)
	{
		for (size_t i = 0; i < n; i++)
			x[i] = gelu_quick(x[i]);
	}
	else
	{
		for (size_t i = 0; i < n; i++)
			x[i] = gelu_exact(x[i]);
	}
}

/* Softmax of each of rows rows of n values, in place, max-subtracted. */
static void
softmax_rows(float *s, int rows, int n)
{
	for (int r = 0; r < rows; r++)
	{
		float	   *row = s + (size_t) r * n;
		float		lanes[LANES];
		float		m,
					inv;
		int			i = 0;

		/* per-lane max: a select per lane vectorizes, a scalar max chain does not */
		for (int j = 0; j < LANES; j++)
			lanes[j] = -INFINITY;
		for (; i + LANES <= n; i += LANES)
			for (int j = 0; j < LANES; j++)
				lanes[j] = row[i + j] > lanes[j] ? row[i + j] : lanes[j];
		m = -INFINITY;
		for (; i < n; i++)
			m = row[i] > m ? row[i] : m;
		for (int j = 0; j < LANES; j++)
			m = lanes[j] > m ? lanes[j] : m;

		for (i = 0; i < n; i++)
			row[i] = exp_nonpos(row[i] - m);
		/* the max itself gives exp(0) = 1, so the sum is >= 1 */
		inv = 1.0f / sum_floats(row, n);
		for (i = 0; i < n; i++)
			row[i] *= inv;
	}
}

/* ---- the backbone ------------------------------------------------------- */

/* Patch embedding, class token and position embedding of slot b into its rows of ctx->x. */
static void
embed(osv_context *ctx, int b)
{
	const osv_model *model = ctx->model;
	int			size = model->info.image_size;
	int			p = model->info.patch_size;
	int			d = ctx->hidden;
	int			n = ctx->tokens - 1;
	const float *pixels = ctx->pixels + (size_t) b * 3 * size * size;
	float	   *x = ctx->x + (size_t) b * ctx->tokens * d;

	/* im2col: row py * grid + px holds the patch's (channel, row, col) values */
	for (int py = 0; py < ctx->grid; py++)
		for (int px = 0; px < ctx->grid; px++)
		{
			float	   *dst = ctx->patches + (size_t) (py * ctx->grid + px) * ctx->patch_dim;

			for (int c = 0; c < 3; c++)
				for (int i = 0; i < p; i++)
				{
					const float *src = pixels + (size_t) c * size * size
						+ (size_t) (py * p + i) * size + (size_t) px * p;

					memcpy(dst + (c * p + i) * p, src, (size_t) p * sizeof(float));
				}
		}

	/*
	 * x = position embedding, row 0 += class embedding, rows 1.. += patches
	 * W^T, one colour channel (P^2 of the 3 P^2 columns) per product.  Why
	 * not one product: with K = 588, OpenBLAS cuts K in two, at a place
	 * that depends on its thread count, so the sums (and every output)
	 * came out differently with 1 and 2 threads.  A product with K = P^2
	 * (196) is not cut, and the channels are added in the same order on
	 * any number of threads.
	 */
	memcpy(x, model->position_embedding, (size_t) ctx->tokens * d * sizeof(float));
	for (int i = 0; i < d; i++)
		x[i] += model->class_embedding[i];
	for (int c = 0; c < 3; c++)
		osv_sgemm(CblasNoTrans, CblasTrans, n, d, p * p, 1.0f,
				  ctx->patches + c * p * p, ctx->patch_dim,
				  model->patch_embedding + c * p * p, ctx->patch_dim,
				  1.0f, x + d, d);
}

/*
 * One pre-norm transformer block on the residual streams of `images` slots
 * at once: every projection and MLP product is one matrix product over the
 * rows of all of them, so that each weight matrix is streamed from memory
 * (and packed by OpenBLAS) once per run rather than once per image;
 * attention is per image and head.
 *
 * In the last block only the class token's row of each image is computed
 * (the keys and values still cover all tokens): `last` makes the active
 * rows the class rows, one every T rows, which the products address with a
 * leading dimension of T rows instead of one.
 */
static void
block_forward(osv_context *ctx, const osv_layer *layer, int images, bool last)
{
	const osv_model_info *info = &ctx->model->info;
	int			t = ctx->tokens;
	int			d = ctx->hidden;
	int			f = ctx->ffn;
	int			hd = ctx->head_dim;
	int			all = images * t;	/* rows of every token of every image */
	int			rows = last ? images : all; /* active rows */
	int			step = last ? t : 1;	/* rows from one active row to the next */
	int			qrows = last ? 1 : t;	/* active rows per image */
	int			ld = step * d;	/* leading dimension of the active D-wide rows */
	int			ldf = step * f; /* and of the active F-wide rows */
	float		scale = 1.0f / sqrtf((float) hd);

	/* attention: x += out_proj(attn(layer_norm1(x))) */
	layer_norm(ctx->xn, ctx->x, all, d, d, layer->layer_norm1_weight,
			   layer->layer_norm1_bias, info->layer_norm_eps);
	fill_rows(ctx->q, layer->q_proj_bias, rows, ld, d);
	fill_rows(ctx->k, layer->k_proj_bias, all, d, d);
	fill_rows(ctx->v, layer->v_proj_bias, all, d, d);
	osv_sgemm(CblasNoTrans, CblasTrans, rows, d, d, 1.0f, ctx->xn, ld,
			  layer->q_proj_weight, d, 1.0f, ctx->q, ld);
	osv_sgemm(CblasNoTrans, CblasTrans, all, d, d, 1.0f, ctx->xn, d,
			  layer->k_proj_weight, d, 1.0f, ctx->k, d);
	osv_sgemm(CblasNoTrans, CblasTrans, all, d, d, 1.0f, ctx->xn, d,
			  layer->v_proj_weight, d, 1.0f, ctx->v, d);

	/* per image and head: strided views of q, k, v (leading dimension d), no copies */
	for (int b = 0; b < images; b++)
	{
		size_t		base = (size_t) b * t * d;

		for (int h = 0; h < ctx->heads; h++)
		{
			osv_sgemm(CblasNoTrans, CblasTrans, qrows, t, hd, scale,
					  ctx->q + base + h * hd, d, ctx->k + base + h * hd, d,
					  0.0f, ctx->scores, t);
			softmax_rows(ctx->scores, qrows, t);
			osv_sgemm(CblasNoTrans, CblasNoTrans, qrows, hd, t, 1.0f,
					  ctx->scores, t, ctx->v + base + h * hd, d,
					  0.0f, ctx->attn + base + h * hd, d);
		}
	}
	add_rows(ctx->x, layer->out_proj_bias, rows, ld, d);
	osv_sgemm(CblasNoTrans, CblasTrans, rows, d, d, 1.0f, ctx->attn, ld,
			  layer->out_proj_weight, d, 1.0f, ctx->x, ld);

	/* MLP: x += fc2(act(fc1(layer_norm2(x)))) */
	layer_norm(ctx->xn, ctx->x, rows, ld, d, layer->layer_norm2_weight,
			   layer->layer_norm2_bias, info->layer_norm_eps);
	fill_rows(ctx->ffn_buf, layer->fc1_bias, rows, ldf, f);
	osv_sgemm(CblasNoTrans, CblasTrans, rows, f, d, 1.0f, ctx->xn, ld,
			  layer->fc1_weight, d, 1.0f, ctx->ffn_buf, ldf);
	for (int r = 0; r < rows; r++)
		activation(ctx->ffn_buf + (size_t) r * ldf, (size_t) f, info->hidden_act);
	add_rows(ctx->x, layer->fc2_bias, rows, ld, d);
	osv_sgemm(CblasNoTrans, CblasTrans, rows, d, f, 1.0f, ctx->ffn_buf, ldf,
			  layer->fc2_weight, f, 1.0f, ctx->x, ld);
}

/* ---- the MLP branches and the head -------------------------------------- */

/*
 * One MLPCentroid branch on the feature of slot b, into out (branch->out_dim
 * values).  Matrix-vector products, one image at a time: batching them
 * would save little (the branches are about 0.1 % of the FLOPs), and this
 * way an image's result never depends on which images ran beside it.
 */
static void
branch_forward(osv_context *ctx, int b, const osv_branch *branch, float *out)
{
	int			d = ctx->hidden;
	int			h1 = ctx->mid1;
	int			h2 = ctx->mid2;
	float	   *a = ctx->mid_a;
	float	   *m = ctx->mid_b;

	normalize(a, ctx->feature + (size_t) b * d, d, branch->norm_weight,
			  branch->norm_bias, MID_EPS);
	memcpy(m, branch->fc1_bias, (size_t) h1 * sizeof(float));
	osv_sgemv(CblasNoTrans, h1, d, 1.0f, branch->fc1_weight, d, a, 1.0f, m);
	group_norm(m, h1, branch->gn1_weight, branch->gn1_bias);
	/* MLPCentroid's GELU is nn.GELU(): always the exact one */
	activation(m, (size_t) h1, OSV_ACT_GELU);
	memcpy(a, branch->fc2_bias, (size_t) h2 * sizeof(float));
	osv_sgemv(CblasNoTrans, h2, h1, 1.0f, branch->fc2_weight, h1, m, 1.0f, a);
	group_norm(a, h2, branch->gn2_weight, branch->gn2_bias);
	activation(a, (size_t) h2, OSV_ACT_GELU);
	memcpy(out, branch->out_bias, (size_t) branch->out_dim * sizeof(float));
	osv_sgemv(CblasNoTrans, branch->out_dim, h2, 1.0f, branch->out_weight, h2,
			  a, 1.0f, out);
}

/* Decreasing probability, then increasing cell: a total, deterministic order. */
static int
compare_cells(const void *pa, const void *pb, void *data)
{
	const double *probs = data;
	int			a = *(const int *) pa;
	int			b = *(const int *) pb;

	if (probs[a] != probs[b])
		return probs[a] > probs[b] ? -1 : 1;
	return (a > b) - (a < b);
}

/* Argmax cell, softmax probabilities (double) and the cells' order of slot b. */
static void
head_forward(osv_context *ctx, int b)
{
	int			c = ctx->cells;
	const float *logits = ctx->logits + (size_t) b * c;
	double	   *probs = ctx->probs + (size_t) b * c;
	int		   *order = ctx->order + (size_t) b * c;
	double		sum = 0.0;
	int			best = 0;

	/* strict > keeps the first index on ties, as torch.argmax */
	for (int i = 1; i < c; i++)
		if (logits[i] > logits[best])
			best = i;
	ctx->cell[b] = best;

	for (int i = 0; i < c; i++)
	{
		probs[i] = exp((double) logits[i] - (double) logits[best]);
		sum += probs[i];
	}
	for (int i = 0; i < c; i++)
	{
		probs[i] /= sum;
		order[i] = i;
	}
	/* qsort_r (glibc, gnu11): the comparison needs the probabilities */
	qsort_r(order, (size_t) c, sizeof(int), compare_cells, probs);
}

/* The hybrid head: cell center plus the tanh-scaled offset towards its bounds. */
void
osv_network_cell_point(const osv_context *ctx, int b, int cell, double *lat,
					   double *lon)
{
	const double *q = ctx->model->cell_norm + (size_t) cell * 6;
	const float *reg = ctx->regression + (size_t) b * 2 * ctx->cells;
	double		scale = ctx->model->info.scale_tanh;
	double		r[2];
	const double *center = q,
			   *up = q + 2,
			   *down = q + 4;

	r[0] = scale * tanh((double) reg[2 * cell]);
	r[1] = scale * tanh((double) reg[2 * cell + 1]);
	/* the head works in coordinates normalised to [-1, 1] (see model.c) */
	for (int i = 0; i < 2; i++)
	{
		double		g = center[i] + r[i] * (r[i] > 0.0 ? up[i] : down[i]);

		r[i] = g < -1.0 ? -1.0 : (g > 1.0 ? 1.0 : g);
	}
	*lat = r[0] * 90.0;
	*lon = r[1] * 180.0;
}

/* ---- the whole pass ----------------------------------------------------- */

/* true when the caller's abort callback asks to stop */
static bool
should_abort(const osv_params *params)
{
	return params->abort_callback != NULL && params->abort_callback(params->abort_data);
}

/* Backbone, both branches and the head on slots 0 .. images - 1; polls the abort callback. */
osv_status
osv_network_forward(osv_context *ctx, int images, const osv_params *params,
					osv_error *err)
{
	const osv_model *model = ctx->model;
	int			layers = model->info.num_layers;
	int			t = ctx->tokens;
	int			d = ctx->hidden;
	int			threads;
	double		t0,
				t1;

	ctx->has_result = false;
	ctx->timings.backbone = 0.0;
	ctx->timings.head = 0.0;
	if (images < 1 || images > ctx->max_images)
		return osv_fail(err, OSV_ERR_ARGUMENT, "%d images for a run state of %d",
						images, ctx->max_images);

	t0 = osv_now();
	for (int b = 0; b < images; b++)
		embed(ctx, b);
	layer_norm(ctx->x, ctx->x, images * t, d, d, model->pre_layrnorm_weight,
			   model->pre_layrnorm_bias, model->info.layer_norm_eps);
	for (int i = 0; i < layers; i++)
	{
		/* the interrupt point: between blocks, about 1/24 of a run apart */
		if (should_abort(params))
			return osv_fail(err, OSV_ERR_ABORTED,
							"run aborted before transformer block %d", i);
		block_forward(ctx, &model->layers[i], images, i == layers - 1);
	}
	/* the feature is the class token, without post_layernorm */
	for (int b = 0; b < images; b++)
		memcpy(ctx->feature + (size_t) b * d, ctx->x + (size_t) b * t * d,
			   (size_t) d * sizeof(float));
	t1 = osv_now();
	ctx->timings.backbone = t1 - t0;

	if (should_abort(params))
		return osv_fail(err, OSV_ERR_ABORTED, "run aborted before the head");

	/*
	 * The branches on one BLAS thread: OpenBLAS splits a threaded GEMV's
	 * rows at places whose alignment changes how the rows next to them are
	 * summed, so the 22798 regression outputs came out slightly different
	 * with 2 threads than with 1.  The branches are 0.1 % of the FLOPs; on
	 * one thread the result no longer depends on the thread count.
	 */
	threads = osv_blas_threads();
	osv_blas_set_threads(1);
	for (int b = 0; b < images; b++)
	{
		branch_forward(ctx, b, &model->classif, ctx->logits + (size_t) b * ctx->cells);
		branch_forward(ctx, b, &model->reg, ctx->regression + (size_t) b * 2 * ctx->cells);
		head_forward(ctx, b);
	}
	osv_blas_set_threads(threads);
	ctx->timings.head = osv_now() - t1;
	ctx->has_result = true;
	return OSV_OK;
}
