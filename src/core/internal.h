/*
 * internal.h: declarations shared between the files of the core, and only
 * them.  Nothing here is part of the public API in osv5m.h.
 *
 * Ownership: the loader (model.c) fills struct osv_model; the network
 * (network.c, context.c) only reads it.  Every weight pointer points either
 * into the read-only mapping of the weights file, model.safetensors or
 * pytorch_model.bin (contiguous, aligned F32 tensors), or into
 * model->converted (F16/BF16/F64 tensors and strided views converted to
 * F32 at load time).  The network never knows which file it was.
 */
#ifndef OSV5M_INTERNAL_H
#define OSV5M_INTERNAL_H

#include "osv5m.h"

#include <pthread.h>

/* ---- errors ---------------------------------------------------------- */

/* Fill err (if not NULL) with status and a printf-style message; returns status. */
osv_status	osv_fail(osv_error *err, osv_status status, const char *fmt,...)
			__attribute__((format(printf, 3, 4)));

/* Set err->detail (codec text); keeps status and message. */
void		osv_fail_detail(osv_error *err, const char *fmt,...)
			__attribute__((format(printf, 2, 3)));

/* ---- size arithmetic with overflow checks ---------------------------- */

/* *out = a * b; false on overflow. */
static inline bool
osv_mul_size(size_t a, size_t b, size_t *out)
{
	return !__builtin_mul_overflow(a, b, out);
}

/* ---- files (file.c) -----------------------------------------------------
 * Every file the core reads is opened here: anything that is not a regular
 * file (a FIFO, a device, a directory) is refused before any call that
 * could block.  label names the file in messages; osv_file_label builds
 * `what "path"` (or `"path"` when what is NULL).  *missing, if not NULL,
 * tells a file that does not exist (ENOENT) from other errors.
 */
void		osv_file_label(char *buf, size_t size, const char *what, const char *path);
/* Open path read-only; *fd (close it) and *size on success. */
osv_status	osv_file_open(const char *path, const char *label, int *fd,
						  uint64_t *size, bool *missing, osv_error *err);
/* Read a whole file of at most cap bytes; *out is malloc'ed, NUL-terminated. */
osv_status	osv_file_read(const char *path, const char *label, size_t cap,
						  uint8_t **out, size_t *len, bool *missing, osv_error *err);
/* Map a read-only file mapping's pages into this process now (file.c says why). */
void		osv_map_populate(void *map, size_t size);
/* Create path anew (whatever had the name is removed) for writing; *fd. */
osv_status	osv_file_create(const char *path, const char *label, int *fd,
							osv_error *err);

/* ---- half precision ---------------------------------------------------- */

float		osv_f16_to_f32(uint16_t h);
float		osv_bf16_to_f32(uint16_t h);

/* ---- JSON (json.c) ------------------------------------------------------
 * A small validating JSON reader for the safetensors header and config.json.
 * The parsed tree is a flat array of nodes owned by osv_json; strings are
 * unescaped copies.  Depth and size are bounded.
 */
typedef enum osv_json_type
{
	OSV_JSON_NULL,
	OSV_JSON_FALSE,
	OSV_JSON_TRUE,
	OSV_JSON_NUMBER,
	OSV_JSON_STRING,
	OSV_JSON_ARRAY,
	OSV_JSON_OBJECT
} osv_json_type;

typedef struct osv_json_node
{
	osv_json_type type;
	double		number;			/* OSV_JSON_NUMBER */
	const char *string;			/* OSV_JSON_STRING, NUL-terminated */
	size_t		string_len;
	const char *key;			/* member name when the parent is an object */
	int			num_children;	/* arrays and objects */
	int			first_child;	/* index of the first child, -1 if none */
	int			next_sibling;	/* index of the next sibling, -1 if none */
	int			parent;			/* -1 for the root */
} osv_json_node;

typedef struct osv_json
{
	osv_json_node *nodes;		/* nodes[0] is the root */
	int			num_nodes;
	char	   *strings;		/* arena of unescaped strings */
} osv_json;

