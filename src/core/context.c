/*
 * context.c: the run state of one caller (osv_context): allocation, the
 * two entry points (encoded image bytes, or a preprocessed tensor), and
 * the accessors of the last run's results.
 *
 * Invariants: every activation lives in one 64-byte aligned block sized
 * from the model's info with overflow checks, allocated all or nothing in
 * osv_context_new, so that a run never allocates (except for the decoded
 * image, freed on every path).  Results are valid only when has_result is
 * true, i.e. after a run that returned OSV_OK; a failed or aborted run leaves
 * the context reusable.  The model must outlive the context.
 */
#include "network.h"

#include "blas.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Alignment of each buffer: one cache line, one AVX-512 register. */
#define BUFFER_ALIGN 64

/* A buffer to carve: where to store its pointer and its size in bytes. */
typedef struct buffer_spec
{
	void	  **ptr;
	size_t		count;			/* elements */
	size_t		elem_size;
} buffer_spec;

/* *total += count * elem_size rounded up to BUFFER_ALIGN; false on overflow. */
static bool
add_buffer(size_t *total, size_t count, size_t elem_size)
{
	size_t		bytes;

	if (!osv_mul_size(count, elem_size, &bytes) ||
		bytes > SIZE_MAX - BUFFER_ALIGN)
		return false;
	bytes = (bytes + BUFFER_ALIGN - 1) / BUFFER_ALIGN * BUFFER_ALIGN;
	if (*total > SIZE_MAX - bytes)
		return false;
	*total += bytes;
	return true;
}

/* Check the dimensions the network relies on and cache them in ctx. */
static osv_status
set_dimensions(osv_context *ctx, const osv_model_info *info, osv_error *err)
{
	if (info->hidden_size <= 0 || info->num_layers < 0 || info->num_heads <= 0 ||
		info->intermediate_size <= 0 || info->patch_size <= 0 ||
		info->image_size <= 0 || info->num_cells <= 0 ||
		info->mid_hidden[0] <= 0 || info->mid_hidden[1] <= 0)
		return osv_fail(err, OSV_ERR_MODEL, "model has a non-positive dimension");
	if (info->hidden_size % info->num_heads != 0)
		return osv_fail(err, OSV_ERR_MODEL,
						"hidden size %d is not divisible by %d attention heads",
						info->hidden_size, info->num_heads);
	if (info->image_size % info->patch_size != 0)
		return osv_fail(err, OSV_ERR_MODEL,
						"image size %d is not a multiple of patch size %d",
						info->image_size, info->patch_size);
	for (int i = 0; i < 2; i++)
		if (info->mid_hidden[i] % OSV_GROUPNORM_GROUPS != 0)
			return osv_fail(err, OSV_ERR_MODEL,
							"mid hidden size %d is not divisible by %d groups",
							info->mid_hidden[i], OSV_GROUPNORM_GROUPS);
	/* int index arithmetic below: keep every product of two dims in range */
	if (info->image_size > 4096 || info->hidden_size > 65536 ||
		info->intermediate_size > 262144 || info->num_cells > (1 << 24))
		return osv_fail(err, OSV_ERR_MODEL, "model dimensions are out of range");

	ctx->hidden = info->hidden_size;
	ctx->grid = info->image_size / info->patch_size;
	ctx->tokens = ctx->grid * ctx->grid + 1;
	ctx->patch_dim = 3 * info->patch_size * info->patch_size;
	ctx->ffn = info->intermediate_size;
	ctx->heads = info->num_heads;
	ctx->head_dim = info->hidden_size / info->num_heads;
	ctx->mid1 = info->mid_hidden[0];
	ctx->mid2 = info->mid_hidden[1];
	ctx->cells = info->num_cells;
	if (ctx->model->classif.out_dim != ctx->cells ||
		ctx->model->reg.out_dim != 2 * ctx->cells)
		return osv_fail(err, OSV_ERR_MODEL,
						"head sizes %d and %d do not match %d cells",
						ctx->model->classif.out_dim, ctx->model->reg.out_dim,
						ctx->cells);
	return OSV_OK;
}

