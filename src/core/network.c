/*
 * network.c: the forward pass of the OSV-5M baseline model (docs/MODEL.md
 * section 4): the CLIP ViT backbone, the two MLPCentroid branches and the
 * hybrid quadtree head, on the run state of one osv_context, for one or
 * several images at once (a batch: see block_forward).
 *
 * Every step runs on all the threads of the pool (pool.c): the matrix
 * products on our kernels (gemm.c), split by columns; the layer norms by
 * rows; attention by (image, head); the branches' matrix-vector products by
 * output rows.  Biases, the residual additions and GELU are folded into the
 * products' epilogue (bias after the sum, then the residual, then the
 * activation, PyTorch's order), so no extra pass over the activations is
 * needed.
 *
 * The elementwise work is written to be auto-vectorized: reductions go
 * through LANES independent accumulators (a float sum may not be reordered
 * by the compiler otherwise), and erf and exp are our own branch-free
 * polynomials instead of libm calls, which cannot be vectorized.
 *
 * Invariants: the context's buffers were sized by osv_context_new_batch for
 * this model and at least as many images as a run is given; nothing here
 * allocates but the pool's first preparation; a run either completes or
 * stops before a block (abort) leaving has_result false.  An image's
 * result is the same bits whatever the thread count, whatever images ran
 * beside it, and whichever kernel path the CPU took: every split is of
 * independent outputs, each computed in one fixed order (gemm.c).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE				/* qsort_r */
#endif
#include "network.h"

#include "activation.h"
#include "gemm.h"
#include "pool.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Independent accumulators of the vectorizable reductions (one AVX-512 register). */
#define LANES 16

/* eps of the MLPCentroid LayerNorm and GroupNorm: PyTorch's default. */
#define MID_EPS 1e-5f

/* y = erf(x) elementwise, the kernel GELU uses (for the tests). */
void
osv_vec_erf(float *y, const float *x, size_t n)
{
	for (size_t i = 0; i < n; i++)
		y[i] = osv_erf(x[i]);
}

/* y = exp(x) elementwise for x <= 0, the kernel softmax uses (for the tests). */
void
osv_vec_exp(float *y, const float *x, size_t n)
{
	for (size_t i = 0; i < n; i++)
		y[i] = osv_exp_nonpos(x[i]);
}
/*
 * fn (0 exp, 1 erf, 2 GELU, 3 quick_gelu) of n values through its AVX-512
 * form, n a multiple of 16 (for the tests: the same bits as the scalar
 * definitions); false, computing nothing, where the CPU has no AVX-512.
 */
#ifdef OSV_HAVE_AVX512_ACTIVATION
static __attribute__((target("avx512f"))) void
vec_avx512(int fn, float *y, const float *x, size_t n)
{
	for (size_t i = 0; i + 16 <= n; i += 16)
	{
		__m512		v = _mm512_loadu_ps(x + i);

		v = fn == 0 ? osv_exp_nonpos16(v) : fn == 1 ? osv_erf16(v) :
			fn == 2 ? osv_gelu16(v) : osv_quick_gelu16(v);
		_mm512_storeu_ps(y + i, v);
	}
}
#endif

bool
osv_vec_avx512(int fn, float *y, const float *x, size_t n)
{
#ifdef OSV_HAVE_AVX512_ACTIVATION
	if (__builtin_cpu_supports("avx512f"))
	{
		vec_avx512(fn, y, x, n);
		return true;
	}
#endif
	return false;
}

/* The scalar definitions of the same functions. */
void
osv_vec_scalar(int fn, float *y, const float *x, size_t n)
{
	for (size_t i = 0; i < n; i++)
		y[i] = fn == 0 ? osv_exp_nonpos(x[i]) : fn == 1 ? osv_erf(x[i]) :
			fn == 2 ? osv_gelu(x[i]) : osv_quick_gelu(x[i]);
}

/* ---- vectorizable kernels ---------------------------------------------- */

/*
 * The loops below are compiled once per instruction set and chosen when
 * the library loads (target_clones), so that one portable build uses
 * AVX-512 or AVX2 where the CPU has them.  The core is compiled with
 * -ffp-contract=off: no clone fuses a multiply and an add that the others
 * do not, so every clone computes the same bits.
 */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__SANITIZE_ADDRESS__) && \
	!defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* Sum of x[0..n), LANES partial sums so that the compiler may vectorize. */
