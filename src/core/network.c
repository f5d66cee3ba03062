/*
 * network.c: the forward pass of the OSV-5M baseline model (docs/MODEL.md
 * section 4): the CLIP ViT backbone, the two MLPCentroid branches and the
 * hybrid quadtree head, on the run state of one osv_context.
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
 * Invariants: the context's buffers were sized by osv_context_new for this
 * model; nothing here allocates; a run either completes or stops before a
 * block (abort) leaving has_result false.
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

/* LayerNorm of each of rows rows of n values; y may be x. */
static void
layer_norm(float *y, const float *x, int rows, int n, const float *w,
		   const float *b, float eps)
{
	for (int r = 0; r < rows; r++)
		normalize(y + (size_t) r * n, x + (size_t) r * n, n, w, b, eps);
}

/* GroupNorm(4) of one vector of n values, in place: 4 groups of n / 4. */
static void
group_norm(float *x, int n, const float *w, const float *b)
{
	int			g = n / OSV_GROUPNORM_GROUPS;

	for (int i = 0; i < OSV_GROUPNORM_GROUPS; i++)
		normalize(x + i * g, x + i * g, g, w + i * g, b + i * g, MID_EPS);
}

/* Each of rows rows of y (n values) = bias. */
static void
fill_rows(float *y, const float *bias, int rows, int n)
{
	for (int r = 0; r < rows; r++)
		memcpy(y + (size_t) r * n, bias, (size_t) n * sizeof(float));
}