/* Allocate the run state of model in one block, all or nothing. */
osv_status
osv_context_new(const osv_model *model, osv_context **out, osv_error *err)
{
	osv_context *ctx;
	osv_status	status;
	size_t		total = 0;
	size_t		t,
				d,
				mid;
	char	   *base;

	*out = NULL;
	if (model == NULL)
		return osv_fail(err, OSV_ERR_ARGUMENT, "model is NULL");
	/* before any matrix product: see blas.c */
	status = osv_blas_load(err);
	if (status != OSV_OK)
		return status;

	ctx = calloc(1, sizeof(*ctx));
	if (ctx == NULL)
		return osv_fail(err, OSV_ERR_NOMEM, "out of memory allocating the run state");
	ctx->model = model;
	status = set_dimensions(ctx, &model->info, err);
	if (status != OSV_OK)
	{
		free(ctx);
		return status;
	}

	t = (size_t) ctx->tokens;
	d = (size_t) ctx->hidden;
	mid = d;
	if ((size_t) ctx->mid1 > mid)
		mid = ctx->mid1;
	if ((size_t) ctx->mid2 > mid)
		mid = ctx->mid2;
	{
		size_t		size = (size_t) model->info.image_size;
		buffer_spec specs[] = {
			{(void **) &ctx->pixels, 3 * size * size, sizeof(float)},
			{(void **) &ctx->patches, (t - 1) * (size_t) ctx->patch_dim, sizeof(float)},
			{(void **) &ctx->x, t * d, sizeof(float)},
			{(void **) &ctx->xn, t * d, sizeof(float)},
			{(void **) &ctx->q, t * d, sizeof(float)},
			{(void **) &ctx->k, t * d, sizeof(float)},
			{(void **) &ctx->v, t * d, sizeof(float)},
			{(void **) &ctx->attn, t * d, sizeof(float)},
			{(void **) &ctx->scores, t * t, sizeof(float)},
			{(void **) &ctx->ffn_buf, t * (size_t) ctx->ffn, sizeof(float)},
			{(void **) &ctx->feature, d, sizeof(float)},
			{(void **) &ctx->mid_a, mid, sizeof(float)},
			{(void **) &ctx->mid_b, mid, sizeof(float)},
			{(void **) &ctx->logits, (size_t) ctx->cells, sizeof(float)},
			{(void **) &ctx->regression, 2 * (size_t) ctx->cells, sizeof(float)},
			{(void **) &ctx->probs, (size_t) ctx->cells, sizeof(double)},
			{(void **) &ctx->order, (size_t) ctx->cells, sizeof(int)},
		};
		size_t		nspecs = sizeof(specs) / sizeof(specs[0]);

		/* the counts above cannot overflow: set_dimensions bounds each factor */
		for (size_t i = 0; i < nspecs; i++)
			if (!add_buffer(&total, specs[i].count, specs[i].elem_size))
			{
				free(ctx);
				return osv_fail(err, OSV_ERR_NOMEM,
								"run state size overflows size_t");
			}
		if (posix_memalign(&ctx->block, BUFFER_ALIGN, total) != 0)
		{
			free(ctx);
			return osv_fail(err, OSV_ERR_NOMEM,
							"out of memory allocating %zu bytes of run state", total);
		}
		/* zeroed so that reading results before any run is defined */
		memset(ctx->block, 0, total);
		base = ctx->block;
		for (size_t i = 0; i < nspecs; i++)
		{
			size_t		offset = 0;

			*specs[i].ptr = base;
			add_buffer(&offset, specs[i].count, specs[i].elem_size);
			base += offset;
		}
	}
	*out = ctx;
	return OSV_OK;
}

/* Free the run state; the model is not touched. */
void
osv_context_free(osv_context *ctx)
{
	if (ctx == NULL)
		return;
	free(ctx->block);
	free(ctx);
}