static inline float
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
static inline float
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
VECTOR_CLONES static void
normalize_scalar(float *y, const float *x, int n, const float *w, const float *b,
		  float eps)
{
	float		mean = sum_floats(x, n) / (float) n;
	float		var = sum_squared_dev(x, n, mean) / (float) n;
	float		rstd = 1.0f / sqrtf(var + eps);

	for (int i = 0; i < n; i++)
		y[i] = (x[i] - mean) * rstd * w[i] + b[i];
}

/* Exact GELU over n values in place (the branches; the blocks' is in fc1's epilogue). */
VECTOR_CLONES static void
gelu_row(float *x, int n)
{
	for (int i = 0; i < n; i++)
		x[i] = osv_gelu(x[i]);
}

/* Softmax of each of rows rows of n values, in place, max-subtracted. */
VECTOR_CLONES static void
softmax_rows_scalar(float *s, int rows, int n)
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
			row[i] = osv_exp_nonpos(row[i] - m);
		/* the max itself gives exp(0) = 1, so the sum is >= 1 */
		inv = 1.0f / sum_floats(row, n);
		for (i = 0; i < n; i++)
			row[i] *= inv;
	}
}

#ifdef OSV_HAVE_AVX512_ACTIVATION
/*
 * The AVX-512 forms of normalize and softmax_rows, for the AVX-512 kernel
 * paths: the scalar functions' operations in the same order (the LANES
 * partial sums are the 16 lanes of one register, added to the tail's sum
 * lane by lane at the end), so the same bits, without relying on what the
 * compiler makes of the loops.
 */
#define NETWORK_AVX512 __attribute__((target("avx512f")))

/* s + lanes 0, 1, ..., 15 of acc, in that order: the end of sum_floats. */
static inline __attribute__((always_inline)) NETWORK_AVX512 float
add_lanes(float s, __m512 acc)
{
	float		lanes[LANES];

	_mm512_storeu_ps(lanes, acc);
	for (int j = 0; j < LANES; j++)
		s += lanes[j];
	return s;
}

static NETWORK_AVX512 void
normalize_avx512(float *y, const float *x, int n, const float *w, const float *b,
				 float eps)
{
	int			full = n / LANES * LANES;
	__m512		acc = _mm512_setzero_ps();
	__m512		vmean,
				vrstd;
	float		s = 0.0f,
				mean,
				var,
				rstd;
	int			i;

	for (i = 0; i < full; i += LANES)
		acc = _mm512_add_ps(acc, _mm512_loadu_ps(x + i));
	for (; i < n; i++)
		s += x[i];
	mean = add_lanes(s, acc) / (float) n;

	vmean = _mm512_set1_ps(mean);
	acc = _mm512_setzero_ps();
	s = 0.0f;
	for (i = 0; i < full; i += LANES)
	{
		__m512		dev = _mm512_sub_ps(_mm512_loadu_ps(x + i), vmean);

		acc = _mm512_add_ps(acc, _mm512_mul_ps(dev, dev));
	}
	for (; i < n; i++)
		s += (x[i] - mean) * (x[i] - mean);
	var = add_lanes(s, acc) / (float) n;
	rstd = 1.0f / sqrtf(var + eps);

	vrstd = _mm512_set1_ps(rstd);
	for (i = 0; i < full; i += LANES)
		_mm512_storeu_ps(y + i,
						 _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), vmean),
																   vrstd),
													 _mm512_loadu_ps(w + i)),
									   _mm512_loadu_ps(b + i)));
	for (; i < n; i++)
		y[i] = (x[i] - mean) * rstd * w[i] + b[i];
}