osv_status	osv_json_parse(const char *text, size_t len, osv_json *out,
						   osv_error *err);
void		osv_json_free(osv_json *json);
/* The member named key of object node obj, or -1. */
int			osv_json_get(const osv_json *json, int obj, const char *key);
/* The index-th element of array node arr, or -1. */
int			osv_json_at(const osv_json *json, int arr, int index);

/* ---- safetensors (safetensors.c) --------------------------------------- */

#define OSV_MAX_DIMS 8

typedef struct osv_tensor
{
	const char *name;
	osv_dtype	dtype;
	int			ndim;
	int64_t		shape[OSV_MAX_DIMS];
	int64_t		stride[OSV_MAX_DIMS];	/* in elements; row-major unless ... */
	bool		contiguous;		/* ... this is false (PyTorch views) */
	uint64_t	num_elements;
	const void *data;			/* first element, inside the mapping / buffer */
	size_t		nbytes;			/* bytes from data to the last element's end */
} osv_tensor;

/* Bytes of one element of dtype, 0 for OSV_DTYPE_UNKNOWN. */
size_t		osv_dtype_size(osv_dtype dtype);
/* Binary search of tensors[0..n) sorted by name. */
const osv_tensor *osv_tensor_find(const osv_tensor *tensors, int n, const char *name);
/* Element i (row-major order of the shape) of a float tensor as double. */
double		osv_tensor_get(const osv_tensor *t, uint64_t i);
/* All elements of a float tensor, row-major, converted to F32 into dst. */
void		osv_tensor_to_f32(const osv_tensor *t, float *dst);

typedef struct osv_safetensors
{
	void	   *map;			/* mmap'ed file, or NULL when parsed from memory */
	size_t		map_size;
	osv_json	header;
	osv_tensor *tensors;
	int			num_tensors;
} osv_safetensors;

/*
 * Validate and index a safetensors image held in buf[0..size).  Checks the
 * header length, the JSON, each dtype, shape and byte range against size,
 * that the ranges do not overlap, and shape x dtype size == byte range.
 * Tensors of any dtype are indexed; the model loader decides which it takes.
 */
osv_status	osv_safetensors_parse(const uint8_t *buf, size_t size,
								  osv_safetensors *out, osv_error *err);
/* mmap path read-only and parse it. */
osv_status	osv_safetensors_open(const char *path, osv_safetensors *out,
								 osv_error *err);
void		osv_safetensors_close(osv_safetensors *st);
const osv_tensor *osv_safetensors_find(const osv_safetensors *st,
									   const char *name);

/* ---- zip archives (zip.c) ---------------------------------------------- */

typedef struct osv_zip_entry
{
	const char *name;			/* NUL-terminated, in osv_zip.names */
	uint64_t	header_offset;	/* of the local header */
	uint64_t	data_offset;
	const uint8_t *data;		/* inside the buffer */
	uint64_t	size;
} osv_zip_entry;

typedef struct osv_zip
{
	osv_zip_entry *entries;		/* sorted by name */
	int			num_entries;
	char	   *names;
} osv_zip;

/*
 * Index the stored entries of a zip archive in buf[0..size): ZIP64 aware;
 * compressed, encrypted, overlapping, out-of-range or duplicate entries and
 * truncated archives are errors.
 */
osv_status	osv_zip_parse(const uint8_t *buf, size_t size, osv_zip *out,
						  osv_error *err);
void		osv_zip_free(osv_zip *zip);
const osv_zip_entry *osv_zip_find(const osv_zip *zip, const char *name);

/* ---- PyTorch checkpoints (pytorch.c) ------------------------------------ */

typedef struct osv_pytorch
{
	void	   *map;			/* mmap'ed file, or NULL when parsed from memory */
	size_t		map_size;
	osv_zip		zip;
	osv_tensor *tensors;		/* sorted by name; several may share a storage */
	int			num_tensors;
	char	   *names;			/* arena of the tensor names */
} osv_pytorch;

/*
 * Read a torch.save zip checkpoint of a state dict held in buf[0..size):
 * data.pkl through a restricted unpickler (allow-listed opcodes and
 * globals, nothing executed), tensors checked against their storages.
 */