/* Each of rows rows of y (n values) += bias. */
static void
add_rows(float *y, const float *bias, int rows, int n)
{
	for (int r = 0; r < rows; r++)
	{
		float	   *row = y + (size_t) r * n;

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

/* Patch embedding, class token and position embedding into ctx->x. */
static void
embed(osv_context *ctx)
{
	const osv_model *model = ctx->model;
	int			size = model->info.image_size;
	int			p = model->info.patch_size;
	int			d = ctx->hidden;
	int			n = ctx->tokens - 1;

	/* im2col: row py * grid + px holds the patch's (channel, row, col) values */
	for (int py = 0; py < ctx->grid; py++)
		for (int px = 0; px < ctx->grid; px++)
		{
			float	   *dst = ctx->patches + (size_t) (py * ctx->grid + px) * ctx->patch_dim;

			for (int c = 0; c < 3; c++)
				for (int i = 0; i < p; i++)
				{
					const float *src = ctx->pixels + (size_t) c * size * size
						+ (size_t) (py * p + i) * size + (size_t) px * p;

					memcpy(dst + (c * p + i) * p, src, (size_t) p * sizeof(float));
				}
		}

	/* x = position embedding, row 0 += class embedding, rows 1.. += patches W^T */
	memcpy(ctx->x, model->position_embedding,
		   (size_t) ctx->tokens * d * sizeof(float));
	for (int i = 0; i < d; i++)
		ctx->x[i] += model->class_embedding[i];
	osv_sgemm(CblasNoTrans, CblasTrans, n, d, ctx->patch_dim, 1.0f,
			  ctx->patches, ctx->patch_dim, model->patch_embedding, ctx->patch_dim,
			  1.0f, ctx->x + d, d);
}

/*
 * One pre-norm transformer block on ctx->x.  Only the first rows rows of
 * the block's output are computed (the keys and values still cover all
 * tokens): the last block needs just the class token.
 */
static void
block_forward(osv_context *ctx, const osv_layer *layer, int rows)
{
	const osv_model_info *info = &ctx->model->info;
	int			t = ctx->tokens;
	int			d = ctx->hidden;
	int			f = ctx->ffn;
	int			hd = ctx->head_dim;
	float		scale = 1.0f / sqrtf((float) hd);

	/* attention: x += out_proj(attn(layer_norm1(x))) */
	layer_norm(ctx->xn, ctx->x, t, d, layer->layer_norm1_weight,
			   layer->layer_norm1_bias, info->layer_norm_eps);
	fill_rows(ctx->q, layer->q_proj_bias, rows, d);
	fill_rows(ctx->k, layer->k_proj_bias, t, d);
	fill_rows(ctx->v, layer->v_proj_bias, t, d);
	osv_sgemm(CblasNoTrans, CblasTrans, rows, d, d, 1.0f, ctx->xn, d,
			  layer->q_proj_weight, d, 1.0f, ctx->q, d);
	osv_sgemm(CblasNoTrans, CblasTrans, t, d, d, 1.0f, ctx->xn, d,
			  layer->k_proj_weight, d, 1.0f, ctx->k, d);
	osv_sgemm(CblasNoTrans, CblasTrans, t, d, d, 1.0f, ctx->xn, d,
			  layer->v_proj_weight, d, 1.0f, ctx->v, d);

	/* per head: strided views of q, k, v (leading dimension d), no copies */
	for (int h = 0; h < ctx->heads; h++)
	{
		osv_sgemm(CblasNoTrans, CblasTrans, rows, t, hd, scale,
				  ctx->q + h * hd, d, ctx->k + h * hd, d, 0.0f, ctx->scores, t);
		softmax_rows(ctx->scores, rows, t);
		osv_sgemm(CblasNoTrans, CblasNoTrans, rows, hd, t, 1.0f,
				  ctx->scores, t, ctx->v + h * hd, d, 0.0f, ctx->attn + h * hd, d);
	}
	add_rows(ctx->x, layer->out_proj_bias, rows, d);
	osv_sgemm(CblasNoTrans, CblasTrans, rows, d, d, 1.0f, ctx->attn, d,
			  layer->out_proj_weight, d, 1.0f, ctx->x, d);

	/* MLP: x += fc2(act(fc1(layer_norm2(x)))) */
	layer_norm(ctx->xn, ctx->x, rows, d, layer->layer_norm2_weight,
			   layer->layer_norm2_bias, info->layer_norm_eps);
	fill_rows(ctx->ffn_buf, layer->fc1_bias, rows, f);
	osv_sgemm(CblasNoTrans, CblasTrans, rows, f, d, 1.0f, ctx->xn, d,
			  layer->fc1_weight, d, 1.0f, ctx->ffn_buf, f);
	activation(ctx->ffn_buf, (size_t) rows * f, info->hidden_act);
	add_rows(ctx->x, layer->fc2_bias, rows, d);
	osv_sgemm(CblasNoTrans, CblasTrans, rows, d, f, 1.0f, ctx->ffn_buf, f,
			  layer->fc2_weight, f, 1.0f, ctx->x, d);
}

/* ---- the MLP branches and the head -------------------------------------- */

/* One MLPCentroid branch on the feature, into out (branch->out_dim values). */
static void
branch_forward(osv_context *ctx, const osv_branch *branch, float *out)
{
	int			d = ctx->hidden;
	int			h1 = ctx->mid1;
	int			h2 = ctx->mid2;
	float	   *a = ctx->mid_a;
	float	   *b = ctx->mid_b;

	normalize(a, ctx->feature, d, branch->norm_weight, branch->norm_bias, MID_EPS);
	memcpy(b, branch->fc1_bias, (size_t) h1 * sizeof(float));
	osv_sgemv(CblasNoTrans, h1, d, 1.0f, branch->fc1_weight, d, a, 1.0f, b);
	group_norm(b, h1, branch->gn1_weight, branch->gn1_bias);
	/* MLPCentroid's GELU is nn.GELU(): always the exact one */
	activation(b, (size_t) h1, OSV_ACT_GELU);
	memcpy(a, branch->fc2_bias, (size_t) h2 * sizeof(float));
	osv_sgemv(CblasNoTrans, h2, h1, 1.0f, branch->fc2_weight, h1, b, 1.0f, a);
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

/* Argmax cell, softmax probabilities (double) and the cells' order. */
static void
head_forward(osv_context *ctx)
{
	int			c = ctx->cells;
	const float *logits = ctx->logits;
	double		sum = 0.0;
	int			best = 0;

	/* strict > keeps the first index on ties, as torch.argmax */
	for (int i = 1; i < c; i++)
		if (logits[i] > logits[best])
			best = i;
	ctx->cell = best;

	for (int i = 0; i < c; i++)
	{
		ctx->probs[i] = exp((double) logits[i] - (double) logits[best]);
		sum += ctx->probs[i];
	}
	for (int i = 0; i < c; i++)
	{
		ctx->probs[i] /= sum;
		ctx->order[i] = i;
	}
	/* qsort_r (glibc, gnu11): the comparison needs the probabilities */
	qsort_r(ctx->order, (size_t) c, sizeof(int), compare_cells, ctx->probs);
}

/* The hybrid head: cell center plus the tanh-scaled offset towards its bounds. */
void
osv_network_cell_point(const osv_context *ctx, int cell, double *lat,
					   double *lon)
{
	const osv_cell *q = &ctx->model->cells[cell];
	double		scale = ctx->model->info.scale_tanh;
	double		r[2],
				center[2],
				up[2],
				down[2];

	r[0] = scale * tanh((double) ctx->regression[2 * cell]);
	r[1] = scale * tanh((double) ctx->regression[2 * cell + 1]);
	/* the head works in coordinates normalised to [-1, 1] */
	center[0] = q->mean_lat / 90.0;
	center[1] = q->mean_lon / 180.0;
	up[0] = q->max_lat / 90.0 - center[0];
	up[1] = q->max_lon / 180.0 - center[1];
	down[0] = center[0] - q->min_lat / 90.0;
	down[1] = center[1] - q->min_lon / 180.0;
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

/* Backbone, both branches and the head on ctx->pixels; polls the abort callback. */
osv_status
osv_network_forward(osv_context *ctx, const osv_params *params, osv_error *err)
{
	const osv_model *model = ctx->model;
	int			layers = model->info.num_layers;
	double		t0,
				t1;

	ctx->has_result = false;
	ctx->timings.backbone = 0.0;
	ctx->timings.head = 0.0;

	t0 = osv_now();
	embed(ctx);
	layer_norm(ctx->x, ctx->x, ctx->tokens, ctx->hidden, model->pre_layrnorm_weight,
			   model->pre_layrnorm_bias, model->info.layer_norm_eps);
	for (int i = 0; i < layers; i++)
	{
		/* the interrupt point: between blocks, about 1/24 of a run apart */
		if (should_abort(params))
			return osv_fail(err, OSV_ERR_ABORTED,
							"run aborted before transformer block %d", i);
		block_forward(ctx, &model->layers[i], i == layers - 1 ? 1 : ctx->tokens);
	}
	/* the feature is the class token, without post_layernorm */
	memcpy(ctx->feature, ctx->x, (size_t) ctx->hidden * sizeof(float));
	t1 = osv_now();
	ctx->timings.backbone = t1 - t0;

	if (should_abort(params))
		return osv_fail(err, OSV_ERR_ABORTED, "run aborted before the head");
	branch_forward(ctx, &model->classif, ctx->logits);
	branch_forward(ctx, &model->reg, ctx->regression);
	head_forward(ctx);
	ctx->timings.head = osv_now() - t1;
	ctx->has_result = true;
	return OSV_OK;
}