static NETWORK_AVX512 void
softmax_rows_avx512(float *s, int rows, int n)
{
	int			full = n / LANES * LANES;

	for (int r = 0; r < rows; r++)
	{
		float	   *row = s + (size_t) r * n;
		__m512		vmax = _mm512_set1_ps(-INFINITY),
					acc = _mm512_setzero_ps(),
					vm,
					vinv;
		float		lanes[LANES],
					m = -INFINITY,
					sum = 0.0f,
					inv;
		int			i;

		/* the per-lane maxima, then the tail's and the lanes' in the scalar order */
		for (i = 0; i < full; i += LANES)
		{
			__m512		v = _mm512_loadu_ps(row + i);

			vmax = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ), vmax, v);
		}
		for (; i < n; i++)
			m = row[i] > m ? row[i] : m;
		_mm512_storeu_ps(lanes, vmax);
		for (int j = 0; j < LANES; j++)
			m = lanes[j] > m ? lanes[j] : m;

		/* exp and its sum in one pass: the same partial sums as sum_floats */
		vm = _mm512_set1_ps(m);
		for (i = 0; i < full; i += LANES)
		{
			__m512		e = osv_exp_nonpos16(_mm512_sub_ps(_mm512_loadu_ps(row + i), vm));

			_mm512_storeu_ps(row + i, e);
			acc = _mm512_add_ps(acc, e);
		}
		for (; i < n; i++)
		{
			row[i] = osv_exp_nonpos(row[i] - m);
			sum += row[i];
		}
		inv = 1.0f / add_lanes(sum, acc);

		vinv = _mm512_set1_ps(inv);
		for (i = 0; i < full; i += LANES)
			_mm512_storeu_ps(row + i, _mm512_mul_ps(_mm512_loadu_ps(row + i), vinv));
		for (; i < n; i++)
			row[i] *= inv;
	}
}
#endif

/* normalize, in the AVX-512 form when the kernels are AVX-512's. */
static void
normalize(float *y, const float *x, int n, const float *w, const float *b, float eps)
{
#ifdef OSV_HAVE_AVX512_ACTIVATION
	if (osv_gemm_avx512())
	{
		normalize_avx512(y, x, n, w, b, eps);
		return;
	}
#endif
	normalize_scalar(y, x, n, w, b, eps);
}

/* softmax_rows, in the AVX-512 form when the kernels are AVX-512's. */
static void
softmax_rows(float *s, int rows, int n)
{
#ifdef OSV_HAVE_AVX512_ACTIVATION
	if (osv_gemm_avx512())
	{
		softmax_rows_avx512(s, rows, n);
		return;
	}
#endif
	softmax_rows_scalar(s, rows, n);
}

/* GroupNorm(4) of one vector of n values, in place: 4 groups of n / 4. */
static void
group_norm(float *x, int n, const float *w, const float *b)
{
	int			g = n / OSV_GROUPNORM_GROUPS;

	for (int i = 0; i < OSV_GROUPNORM_GROUPS; i++)
		normalize(x + i * g, x + i * g, g, w + i * g, b + i * g, MID_EPS);
}

/* y[j] = dot(w row j, x) + bias[j] for j in [lo, hi); w is [n, k] row-major. */
VECTOR_CLONES static void
matvec_rows(float *y, const float *w, const float *x, const float *bias, int k,
			int lo, int hi)
{
	for (int j = lo; j < hi; j++)
	{
		const float *row = w + (size_t) j * k;
		float		acc[LANES] = {0};
		float		s = 0.0f;
		int			i = 0;

		for (; i + LANES <= k; i += LANES)
			for (int l = 0; l < LANES; l++)
				acc[l] += row[i + l] * x[i + l];
		for (; i < k; i++)
			s += row[i] * x[i];
		for (int l = 0; l < LANES; l++)
			s += acc[l];
		y[j] = s + bias[j];
	}
}

/* ---- parallel steps ------------------------------------------------------ */

/* LayerNorm of rows rows of n values (row r at r * stride) on every thread; y may be x. */
typedef struct norm_step
{
	float	   *y;
	const float *x;
	int			rows;
	size_t		stride;
	int			n;
	const float *w,
			   *b;
	float		eps;
} norm_step;

static void
layer_norm_step(void *arg, int ith, int nth)
{
	norm_step  *s = arg;
	int			lo,
				hi;

	osv_split(s->rows, ith, nth, &lo, &hi);
	for (int r = lo; r < hi; r++)
		normalize(s->y + (size_t) r * s->stride, s->x + (size_t) r * s->stride,
				  s->n, s->w, s->b, s->eps);
}

