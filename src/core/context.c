/*
 * context.c: the run state of one caller (osv_context): allocation, the
 * entry points (encoded image bytes, one or a batch, or a preprocessed
 * tensor), and the accessors of the last run's results.
 *
 * Invariants: every activation lives in one 64-byte aligned block sized
 * from the model's info and the batch capacity with overflow checks,
 * allocated all or nothing in osv_context_new_batch, so that a run never
 * allocates (except for the decoded image, freed on every path).  Results
 * are valid only when has_result is true, i.e. after a run that returned
 * OSV_OK, and only for the inputs that reached the network (slot[i] >= 0);
 * a failed or aborted run leaves the context reusable.  The model must
 * outlive the context.
 */
#include "network.h"

#include "gemm.h"

#include <limits.h>
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

/* Most images one run state may hold: bounds its size arithmetic. */
#define MAX_BATCH 64

/* The run state of one image at a time. */
osv_status
osv_context_new(const osv_model *model, osv_context **out, osv_error *err)
{
	return osv_context_new_batch(model, 1, out, err);
}

/* Allocate the run state of model for max_images images per run, in one block. */
osv_status
osv_context_new_batch(const osv_model *model, int max_images,
					  osv_context **out, osv_error *err)
{
	osv_context *ctx;
	osv_status	status;
	size_t		total = 0;
	size_t		t,
				d,
				mid,
				nb;
	int			packed_k;
	char	   *base;

	*out = NULL;
	if (model == NULL)
		return osv_fail(err, OSV_ERR_ARGUMENT, "model is NULL");
	if (max_images < 1 || max_images > MAX_BATCH)
		return osv_fail(err, OSV_ERR_ARGUMENT,
						"images per run must be between 1 and %d, got %d",
						MAX_BATCH, max_images);
	ctx = calloc(1, sizeof(*ctx));
	if (ctx == NULL)
		return osv_fail(err, OSV_ERR_NOMEM, "out of memory allocating the run state");
	ctx->model = model;
	ctx->max_images = max_images;
	status = set_dimensions(ctx, &model->info, err);
	if (status != OSV_OK)
	{
		free(ctx);
		return status;
	}

	nb = (size_t) max_images;
	t = (size_t) ctx->tokens;
	d = (size_t) ctx->hidden;
	/*
	 * The matrix products take int sizes and leading dimensions, up to all
	 * the rows of a run times F (and the last block steps T rows at a time)
	 */
	if (nb * t * (size_t) ctx->ffn > INT_MAX || nb * t * d > INT_MAX)
	{
		free(ctx);
		return osv_fail(err, OSV_ERR_MODEL,
						"model dimensions are out of range for %d images per run",
						max_images);
	}
	packed_k = ctx->ffn > ctx->patch_dim ? ctx->ffn : ctx->patch_dim;
	if ((int) d > packed_k)
		packed_k = (int) d;
	mid = d;
	if ((size_t) ctx->mid1 > mid)
		mid = ctx->mid1;
	if ((size_t) ctx->mid2 > mid)
		mid = ctx->mid2;
	{
		size_t		size = (size_t) model->info.image_size;
		buffer_spec specs[] = {
			{(void **) &ctx->pixels, nb * 3 * size * size, sizeof(float)},
			{(void **) &ctx->patches, (t - 1) * (size_t) ctx->patch_dim, sizeof(float)},
			{(void **) &ctx->x, nb * t * d, sizeof(float)},
			{(void **) &ctx->xn, nb * t * d, sizeof(float)},
			{(void **) &ctx->q, nb * t * d, sizeof(float)},
			{(void **) &ctx->k, nb * t * d, sizeof(float)},
			{(void **) &ctx->v, nb * t * d, sizeof(float)},
			{(void **) &ctx->attn, nb * t * d, sizeof(float)},
			{(void **) &ctx->packed_a, osv_gemm_packed_a_floats((int) (nb * t), packed_k), sizeof(float)},
			{(void **) &ctx->ffn_buf, nb * t * (size_t) ctx->ffn, sizeof(float)},
			{(void **) &ctx->feature, nb * d, sizeof(float)},
			{(void **) &ctx->mid_a, mid, sizeof(float)},
			{(void **) &ctx->mid_b, mid, sizeof(float)},
			{(void **) &ctx->logits, nb * (size_t) ctx->cells, sizeof(float)},
			{(void **) &ctx->regression, nb * 2 * (size_t) ctx->cells, sizeof(float)},
			{(void **) &ctx->probs, nb * (size_t) ctx->cells, sizeof(double)},
			{(void **) &ctx->order, nb * (size_t) ctx->cells, sizeof(int)},
			{(void **) &ctx->cell, nb, sizeof(int)},
			{(void **) &ctx->slot, nb, sizeof(int)},
		};
		size_t		nspecs = sizeof(specs) / sizeof(specs[0]);

		/*
		 * the counts above cannot overflow: set_dimensions bounds each
		 * dimension and MAX_BATCH the image count; add_buffer checks the
		 * byte sizes anyway
		 */
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

/*
 * Decode and preprocess one image into pixel slot `slot`, adding to the
 * decode and preprocess timings; the decoded image is freed on every path.
 */
static osv_status
prepare_image(osv_context *ctx, int slot, const uint8_t *data, size_t size,
			  const osv_params *params, osv_error *err)
{
	size_t		pixels = 3 * (size_t) ctx->model->info.image_size * ctx->model->info.image_size;
	osv_image	image;
	osv_status	status;
	double		t0,
				t1;

	memset(&image, 0, sizeof(image));
	t0 = osv_now();
	status = osv_image_decode(data, size, params->max_pixels, &image, err);
	t1 = osv_now();
	ctx->timings.decode += t1 - t0;
	if (status == OSV_OK)
		status = osv_preprocess(&image, ctx->model->info.image_size,
								ctx->model->info.image_mean,
								ctx->model->info.image_std,
								ctx->pixels + (size_t) slot * pixels, err);
	/* the decoder leaves image empty on error; free is then a no-op */
	osv_image_free(&image);
	ctx->timings.preprocess += osv_now() - t1;
	return status;
}

/*
 * Decode and preprocess each image into the next free slot, then run the
 * network once over all the slots filled: see osv5m.h.
 */
osv_status
osv_run_images(osv_context *ctx, int n, const uint8_t *const data[],
			   const size_t sizes[], const osv_params *params,
			   osv_error image_errs[], osv_error *err)
{
	osv_params	defaults = osv_default_params();
	int			images = 0;

	if (ctx == NULL || data == NULL || sizes == NULL || image_errs == NULL)
		return osv_fail(err, OSV_ERR_ARGUMENT, "context, images or errors is NULL");
	if (n < 1 || n > ctx->max_images)
		return osv_fail(err, OSV_ERR_ARGUMENT,
						"%d images for a run state of at most %d", n, ctx->max_images);
	if (params == NULL)
		params = &defaults;
	ctx->has_result = false;
	ctx->inputs = n;
	memset(&ctx->timings, 0, sizeof(ctx->timings));

	for (int i = 0; i < n; i++)
	{
		ctx->slot[i] = -1;
		image_errs[i].status = OSV_OK;
		image_errs[i].message[0] = '\0';
		image_errs[i].detail[0] = '\0';
		if (data[i] == NULL && sizes[i] > 0)
			osv_fail(&image_errs[i], OSV_ERR_ARGUMENT, "image data is NULL");
		else if (prepare_image(ctx, images, data[i], sizes[i], params,
							   &image_errs[i]) == OSV_OK)
			ctx->slot[i] = images++;
	}
	if (images == 0)
		return OSV_OK;			/* nothing to run: each input has its error */
	return osv_network_forward(ctx, images, params, err);
}

/* Decode, preprocess and run one image: a batch of one. */
osv_status
osv_run_image(osv_context *ctx, const uint8_t *data, size_t size,
			  const osv_params *params, osv_error *err)
{
	osv_error	image_err;
	osv_status	status;

	status = osv_run_images(ctx, 1, &data, &size, params, &image_err, err);
	if (status == OSV_OK && image_err.status != OSV_OK)
	{
		if (err != NULL)
			*err = image_err;
		return image_err.status;
	}
	return status;
}

/* Run the network on a preprocessed tensor, in slot 0. */
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
	ctx->inputs = 1;
	ctx->slot[0] = 0;
	memset(&ctx->timings, 0, sizeof(ctx->timings));
	size = (size_t) ctx->model->info.image_size;
	/* memmove: the caller may pass osv_context_pixels() of this context */
	memmove(ctx->pixels, pixels, 3 * size * size * sizeof(float));
	return osv_network_forward(ctx, 1, params, err);
}

/* The slot holding input `image` of the last run, or -1 when it has no result. */
static int
result_slot(const osv_context *ctx, int image)
{
	if (ctx == NULL || !ctx->has_result || image < 0 || image >= ctx->inputs)
		return -1;
	return ctx->slot[image];
}

/* Probability and point of one cell for input image; cell -1 and NaNs when there is none. */
osv_prediction
osv_context_cell_at(const osv_context *ctx, int image, int cell)
{
	osv_prediction pred;
	int			b = result_slot(ctx, image);

	pred.cell = -1;
	pred.probability = NAN;
	pred.lat = NAN;
	pred.lon = NAN;
	if (b < 0 || cell < 0 || cell >= ctx->cells)
		return pred;
	pred.cell = cell;
	pred.probability = ctx->probs[(size_t) b * ctx->cells + cell];
	osv_network_cell_point(ctx, b, cell, &pred.lat, &pred.lon);
	return pred;
}

/* The k best cells of input image, from the order sorted by the run. */
int
osv_context_topk_at(const osv_context *ctx, int image, int k, osv_prediction *out)
{
	int			b = result_slot(ctx, image);
	const int  *order;
	int			n;

	if (b < 0 || k <= 0 || out == NULL)
		return 0;
	order = ctx->order + (size_t) b * ctx->cells;
	n = k < ctx->cells ? k : ctx->cells;
	/* order was sorted once per run (network.c), so this is a copy */
	for (int i = 0; i < n; i++)
		out[i] = osv_context_cell_at(ctx, image, order[i]);
	return n;
}

/* The prediction for one cell of the first input. */
osv_prediction
osv_context_cell(const osv_context *ctx, int cell)
{
	return osv_context_cell_at(ctx, 0, cell);
}

/* The k best cells of the first input. */
int
osv_context_topk(const osv_context *ctx, int k, osv_prediction *out)
{
	return osv_context_topk_at(ctx, 0, k, out);
}

/* How many images one run of this context may hold. */
int
osv_context_max_images(const osv_context *ctx)
{
	return ctx->max_images;
}

/* The accessors below give slot 0: the first image of the last run that reached the network. */

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