osv_status	osv_pytorch_parse(const uint8_t *buf, size_t size, osv_pytorch *out,
							  osv_error *err);
osv_status	osv_pytorch_open(const char *path, osv_pytorch *out, osv_error *err);
void		osv_pytorch_close(osv_pytorch *pt);

/* ---- one tensor table over both formats (weights.c) --------------------- */

typedef enum osv_weights_format
{
	OSV_WEIGHTS_SAFETENSORS,
	OSV_WEIGHTS_PYTORCH
} osv_weights_format;

typedef struct osv_weights
{
	osv_weights_format format;
	osv_safetensors st;
	osv_pytorch pt;
	const osv_tensor *tensors;	/* of st or pt, sorted by name */
	int			num_tensors;
	const uint8_t *map;			/* the whole file, read-only */
	size_t		map_size;
} osv_weights;

/* Open path as format; the network only ever sees the tensor table. */
osv_status	osv_weights_open(const char *path, osv_weights_format format,
							 osv_weights *out, osv_error *err);
void		osv_weights_close(osv_weights *w);
const osv_tensor *osv_weights_find(const osv_weights *w, const char *name);

/* SHA-256 of buf[0..size) as 64 lower-case hex digits (sha256.c). */
void		osv_sha256_hex(const uint8_t *buf, size_t size, char hex[65]);
/* for the tests: whether the SHA extensions are used, and either path */
bool		osv_sha256_hardware(void);
void		osv_sha256_hex_with(const uint8_t *buf, size_t size, char hex[65], bool hardware);

/* ---- model configuration (config.c) ----------------------------------- */

typedef struct osv_config
{
	/* 0 / negative = not given: derive from shapes or use the default */
	int			hidden_size;
	int			num_layers;
	int			num_heads;
	int			intermediate_size;
	int			patch_size;
	int			image_size;
	int			hidden_act;		/* -1 unset, else osv_activation */
	double		layer_norm_eps; /* < 0 unset */
	bool		has_mean,
				has_std;
	float		image_mean[3];
	float		image_std[3];
	double		scale_tanh;		/* < 0 unset */
	char		quadtree_file[256]; /* base name of quadtree_path, or "" */
	/* model.backbone.instance.path of the nested form, when given */
	char		backbone_path[128];
	int			backbone_heads; /* heads that path implies; 0: unknown path */
	int			backbone_width; /* its hidden size */
	/* from the nested form, checked against the weights' shapes (0: unset) */
	int			num_cells;		/* model.head.instance.final_dim */
	int			mid_initial;	/* model.mid.instance.initial_dim */
	int			mid_hidden[2];	/* model.mid.instance.hidden_dim */
} osv_config;

/* Defaults of osv5m/baseline; everything "unset". */
void		osv_config_init(osv_config *config);
/* Parse config.json: flat CLIPVisionConfig keys and the authors' nested form. */
osv_status	osv_config_parse(const char *text, size_t len, osv_config *config,
							 osv_error *err);

/* ---- quadtree (quadtree.c) -------------------------------------------- */

/*
 * Parse the quadtree CSV (header cluster_id,min_lat,min_lon,max_lat,max_lon,
 * mean_lat,mean_lon; row i is class i).  *cells is malloc'ed.
 */
osv_status	osv_quadtree_parse(const char *text, size_t len, osv_cell **cells,
							   int *num_cells, osv_error *err);

/* ---- the model (model.c) ----------------------------------------------- */

/* One pre-norm transformer block, under encoder.layers.{i}. */
typedef struct osv_layer
{
	const float *layer_norm1_weight;	/* [D] */
	const float *layer_norm1_bias;	/* [D] */
	const float *q_proj_weight;		/* [D, D] */
	const float *q_proj_bias;		/* [D] */
	const float *k_proj_weight;		/* [D, D] */
	const float *k_proj_bias;		/* [D] */
	const float *v_proj_weight;		/* [D, D] */
	const float *v_proj_bias;		/* [D] */
	const float *out_proj_weight;	/* [D, D] */
	const float *out_proj_bias;		/* [D] */
	const float *layer_norm2_weight;	/* [D] */
	const float *layer_norm2_bias;	/* [D] */
	const float *fc1_weight;		/* [F, D] */
	const float *fc1_bias;			/* [F] */
	const float *fc2_weight;		/* [D, F] */
	const float *fc2_bias;			/* [D] */
} osv_layer;