static void
layer_norm(float *y, const float *x, int rows, size_t stride, int n,
		   const float *w, const float *b, float eps)
{
	norm_step	s = {y, x, rows, stride, n, w, b, eps};

	osv_pool_run(layer_norm_step, &s);
}

/* y = W x + bias (W [n, k]) on every thread, split by output rows. */
typedef struct matvec_step
{
	float	   *y;
	const float *w,
			   *x,
			   *bias;
	int			n,
				k;
} matvec_step;

static void
matvec_step_fn(void *arg, int ith, int nth)
{
	matvec_step *s = arg;
	int			lo,
				hi;

	osv_split(s->n, ith, nth, &lo, &hi);
	matvec_rows(s->y, s->w, s->x, s->bias, s->k, lo, hi);
}

static void
matvec(float *y, const float *w, const float *x, const float *bias, int n, int k)
{
	matvec_step s = {y, w, x, bias, n, k};

	osv_pool_run(matvec_step_fn, &s);
}

/*
 * A product with a PyTorch weight [n, k], matrix `packed` of the model's
 * pack cache: C (+)= A W^T + bias, then post, in the run's precision;
 * a_packed when the previous product had the same A (osv_gemm.a_packed).
 */
static void
linear(osv_context *ctx, int m, const float *a, size_t lda, const float *w,
	   int packed, int n, int k, const float *bias, bool accumulate, float *c,
	   size_t ldc, osv_gemm_post post, bool a_packed)
{
	const osv_model *model = ctx->model;
	/* int8 spares the patch embedding, the product with the pixels */
	osv_precision precision = ctx->precision == OSV_PRECISION_INT8 && packed == OSV_PACKED_PATCH ?
		OSV_PRECISION_FP32 : ctx->precision;
	const osv_pack_cache *pack = &model->packs[precision];
	osv_gemm	g = {
		.m = m,.n = n,.k = k,.a = a,.lda = lda,.b = w,.ldb = (size_t) k,
		.b_is_nk = true,.alpha = 1.0f,.bias = bias,.accumulate = accumulate,
		.c = c,.ldc = ldc,.post = post,.a_packed = a_packed,
		.bf16 = precision == OSV_PRECISION_BF16,.int8 = precision == OSV_PRECISION_INT8
	};

	if (pack->matrices != NULL && g.bf16)
	{
		g.b_packed16 = pack->matrices[packed];
		g.b_packed16_nr = pack->nr;
	}
	else if (pack->matrices != NULL && g.int8)
	{
		g.b_packed8 = pack->matrices[packed];
		g.b_packed8_nr = pack->nr;
	}
	else if (pack->matrices != NULL)
	{
		g.b_packed = pack->matrices[packed];
		g.b_packed_nr = pack->nr;
	}
	osv_gemm_run(&g, ctx->packed_a);
}

/* ---- the backbone ------------------------------------------------------- */

/* im2col of slot b: row py * grid + px of ctx->patches holds the patch's (channel, row, col) values. */
static void
im2col(osv_context *ctx, int b)
{
	int			size = ctx->model->info.image_size;
	int			p = ctx->model->info.patch_size;
	const float *pixels = ctx->pixels + (size_t) b * 3 * size * size;

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
}

/*
 * Patch embedding, class token and position embedding of slot b into its
 * rows of ctx->x: x = position embedding, row 0 += class embedding, rows
 * 1.. += patches W^T (the convolution as one product over the 3 P^2
 * values of each patch).
 */
static void
embed(osv_context *ctx, int b)
{
	const osv_model *model = ctx->model;
	int			d = ctx->hidden;
	float	   *x = ctx->x + (size_t) b * ctx->tokens * d;

	im2col(ctx, b);
	memcpy(x, model->position_embedding, (size_t) ctx->tokens * d * sizeof(float));
	for (int i = 0; i < d; i++)
		x[i] += model->class_embedding[i];
	linear(ctx, ctx->tokens - 1, ctx->patches, ctx->patch_dim,
		   model->patch_embedding, OSV_PACKED_PATCH, d, ctx->patch_dim, NULL, true,
		   x + d, d, OSV_POST_NONE, false);
}

/*
 * Attention of every (image, head) pair, split over the threads: scores =
 * scale q k^T into the thread's scratch, softmax, then scores v into that
 * head's columns of attn.  A pair runs on one thread from start to end, so
 * its result does not depend on the split.
 */