/* Decode, preprocess into ctx->pixels and run; the image is freed on every path. */
osv_status
osv_run_image(osv_context *ctx, const uint8_t *data, size_t size,
			  const osv_params *params, osv_error *err)
{
	osv_params	defaults = osv_default_params();
	osv_image	image;
	osv_status	status;
	double		t0,
				t1,
				t2;

	if (ctx == NULL || (data == NULL && size > 0))
		return osv_fail(err, OSV_ERR_ARGUMENT, "context or image data is NULL");
	if (params == NULL)
		params = &defaults;
	ctx->has_result = false;
	memset(&ctx->timings, 0, sizeof(ctx->timings));
	memset(&image, 0, sizeof(image));

	t0 = osv_now();
	status = osv_image_decode(data, size, params->max_pixels, &image, err);
	t1 = osv_now();
	ctx->timings.decode = t1 - t0;
	if (status != OSV_OK)
	{
		/* the decoder leaves image empty on error; free is then a no-op */
		osv_image_free(&image);
		return status;
	}
	status = osv_preprocess(&image, ctx->model->info.image_size,
							ctx->model->info.image_mean,
							ctx->model->info.image_std, ctx->pixels, err);
	osv_image_free(&image);
	t2 = osv_now();
	ctx->timings.preprocess = t2 - t1;
	if (status != OSV_OK)
		return status;
	return osv_network_forward(ctx, params, err);
}

/* Run the network on a preprocessed tensor. */
osv_status
osv_run_pixels(osv_context *ctx, const float *pixels, const osv_params *params,
			   osv_error *err)
{
	osv_params	defaults = osv_default_params();
	size_t		size;

	if (ctx == NULL || pixels == NULL)
		return osv_fail(err, OSV_ERR_ARGUMENT, "context or pixels is NULL");
	if (params == NULL)
		params = &defaults;
	ctx->has_result = false;
	memset(&ctx->timings, 0, sizeof(ctx->timings));
	size = (size_t) ctx->model->info.image_size;
	/* memmove: the caller may pass osv_context_pixels() of this context */
	memmove(ctx->pixels, pixels, 3 * size * size * sizeof(float));
	return osv_network_forward(ctx, params, err);
}

/* Probability and point of one cell; cell -1 and NaNs when there is none. */
osv_prediction
osv_context_cell(const osv_context *ctx, int cell)
{
	osv_prediction pred;

	pred.cell = -1;
	pred.probability = NAN;
	pred.lat = NAN;
	pred.lon = NAN;
	if (ctx == NULL || !ctx->has_result || cell < 0 || cell >= ctx->cells)
		return pred;
	pred.cell = cell;
	pred.probability = ctx->probs[cell];
	osv_network_cell_point(ctx, cell, &pred.lat, &pred.lon);
	return pred;
}

/* The k best cells of the last run, from the order sorted by the run. */
int
osv_context_topk(const osv_context *ctx, int k, osv_prediction *out)
{
	int			n;

	if (ctx == NULL || !ctx->has_result || k <= 0 || out == NULL)
		return 0;
	n = k < ctx->cells ? k : ctx->cells;
	/* order was sorted once per run (network.c), so this is a copy */
	for (int i = 0; i < n; i++)
		out[i] = osv_context_cell(ctx, ctx->order[i]);
	return n;
}

/* The preprocessed input of the last run. */
const float *
osv_context_pixels(const osv_context *ctx)
{
	return ctx->pixels;
}

/* The class-token feature of the last run. */
const float *
osv_context_feature(const osv_context *ctx)
{
	return ctx->feature;
}

/* The classification logits of the last run. */
const float *
osv_context_logits(const osv_context *ctx)
{
	return ctx->logits;
}

/* The regression outputs of the last run, (lat, lon) per cell. */
const float *
osv_context_regression(const osv_context *ctx)
{
	return ctx->regression;
}

/* Seconds per stage of the last run. */
osv_timings
osv_context_timings(const osv_context *ctx)
{
	return ctx->timings;
}