/* One MLPCentroid branch, mid.classif or mid.reg (nn.Sequential indices). */
typedef struct osv_branch
{
	const float *norm_weight;	/* .0 LayerNorm [D] */
	const float *norm_bias;		/* .0 [D] */
	const float *fc1_weight;	/* .1 Linear [H1, D] */
	const float *fc1_bias;		/* .1 [H1] */
	const float *gn1_weight;	/* .2 GroupNorm(4) [H1] */
	const float *gn1_bias;		/* .2 [H1] */
	const float *fc2_weight;	/* .4 Linear [H2, H1] */
	const float *fc2_bias;		/* .4 [H2] */
	const float *gn2_weight;	/* .5 GroupNorm(4) [H2] */
	const float *gn2_bias;		/* .5 [H2] */
	const float *out_weight;	/* .7 Linear [out_dim, H2] */
	const float *out_bias;		/* .7 [out_dim] */
	int			out_dim;		/* C for classif, 2C for reg */
} osv_branch;

#define OSV_GROUPNORM_GROUPS 4

/*
 * A model's weights packed for the kernels in one precision, from a pack
 * cache file, or nr 0 and matrices NULL: matrices holds the patch
 * embedding, then q, k, v, out, fc1, fc2 of each layer (float for fp32,
 * uint16_t bf16 pairs for bf16), pointers into the read-only mapping map.
 */
typedef struct osv_pack_cache
{
	int			nr;
	const void **matrices;
	void	   *map;
	size_t		size;
} osv_pack_cache;

struct osv_model
{
	osv_model_info info;

	/* backbone.clip.vision_model.embeddings */
	const float *class_embedding;	/* [D] */
	const float *patch_embedding;	/* [D, 3, P, P] = [D, 3 P P] */
	const float *position_embedding;	/* [T, D], T = (S/P)^2 + 1 */
	const float *pre_layrnorm_weight;	/* [D] */
	const float *pre_layrnorm_bias; /* [D] */
	osv_layer  *layers;			/* [num_layers] */

	osv_branch	classif;		/* mid.classif */
	osv_branch	reg;			/* mid.reg */

	osv_cell   *cells;			/* [num_cells], degrees */

	/*
	 * What the hybrid head reads, per cell, normalised (lat / 90, lon / 180):
	 * center (lat, lon), size up, size down; [num_cells][6] doubles.  The
	 * checkpoint's cell buffers when it has them (as the authors' model
	 * uses them), else computed from the CSV exactly as their
	 * init_quadtree does: center = mean / 90, up = max / 90 - center,
	 * down = center - min / 90 (lon: / 180).
	 */
	double	   *cell_norm;

	/* SHA-256 of the weights file, computed on the first request */
	pthread_mutex_t fingerprint_lock;
	char		fingerprint[65];	/* "" until computed */

	/* storage */
	osv_weights weights;
	float	   *converted;		/* F16/BF16 tensors widened to F32, or NULL */

	/* The linear weights packed for the kernels, per precision (packcache.c). */
	osv_pack_cache packs[OSV_NUM_PRECISIONS];
};

/* Index in a pack cache's matrices of the patch embedding, and of linear j (0-5: q k v out fc1 fc2) of layer i. */
#define OSV_PACKED_PATCH 0
#define OSV_PACKED_LINEAR(i, j) (1 + 6 * (i) + (j))

/* Unmap and forget the model's pack cache (packcache.c), if any. */
void		osv_model_drop_pack_cache(osv_model *model);

/* ---- the run state (context.c, network.c) ---------------------------- */

/* Current time in seconds, monotonic. */
double		osv_now(void);

#endif							/* OSV5M_INTERNAL_H */