typedef struct attention_step
{
	osv_context *ctx;
	int			images;
	int			qrows;			/* query rows per image: T, or 1 in the last block */
	size_t		qstride;		/* values from one query row to the next */
	float		scale;
} attention_step;

/* Floats of thread scratch attention needs: the scores, then the products' packing. */
static size_t
attention_scratch_floats(const osv_context *ctx)
{
	size_t		t = (size_t) ctx->tokens;
	int			k = ctx->tokens > ctx->head_dim ? ctx->tokens : ctx->head_dim;

	return (t * t + 15) / 16 * 16 + osv_gemm_scratch_floats(ctx->tokens, k);
}

static void
attention_step_fn(void *arg, int ith, int nth)
{
	attention_step *s = arg;
	osv_context *ctx = s->ctx;
	int			t = ctx->tokens;
	int			d = ctx->hidden;
	int			hd = ctx->head_dim;
	float	   *scores = osv_pool_scratch(ith);
	float	   *scratch = scores + ((size_t) t * t + 15) / 16 * 16;
	int			lo,
				hi;

	osv_split(s->images * ctx->heads, ith, nth, &lo, &hi);
	for (int task = lo; task < hi; task++)
	{
		int			b = task / ctx->heads;
		int			h = task % ctx->heads;
		size_t		base = (size_t) b * t * d + (size_t) h * hd;
		osv_gemm	qk = {
			.m = s->qrows,.n = t,.k = hd,.a = ctx->q + base,.lda = s->qstride,
			.b = ctx->k + base,.ldb = d,.b_is_nk = true,.alpha = s->scale,
			.c = scores,.ldc = t
		};
		osv_gemm	pv = {
			.m = s->qrows,.n = hd,.k = t,.a = scores,.lda = t,
			.b = ctx->v + base,.ldb = d,.b_is_nk = false,.alpha = 1.0f,
			.c = ctx->attn + base,.ldc = s->qstride
		};

		osv_gemm_serial(&qk, scratch);
		softmax_rows(scores, s->qrows, t);
		osv_gemm_serial(&pv, scratch);
	}
}

/*
 * One pre-norm transformer block on the residual streams of `images` slots
 * at once: every projection and MLP product is one matrix product over the
 * rows of all of them, so that each weight matrix is streamed from memory
 * (and packed) once per run rather than once per image; attention is per
 * image and head.
 *
 * In the last block only the class token's row of each image is computed
 * (the keys and values still cover all tokens): `last` makes the active
 * rows the class rows, one every T rows, which the products address with a
 * leading dimension of T rows instead of one.
 */
static void
block_forward(osv_context *ctx, int index, int images, bool last)
{
	const osv_layer *layer = &ctx->model->layers[index];
	const osv_model_info *info = &ctx->model->info;
	int			t = ctx->tokens;
	int			d = ctx->hidden;
	int			f = ctx->ffn;
	int			all = images * t;	/* rows of every token of every image */
	int			rows = last ? images : all; /* active rows */
	size_t		ld = (size_t) (last ? t : 1) * d;	/* from one active D-wide row to the next */
	size_t		ldf = (size_t) (last ? t : 1) * f;	/* and F-wide */
	attention_step att = {ctx, images, last ? 1 : t, ld,
	1.0f / sqrtf((float) ctx->head_dim)};

	/* attention: x += out_proj(attn(layer_norm1(x))) */
	layer_norm(ctx->xn, ctx->x, all, d, d, layer->layer_norm1_weight,
			   layer->layer_norm1_bias, info->layer_norm_eps);
	/* keys and values first, then the queries: all three from one packing of A but in the last block */
	linear(ctx, all, ctx->xn, d, layer->k_proj_weight, OSV_PACKED_LINEAR(index, 1),
		   d, d, layer->k_proj_bias, false, ctx->k, d, OSV_POST_NONE, false);
	linear(ctx, all, ctx->xn, d, layer->v_proj_weight, OSV_PACKED_LINEAR(index, 2),
		   d, d, layer->v_proj_bias, false, ctx->v, d, OSV_POST_NONE, true);
	linear(ctx, rows, ctx->xn, ld, layer->q_proj_weight, OSV_PACKED_LINEAR(index, 0),
		   d, d, layer->q_proj_bias, false, ctx->q, ld, OSV_POST_NONE, !last);
	osv_pool_run(attention_step_fn, &att);
	linear(ctx, rows, ctx->attn, ld, layer->out_proj_weight, OSV_PACKED_LINEAR(index, 3),
		   d, d, layer->out_proj_bias, true, ctx->x, ld, OSV_POST_NONE, false);

	/* MLP: x += fc2(act(fc1(layer_norm2(x)))) */
	layer_norm(ctx->xn, ctx->x, rows, ld, d, layer->layer_norm2_weight,
			   layer->layer_norm2_bias, info->layer_norm_eps);
	linear(ctx, rows, ctx->xn, ld, layer->fc1_weight, OSV_PACKED_LINEAR(index, 4),
		   f, d, layer->fc1_bias, false, ctx->ffn_buf, ldf,
		   info->hidden_act == OSV_ACT_QUICK_GELU ? OSV_POST_QUICK_GELU : OSV_POST_GELU, false);
	linear(ctx, rows, ctx->ffn_buf, ldf, layer->fc2_weight, OSV_PACKED_LINEAR(index, 5),
		   d, f, layer->fc2_bias, true, ctx->x, ld, OSV_POST_NONE, false);
}

