/*
 * osv5m.h: the public C API of the osv5m inference core.
 *
 * The core turns image bytes into the coordinates predicted by the OSV-5M
 * baseline model (a CLIP ViT image encoder, two MLP branches and a hybrid
 * quadtree-cell classification and regression head).  It is pure C11 over
 * libjpeg-turbo, libpng and OpenBLAS: it never exits, aborts, logs or
 * longjmps to its caller.  Every fallible function returns an osv_status and
 * fills a caller-owned osv_error with a specific message.
 *
 * Objects:
 *   osv_model    read-only weights (mmap'ed), hyperparameters and quadtree;
 *                shareable by any number of contexts.
 *   osv_context  the run state of one caller: activations allocated once,
 *                for one image per run or a batch of several, and the
 *                results of the last run.  Not thread-safe; use one per
 *                thread.
 */
#ifndef OSV5M_H
#define OSV5M_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C"
{
#endif

#define OSV_VERSION "0.3.0"

/* Default decode limit: 50 megapixels, a little over a 8K x 6K photo. */
#define OSV_DEFAULT_MAX_PIXELS ((uint64_t) 50 * 1000 * 1000)

typedef enum osv_status
{
	OSV_OK = 0,
	OSV_ERR_NOMEM,				/* an allocation failed */
	OSV_ERR_IO,					/* a file could not be opened, read or mapped */
	OSV_ERR_MODEL,				/* the model files are malformed */
	OSV_ERR_IMAGE_UNSUPPORTED,	/* the bytes are not a JPEG or PNG we can read */
	OSV_ERR_IMAGE_CORRUPT,		/* a JPEG or PNG that the codec rejects */
	OSV_ERR_LIMIT,				/* the image exceeds a configured limit */
	OSV_ERR_ABORTED,			/* the abort callback asked to stop */
	OSV_ERR_ARGUMENT			/* the caller passed an invalid argument */
} osv_status;

typedef struct osv_error
{
	osv_status	status;
	char		message[512];	/* one line, lower case, no final period */
	char		detail[512];	/* codec or parser text; may be empty */
} osv_error;

/* A short lower-case name of a status, e.g. "corrupt image". */
const char *osv_status_name(osv_status status);

typedef enum osv_activation
{
	OSV_ACT_GELU,				/* exact GELU, 0.5 x (1 + erf(x / sqrt 2)) */
	OSV_ACT_QUICK_GELU			/* x * sigmoid(1.702 x), OpenAI CLIP */
} osv_activation;

typedef enum osv_dtype
{
	OSV_DTYPE_F32,
	OSV_DTYPE_F16,
	OSV_DTYPE_BF16,
	OSV_DTYPE_F64,
	OSV_DTYPE_I64,
	OSV_DTYPE_I32,
	OSV_DTYPE_I16,
	OSV_DTYPE_I8,
	OSV_DTYPE_U8,
	OSV_DTYPE_BOOL,
	OSV_DTYPE_UNKNOWN
} osv_dtype;

/* "F32", "F16", ... as safetensors spells them. */
const char *osv_dtype_name(osv_dtype dtype);

/* One quadtree cell, in degrees, as in quadtree_10_1000.csv. */
typedef struct osv_cell
{
	double		min_lat,
				min_lon,
				max_lat,
				max_lon,
				mean_lat,
				mean_lon;
} osv_cell;

typedef struct osv_model_info
{
	int			hidden_size;	/* 1024 for ViT-L/14 */
	int			num_layers;		/* 24 */
	int			num_heads;		/* 16 */
	int			intermediate_size;	/* 4096 */
	int			patch_size;		/* 14 */
	int			image_size;		/* 224 */
	int			mid_hidden[2];	/* MLPCentroid hidden dims: 1024, 512 */
	int			num_cells;		/* 11399 */
	osv_activation hidden_act;
	float		layer_norm_eps; /* 1e-5 */
	float		image_mean[3];
	float		image_std[3];
	double		scale_tanh;		/* 1.2 */
	osv_dtype	dtype;			/* dtype of the stored matrices */
	uint64_t	file_size;		/* bytes of the weights file */
	const char *weights_format; /* "safetensors" or "pytorch" */
	const char *cells_source;	/* "quadtree" (a CSV) or "checkpoint" (its cell buffers) */
	uint64_t	num_parameters; /* parameters actually used */
	double		gflop_per_image;	/* multiply-adds x 2 of one forward pass */
	char		weights_path[1024];
	char		quadtree_path[1024];	/* the CSV read; empty when none was */
	char		config_path[1024];	/* empty when there is no config.json */
	char		pack_cache_path[1024];	/* the fp32 pack cache file in use, or empty */
	char		pack_cache_path_bf16[1024]; /* the bf16 one, or empty */
	char		pack_cache_path_int8[1024]; /* the int8 one, or empty */
} osv_model_info;

typedef struct osv_model osv_model;
typedef struct osv_context osv_context;

/* Return true to stop the current run with OSV_ERR_ABORTED. */
typedef bool (*osv_abort_callback) (void *data);

/*
 * The arithmetic of the matrix products with weights (the patch embedding
 * and the six linears of each block).  fp32 is the published model's.
 * bf16: the weights and the activations entering those products are
 * rounded to bfloat16 (to nearest, ties to even) and the products summed in
 * float32, as AVX512_BF16's vdpbf16ps does.  int8 (the six linears of each
 * block; the patch embedding stays fp32): each weight row (output channel)
 * and each activation row (token) entering a product is quantized to 8
 * bits with its own scale (its largest magnitude maps to 127), the
 * products are summed exactly in 32-bit integers, as AVX512_VNNI's
 * vpdpbusd does, then scaled back to float32.  Both are native where the
 * CPU has the instruction and emulated bit for bit elsewhere; attention,
 * norms, GELU, softmax, residuals and the head stay in float32.  bf16 and
 * int8 change the results.
 */
typedef enum osv_precision
{
	OSV_PRECISION_FP32,
	OSV_PRECISION_BF16,
	OSV_PRECISION_INT8
} osv_precision;

#define OSV_NUM_PRECISIONS 3

/* "fp32", "bf16" or "int8". */
const char *osv_precision_name(osv_precision precision);

/* The precision a name spells ("fp32", "bf16", "int8"); false if none. */
bool		osv_precision_parse(const char *name, osv_precision *out);

/* Whether this CPU runs the precision's products natively (else emulated). */
bool		osv_precision_native(osv_precision precision);

typedef struct osv_params
{
	uint64_t	max_pixels;		/* decode limit on width x height */
	osv_abort_callback abort_callback;	/* polled between transformer blocks */
	void	   *abort_data;
	osv_precision precision;	/* default OSV_PRECISION_FP32 */
} osv_params;

osv_params	osv_default_params(void);

/* ---- model ---------------------------------------------------------- */

/*
 * Open a model directory: the weights, model.safetensors or, when there is
 * none, pytorch_model.bin (the file osv5m/baseline publishes); an optional
 * config.json (flat keys or the authors' nested form); and the quadtree
 * CSV (quadtree_10_1000.csv, or the base name config.json gives in
 * quadtree_path), which is optional when the weights carry the cell
 * buffers head.cell_center/cell_size_up/cell_size_down (then a CSV that is
 * present must agree with them).  quadtree_path, if not NULL, names the
 * CSV to read.  The weights are mmap'ed read-only; contiguous F32 tensors
 * are used in place, others (F16, BF16, F64, strided) converted to F32
 * once, in private memory.
 */
osv_status	osv_model_open(const char *dir, const char *quadtree_path,
						   osv_model **out, osv_error *err);
void		osv_model_close(osv_model *model);
const osv_model_info *osv_model_get_info(const osv_model *model);
const osv_cell *osv_model_cells(const osv_model *model, int *num_cells);

/*
 * Use (and first write, when missing or stale) the file in directory dir
 * that holds the model's linear weights packed for this CPU's kernels in
 * the given precision (one file per precision), so
 * that the matrix products read them in place instead of packing them on
 * every product (packcache.c).  The file is shared by every process
 * through the page cache.  dir must be a directory owned by this process's
 * user and writable by no one else; the file is named after the weights
 * file's identity (device, inode, size, modification and change times),
 * the layout and the panel width, written under a temporary name and
 * renamed, and checked on every use.  On an error the model is unchanged
 * and packs on the fly, as without a cache.
 */
osv_status	osv_model_use_pack_cache(osv_model *model, const char *dir,
									 osv_precision precision, osv_error *err);

/*
 * The SHA-256 of the weights file as 64 hex digits (what sha256sum prints),
 * read through the model's mapping: computed on the first call (seconds
 * for 1.3 GB), then remembered; safe from several threads.
 */
const char *osv_model_fingerprint(osv_model *model);

/*
 * Write the open model to out_dir (which must exist) as model.safetensors
 * (every tensor the network reads, as F32, plus the cell buffers as F64),
 * config.json (flat keys) and quadtree_10_1000.csv.  Opening out_dir gives
 * bit-identical predictions.  Existing files are replaced.
 */
osv_status	osv_model_convert(const osv_model *model, const char *out_dir,
							  osv_error *err);

/* ---- files ----------------------------------------------------------- */

/*
 * Read a whole regular file of at most max_bytes into a malloc'ed buffer
 * (free() it), NUL-terminated after *size bytes.  A FIFO, a device or a
 * directory is refused with OSV_ERR_IO ("file is not a regular file")
 * without ever blocking on it; messages call the file "file", the caller
 * knows its name.  The model loader opens its files the same way.
 */
osv_status	osv_read_file(const char *path, size_t max_bytes, uint8_t **data,
						  size_t *size, osv_error *err);

/* ---- images ---------------------------------------------------------- */

/* An 8-bit RGB image, rows top to bottom, pixels interleaved R G B. */
typedef struct osv_image
{
	int			width;
	int			height;
	uint8_t    *rgb;			/* malloc'ed, width * height * 3 bytes */
} osv_image;

/*
 * Decode a JPEG or PNG (sniffed from the bytes) and convert it to RGB as
 * PIL.Image.convert("RGB") does.  max_pixels is checked before any large
 * allocation.  On error *out is left empty.
 */
osv_status	osv_image_decode(const uint8_t *data, size_t size, uint64_t max_pixels,
							 osv_image *out, osv_error *err);
void		osv_image_free(osv_image *image);

/* PIL's Image.resize((width, height), BICUBIC) of an RGB image. */
osv_status	osv_image_resize(const osv_image *src, int width, int height,
							 osv_image *out, osv_error *err);

/*
 * The test transform: resize the shorter side to size (bicubic, antialiased,
 * as PIL), center crop size x size (torchvision's rounding), scale to [0, 1]
 * and normalize.  out holds 3 * size * size floats, CHW.
 */
osv_status	osv_preprocess(const osv_image *image, int size, const float mean[3],
						   const float std[3], float *out, osv_error *err);

/* ---- inference ------------------------------------------------------- */

/* Allocate the run state for model, one image per run (all or nothing). */
osv_status	osv_context_new(const osv_model *model, osv_context **out,
							osv_error *err);

/*
 * The same for up to max_images images per run (1 to 64).  The activations
 * grow with it: about 12 MB per image for ViT-L/14.
 */
osv_status	osv_context_new_batch(const osv_model *model, int max_images,
								  osv_context **out, osv_error *err);
void		osv_context_free(osv_context *ctx);
int			osv_context_max_images(const osv_context *ctx);

/* Decode, preprocess and run the network on encoded image bytes. */
osv_status	osv_run_image(osv_context *ctx, const uint8_t *data, size_t size,
						  const osv_params *params, osv_error *err);

/*
 * Decode and preprocess n images (1 <= n <= max_images), then run the
 * network once over all of them: each weight matrix is then read once per
 * run instead of once per image, which is faster per image.  An image's
 * result is the one osv_run_image gives: bit for bit with OpenBLAS's
 * AVX-512 kernels at ViT-L/14's sizes, else to float32 rounding (see
 * network.c).
 *
 * image_errs[i] tells how image i fared: an image that cannot be decoded
 * (any osv_image_decode or osv_preprocess status) gets its error there and
 * no result, and the others still run.  The return value is about the run
 * as a whole: OSV_OK when the network ran on every decodable image (also
 * when there was none), else the status that stopped it (OSV_ERR_ABORTED,
 * OSV_ERR_ARGUMENT), described in *err; then no image has a result.
 */
osv_status	osv_run_images(osv_context *ctx, int n, const uint8_t *const data[],
						   const size_t sizes[], const osv_params *params,
						   osv_error image_errs[], osv_error *err);

/* Run the network on a preprocessed tensor of 3 * image_size^2 floats. */
osv_status	osv_run_pixels(osv_context *ctx, const float *pixels,
						   const osv_params *params, osv_error *err);

/* One candidate cell and the point regressed inside it, in degrees. */
typedef struct osv_prediction
{
	int			cell;
	double		probability;	/* softmax of the classification logits */
	double		lat;
	double		lon;
} osv_prediction;

/*
 * The k most likely cells of the last run, best first (ties: lower cell
 * first); out[0] is the model's prediction.  Returns how many were written,
 * min(k, num_cells), or 0 when the run gave no result.
 */
int			osv_context_topk(const osv_context *ctx, int k, osv_prediction *out);

/* The prediction for one given cell of the last run (cell -1 when none). */
osv_prediction osv_context_cell(const osv_context *ctx, int cell);

/* The same for input `image` of the last osv_run_images (0 when it has no result). */
int			osv_context_topk_at(const osv_context *ctx, int image, int k,
								osv_prediction *out);
osv_prediction osv_context_cell_at(const osv_context *ctx, int image, int cell);

/*
 * Results of the last run, valid until the next run or osv_context_free;
 * after a batch, those of its first image that reached the network.
 */
const float *osv_context_pixels(const osv_context *ctx);	/* 3 x S x S */
const float *osv_context_feature(const osv_context *ctx);	/* hidden_size */
const float *osv_context_logits(const osv_context *ctx);	/* num_cells */
const float *osv_context_regression(const osv_context *ctx);	/* 2 x num_cells */

/* Seconds spent in each stage by the last run (summed over a batch's images). */
typedef struct osv_timings
{
	double		decode;
	double		preprocess;
	double		backbone;
	double		head;			/* both MLP branches and the hybrid head */
} osv_timings;

osv_timings osv_context_timings(const osv_context *ctx);

/* ---- BLAS ---------------------------------------------------------- */

/*
 * Threads of the forward pass in this process (default 1): the pool starts
 * or resizes on the next run, in the process that runs it.
 */
void		osv_set_threads(int threads);
int			osv_threads(void);

/* The matrix-product kernels this CPU runs: "avx512", "avx2" or "portable". */
const char *osv_kernels_name(void);

#ifdef __cplusplus
}
#endif

#endif							/* OSV5M_H */