/* ---- the MLP branches and the head -------------------------------------- */

/*
 * One MLPCentroid branch on the feature of slot b, into out (branch->out_dim
 * values).  Matrix-vector products, one image at a time, split by output
 * rows over the threads: each output is the same fixed-order dot product
 * whatever the split, and an image's result never depends on which images
 * ran beside it.
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
	matvec(m, branch->fc1_weight, a, branch->fc1_bias, h1, d);
	group_norm(m, h1, branch->gn1_weight, branch->gn1_bias);
	/* MLPCentroid's GELU is nn.GELU(): always the exact one */
	gelu_row(m, h1);
	matvec(a, branch->fc2_weight, m, branch->fc2_bias, h2, h1);
	group_norm(a, h2, branch->gn2_weight, branch->gn2_bias);
	gelu_row(a, h2);
	matvec(out, branch->out_weight, a, branch->out_bias, branch->out_dim, h2);
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
	int			max_k = ctx->ffn > ctx->patch_dim ? ctx->ffn : ctx->patch_dim;
	size_t		scratch;
	osv_status	status;
	double		t0,
				t1;

	ctx->has_result = false;
	ctx->timings.backbone = 0.0;
	ctx->timings.head = 0.0;
	if (images < 1 || images > ctx->max_images)
		return osv_fail(err, OSV_ERR_ARGUMENT, "%d images for a run state of %d",
						images, ctx->max_images);
	if ((int) params->precision < 0 || (int) params->precision >= OSV_NUM_PRECISIONS)
		return osv_fail(err, OSV_ERR_ARGUMENT, "unknown precision %d", (int) params->precision);
	ctx->precision = params->precision;

	/* the threads and their scratch: a B panel of any product, or one head's attention */
	scratch = osv_gemm_scratch_floats(0, max_k > d ? max_k : d);
	if (attention_scratch_floats(ctx) > scratch)
		scratch = attention_scratch_floats(ctx);
	status = osv_pool_prepare(osv_threads(), scratch * sizeof(float), err);
	if (status != OSV_OK)
		return status;

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
		block_forward(ctx, i, images, i == layers - 1);
	}
	/* the feature is the class token, without post_layernorm */
	for (int b = 0; b < images; b++)
		memcpy(ctx->feature + (size_t) b * d, ctx->x + (size_t) b * t * d,
			   (size_t) d * sizeof(float));
	t1 = osv_now();
	ctx->timings.backbone = t1 - t0;

	if (should_abort(params))
		return osv_fail(err, OSV_ERR_ABORTED, "run aborted before the head");

	for (int b = 0; b < images; b++)
	{
		branch_forward(ctx, b, &model->classif, ctx->logits + (size_t) b * ctx->cells);
		branch_forward(ctx, b, &model->reg, ctx->regression + (size_t) b * 2 * ctx->cells);
		head_forward(ctx, b);
	}
	ctx->timings.head = osv_now() - t1;
	ctx->has_result = true;
	return OSV_OK;
}
