/*
 * model.c: open a model directory and bind its weights into struct
 * osv_model (see internal.h for the struct, docs/MODEL.md sections 1 and 2 for
 * the names and the hyperparameters).
 *
 * Which weights file: model.safetensors when the directory has one, else
 * pytorch_model.bin (what osv5m/baseline publishes).  Both are read into
 * the same tensor table (weights.c), so nothing below knows which it was.
 *
 * Steps: read config.json if there is one; mmap the weights; find
 * the name prefix by probing for class_embedding; derive the shapes (D
 * from class_embedding, layers by counting encoder.layers.N, F from fc1,
 * P from patch_embedding, the image size from the config or from the rows
 * of position_embedding, the MLP widths and the cell count from the mid
 * branches); then check EVERY tensor the network reads against those
 * shapes and dtypes before pointing at it; finally the quadtree: the CSV,
 * whose row count must equal the cell count, and/or the checkpoint's cell
 * buffers (head.cell_center, cell_size_up, cell_size_down: float64 [C, 2],
 * normalised), which the head then uses as the authors' model does; when
 * both are there they must agree.
 *
 * Attention heads cannot be derived from shapes: they come from
 * config.json, else 16 when D == 1024 (osv5m/baseline), else D / 64 (the
 * head size of every CLIP ViT) when D is a multiple of 64; otherwise the
 * config must say.
 *
 * Invariants of an open model: every weight pointer addresses exactly as
 * many floats as its shape says, in the read-only mapping (F32, 4-byte
 * aligned, contiguous) or in model->converted (F16/BF16/F64 converted,
 * strided views gathered, misaligned F32 copied); tensors the network does not use (position_ids,
 * post_layernorm, ...) are ignored.  Opening is all or nothing: on error
 * everything is freed and *out stays NULL.
 */
#include "internal.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* safetensors stores little-endian data, which the core reads in place */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "osv5m reads safetensors data in place and needs a little-endian machine"
#endif

#define CONFIG_MAX_BYTES ((size_t) 1 << 20)
#define QUADTREE_MAX_BYTES ((size_t) 256 << 20)
#define DEFAULT_QUADTREE "quadtree_10_1000.csv"
#define SAFETENSORS_NAME "model.safetensors"
#define PYTORCH_NAME "pytorch_model.bin"
/* a CSV and the checkpoint's buffers agree within this, in degrees */
#define CELL_AGREE_DEG 1e-6
/* keeps every derived size far from int overflow */
#define MODEL_MAX_DIM (1 << 20)
#define MODEL_MAX_LAYERS 10000

/* Backbone name prefixes, tried in order (docs/MODEL.md section 1). */
static const char *const backbone_prefixes[] = {
	"backbone.clip.vision_model.",
	"model.backbone.clip.vision_model.",
	"vision_model.",
	"",
	/* transformers 5 drops the vision_model level */
	"backbone.clip.",
	"model.backbone.clip.",
};

static const char *const mid_prefixes[] = {"mid.", "model.mid."};

/* A weight the network reads and where its pointer goes. */
typedef struct binding
{
	const osv_tensor *tensor;
	const float **dst;
} binding;

typedef struct loader
{
	osv_model  *model;
	const char *prefix;			/* backbone prefix */
	const char *mid_prefix;
	binding    *bindings;
	int			num_bindings;
	int			max_bindings;
	osv_error  *err;
} loader;

/* Format a shape as "[1024, 3, 14, 14]". */
static const char *
shape_text(char *buf, size_t size, const int64_t *shape, int ndim)
{
	size_t		used = (size_t) snprintf(buf, size, "[");

	for (int i = 0; i < ndim && used < size; i++)
		used += (size_t) snprintf(buf + used, size - used, "%s%lld", i ? ", " : "",
								  (long long) shape[i]);
	if (used < size)
		snprintf(buf + used, size - used, "]");
	return buf;
}

/* Find prefix + name; fail naming it when absent or not a float dtype. */
static osv_status
find_weight(loader *ld, const char *prefix, const char *name,
			const osv_tensor **out)
{
	char		full[512];
	const osv_tensor *t;

	snprintf(full, sizeof(full), "%s%s", prefix, name);
	t = osv_weights_find(&ld->model->weights, full);
	if (t == NULL)
		return osv_fail(ld->err, OSV_ERR_MODEL, "missing tensor %s", full);
	if (t->dtype != OSV_DTYPE_F32 && t->dtype != OSV_DTYPE_F16 &&
		t->dtype != OSV_DTYPE_BF16 && t->dtype != OSV_DTYPE_F64)
		return osv_fail(ld->err, OSV_ERR_MODEL,
						"tensor %s has dtype %s, expected F32, F16 or BF16",
						t->name, osv_dtype_name(t->dtype));
	*out = t;
	return OSV_OK;
}

/* Find a weight used to derive sizes; it must have ndim dimensions. */
static osv_status
probe(loader *ld, const char *prefix, const char *name, int ndim,
	  const osv_tensor **out)
{
	osv_status	st = find_weight(ld, prefix, name, out);
	char		buf[160];

	if (st != OSV_OK)
		return st;
	if ((*out)->ndim != ndim)
		return osv_fail(ld->err, OSV_ERR_MODEL,
						"tensor %s has shape %s, expected %d dimensions",
						(*out)->name, shape_text(buf, sizeof(buf), (*out)->shape,
												 (*out)->ndim), ndim);
	for (int i = 0; i < ndim; i++)
		if ((*out)->shape[i] < 1 || (*out)->shape[i] > MODEL_MAX_DIM)
			return osv_fail(ld->err, OSV_ERR_MODEL,
							"tensor %s has shape %s, dimensions must be in [1, %d]",
							(*out)->name, shape_text(buf, sizeof(buf), (*out)->shape,
													 (*out)->ndim), MODEL_MAX_DIM);
	return OSV_OK;
}

/* Check prefix + name has exactly the expected shape; record the binding. */
static osv_status
bind(loader *ld, const char *prefix, const char *name, const float **dst,
	 const int64_t *shape, int ndim)
{
	const osv_tensor *t;
	osv_status	st = find_weight(ld, prefix, name, &t);
	bool		same;

	if (st != OSV_OK)
		return st;
	same = (t->ndim == ndim);
	for (int i = 0; same && i < ndim; i++)
		same = (t->shape[i] == shape[i]);
	if (!same)
	{
		char		have[160],
					want[160];

		return osv_fail(ld->err, OSV_ERR_MODEL, "tensor %s has shape %s, expected %s",
						t->name, shape_text(have, sizeof(have), t->shape, t->ndim),
						shape_text(want, sizeof(want), shape, ndim));
	}
	/* max_bindings is counted exactly from the architecture */
	if (ld->num_bindings >= ld->max_bindings)
		return osv_fail(ld->err, OSV_ERR_MODEL, "internal error: too many weights");
	ld->bindings[ld->num_bindings].tensor = t;
	ld->bindings[ld->num_bindings].dst = dst;
	ld->num_bindings++;
	return OSV_OK;
}

#define SHAPE(...) ((const int64_t[]) {__VA_ARGS__}), \
	(int) (sizeof((const int64_t[]) {__VA_ARGS__}) / sizeof(int64_t))

/* Bind the 16 weights of encoder layer i. */
static osv_status
bind_layer(loader *ld, int i, int64_t D, int64_t F)
{
	osv_layer  *l = &ld->model->layers[i];
	const struct
	{
		const char *name;
		const float **dst;
		int64_t		rows,
					cols;		/* cols 0: a vector */
	}			w[] =
	{
		{"layer_norm1.weight", &l->layer_norm1_weight, D, 0},
		{"layer_norm1.bias", &l->layer_norm1_bias, D, 0},
		{"self_attn.q_proj.weight", &l->q_proj_weight, D, D},
		{"self_attn.q_proj.bias", &l->q_proj_bias, D, 0},
		{"self_attn.k_proj.weight", &l->k_proj_weight, D, D},
		{"self_attn.k_proj.bias", &l->k_proj_bias, D, 0},
		{"self_attn.v_proj.weight", &l->v_proj_weight, D, D},
		{"self_attn.v_proj.bias", &l->v_proj_bias, D, 0},
		{"self_attn.out_proj.weight", &l->out_proj_weight, D, D},
		{"self_attn.out_proj.bias", &l->out_proj_bias, D, 0},
		{"layer_norm2.weight", &l->layer_norm2_weight, D, 0},
		{"layer_norm2.bias", &l->layer_norm2_bias, D, 0},
		{"mlp.fc1.weight", &l->fc1_weight, F, D},
		{"mlp.fc1.bias", &l->fc1_bias, F, 0},
		{"mlp.fc2.weight", &l->fc2_weight, D, F},
		{"mlp.fc2.bias", &l->fc2_bias, D, 0},
	};

	for (size_t k = 0; k < sizeof(w) / sizeof(w[0]); k++)
	{
		char		name[128];
		int64_t		shape[2] = {w[k].rows, w[k].cols};
		osv_status	st;

		snprintf(name, sizeof(name), "encoder.layers.%d.%s", i, w[k].name);
		st = bind(ld, ld->prefix, name, w[k].dst, shape, w[k].cols ? 2 : 1);
		if (st != OSV_OK)
			return st;
	}
	return OSV_OK;
}

/* Bind one MLPCentroid branch ("classif" or "reg"). */
static osv_status
bind_branch(loader *ld, const char *which, osv_branch *b, int64_t D, int64_t H1,
			int64_t H2, int64_t out_dim)
{
	const struct
	{
		const char *name;
		const float **dst;
		int64_t		rows,
					cols;
	}			w[] =
	{
		{"0.weight", &b->norm_weight, D, 0},
		{"0.bias", &b->norm_bias, D, 0},
		{"1.weight", &b->fc1_weight, H1, D},
		{"1.bias", &b->fc1_bias, H1, 0},
		{"2.weight", &b->gn1_weight, H1, 0},
		{"2.bias", &b->gn1_bias, H1, 0},
		{"4.weight", &b->fc2_weight, H2, H1},
		{"4.bias", &b->fc2_bias, H2, 0},
		{"5.weight", &b->gn2_weight, H2, 0},
		{"5.bias", &b->gn2_bias, H2, 0},
		{"7.weight", &b->out_weight, out_dim, H2},
		{"7.bias", &b->out_bias, out_dim, 0},
	};

	b->out_dim = (int) out_dim;
	for (size_t k = 0; k < sizeof(w) / sizeof(w[0]); k++)
	{
		char		name[128];
		int64_t		shape[2] = {w[k].rows, w[k].cols};
		osv_status	st;

		snprintf(name, sizeof(name), "%s.%s", which, w[k].name);
		st = bind(ld, ld->mid_prefix, name, w[k].dst, shape, w[k].cols ? 2 : 1);
		if (st != OSV_OK)
			return st;
	}
	return OSV_OK;
}

/* The number of encoder layers: 1 + the largest N of prefix encoder.layers.N. */
static osv_status
count_layers(loader *ld, int *num_layers)
{
	char		stem[128];
	size_t		stem_len;
	long		max_index = -1;

	snprintf(stem, sizeof(stem), "%sencoder.layers.", ld->prefix);
	stem_len = strlen(stem);
	for (int i = 0; i < ld->model->weights.num_tensors; i++)
	{
		const char *name = ld->model->weights.tensors[i].name;
		const char *p;
		long		index = 0;

		if (strncmp(name, stem, stem_len) != 0)
			continue;
		p = name + stem_len;
		if (*p < '0' || *p > '9')
			continue;
		while (*p >= '0' && *p <= '9')
		{
			index = index * 10 + (*p++ - '0');
			/* bounded before it can overflow a long */
			if (index >= MODEL_MAX_LAYERS)
				return osv_fail(ld->err, OSV_ERR_MODEL,
								"tensor %s: layer index exceeds the limit of %d layers",
								name, MODEL_MAX_LAYERS);
		}
		if (*p == '.' && index > max_index)
			max_index = index;
	}

	/*
	 * Gaps (layers 0, 1, 3) are caught later: binding every layer up to the
	 * largest index reports the first missing tensor of layer 2.
	 */
	*num_layers = (int) (max_index + 1);
	return OSV_OK;
}

/*
 * Read a whole small file; *missing tells ENOENT apart from other errors.
 * file.c refuses FIFOs and devices before any blocking call.
 */
static osv_status
read_small_file(const char *path, size_t cap, const char *what, char **out,
				size_t *len, bool *missing, osv_error *err)
{
	char		label[1200];
	uint8_t    *buf;
	osv_status	st;

	osv_file_label(label, sizeof(label), what, path);
	st = osv_file_read(path, label, cap, &buf, len, missing, err);
	*out = (char *) buf;
	return st;
}

/* Name the file in err->detail, after any parser text already there. */
static void
add_file_detail(osv_error *err, const char *path)
{
	char		detail[sizeof(err->detail)];

	if (err->detail[0] == '\0')
		osv_fail_detail(err, "file %s", path);
	else
	{
		snprintf(detail, sizeof(detail), "%s", err->detail);
		osv_fail_detail(err, "%s; file %s", detail, path);
	}
}

/* dst = dir/name, failing if it does not fit. */
static osv_status
join_path(char *dst, size_t size, const char *dir, const char *name, osv_error *err)
{
	size_t		n = strlen(dir);
	const char *sep = (n > 0 && dir[n - 1] == '/') ? "" : "/";

	if ((size_t) snprintf(dst, size, "%s%s%s", dir, sep, name) >= size)
		return osv_fail(err, OSV_ERR_ARGUMENT, "path \"%s%s%s\" is too long", dir, sep,
						name);
	return OSV_OK;
}

/*
 * Can binding t point into the mapping?  Contiguous F32 only, and 4-byte
 * aligned: safetensors does not promise alignment (the header length is
 * arbitrary), and a misaligned float load is undefined behaviour in C.
 * PyTorch aligns every storage to 64 bytes.
 */
static bool
in_place(const osv_tensor *t)
{
	return t->dtype == OSV_DTYPE_F32 && t->contiguous &&
		((uintptr_t) t->data % sizeof(float)) == 0;
}

/* Convert the bindings that cannot point into the mapping, once. */
static osv_status
convert_weights(loader *ld)
{
	osv_model  *m = ld->model;
	size_t		total = 0;
	float	   *next;

	for (int i = 0; i < ld->num_bindings; i++)
	{
		const osv_tensor *t = ld->bindings[i].tensor;

		if (in_place(t))
			continue;
		if (__builtin_add_overflow(total, (size_t) t->num_elements, &total))
			return osv_fail(ld->err, OSV_ERR_LIMIT, "converted weights overflow size_t");
	}
	if (total == 0)
		return OSV_OK;
	if (!osv_mul_size(total, sizeof(float), &total))
		return osv_fail(ld->err, OSV_ERR_LIMIT, "converted weights overflow size_t");
	m->converted = malloc(total);
	if (m->converted == NULL)
		return osv_fail(ld->err, OSV_ERR_NOMEM,
						"out of memory converting weights to F32 (%zu bytes)", total);

	next = m->converted;
	for (int i = 0; i < ld->num_bindings; i++)
	{
		const osv_tensor *t = ld->bindings[i].tensor;

		if (in_place(t))
			continue;
		/* shape checked by bind(); the parsers checked every element's range */
		osv_tensor_to_f32(t, next);
		*ld->bindings[i].dst = next;
		next += t->num_elements;
	}
	return OSV_OK;
}

/* Point every contiguous, aligned F32 binding into the mapping. */
static void
bind_in_place(loader *ld)
{
	for (int i = 0; i < ld->num_bindings; i++)
	{
		const osv_tensor *t = ld->bindings[i].tensor;

		if (in_place(t))
			*ld->bindings[i].dst = t->data;
	}
}

/* Check that a config value, when given, agrees with the weights. */
static osv_status
agree(loader *ld, const char *key, int config_value, int64_t weights_value)
{
	if (config_value > 0 && config_value != weights_value)
		return osv_fail(ld->err, OSV_ERR_MODEL,
						"config.json: %s is %d but the weights have %lld", key,
						config_value, (long long) weights_value);
	return OSV_OK;
}

/* Derive the hyperparameters, check and bind every weight. */
static osv_status
load_weights(loader *ld, const osv_config *config)
{
	osv_model  *m = ld->model;
	osv_model_info *info = &m->info;
	const osv_tensor *t;
	osv_status	st;
	int64_t		D,
				F,
				P,
				S,
				T,
				H1,
				H2,
				C;
	int			L = 0,
				heads;
	size_t		i;

	/* the prefix: whichever variant has a class_embedding */
	ld->prefix = NULL;
	for (i = 0; i < sizeof(backbone_prefixes) / sizeof(backbone_prefixes[0]); i++)
	{
		char		name[128];

		snprintf(name, sizeof(name), "%sembeddings.class_embedding",
				 backbone_prefixes[i]);
		if (osv_weights_find(&m->weights, name) != NULL)
		{
			ld->prefix = backbone_prefixes[i];
			break;
		}
	}
	if (ld->prefix == NULL)
		return osv_fail(ld->err, OSV_ERR_MODEL,
						"missing tensor backbone.clip.vision_model.embeddings.class_embedding (no known name prefix)");
	ld->mid_prefix = mid_prefixes[0];
	for (i = 0; i < sizeof(mid_prefixes) / sizeof(mid_prefixes[0]); i++)
	{
		char		name[128];

		snprintf(name, sizeof(name), "%sclassif.7.weight", mid_prefixes[i]);
		if (osv_weights_find(&m->weights, name) != NULL)
		{
			ld->mid_prefix = mid_prefixes[i];
			break;
		}
	}

	/* sizes from shapes */
	if ((st = probe(ld, ld->prefix, "embeddings.class_embedding", 1, &t)) != OSV_OK)
		return st;
	D = t->shape[0];
	if ((st = count_layers(ld, &L)) != OSV_OK)
		return st;
	if ((st = probe(ld, ld->prefix, "encoder.layers.0.mlp.fc1.weight", 2, &t)) != OSV_OK)
		return st;
	F = t->shape[0];
	if ((st = probe(ld, ld->prefix, "embeddings.patch_embedding.weight", 4, &t)) != OSV_OK)
		return st;
	P = t->shape[3];
	if ((st = probe(ld, ld->prefix, "embeddings.position_embedding.weight", 2, &t)) != OSV_OK)
		return st;
	T = t->shape[0];
	if ((st = probe(ld, ld->mid_prefix, "classif.1.weight", 2, &t)) != OSV_OK)
		return st;
	H1 = t->shape[0];
	if ((st = probe(ld, ld->mid_prefix, "classif.4.weight", 2, &t)) != OSV_OK)
		return st;
	H2 = t->shape[0];
	if ((st = probe(ld, ld->mid_prefix, "classif.7.weight", 2, &t)) != OSV_OK)
		return st;
	C = t->shape[0];

	if ((st = agree(ld, "model.head.instance.final_dim", config->num_cells, C)) != OSV_OK ||
		(st = agree(ld, "model.mid.instance.initial_dim", config->mid_initial, D)) != OSV_OK ||
		(st = agree(ld, "model.mid.instance.hidden_dim[0]", config->mid_hidden[0], H1)) != OSV_OK ||
		(st = agree(ld, "model.mid.instance.hidden_dim[1]", config->mid_hidden[1], H2)) != OSV_OK ||
		(st = agree(ld, "hidden_size", config->hidden_size, D)) != OSV_OK ||
		(st = agree(ld, "num_hidden_layers", config->num_layers, L)) != OSV_OK ||
		(st = agree(ld, "intermediate_size", config->intermediate_size, F)) != OSV_OK ||
		(st = agree(ld, "patch_size", config->patch_size, P)) != OSV_OK)
		return st;

	if (config->image_size > 0)
	{
		S = config->image_size;
		if (S % P != 0)
			return osv_fail(ld->err, OSV_ERR_MODEL,
							"image size %lld is not a multiple of the patch size %lld",
							(long long) S, (long long) P);
	}
	else
	{
		/* config silent: T = (S/P)^2 + 1, so the grid side is sqrt(T - 1) */
		int64_t		g = (int64_t) llround(sqrt((double) (T - 1)));

		if (T < 2 || g * g != T - 1 || g * P > MODEL_MAX_DIM)
			return osv_fail(ld->err, OSV_ERR_MODEL,
							"tensor %sembeddings.position_embedding.weight has %lld rows, not a square grid of patches plus one; give image_size in config.json",
							ld->prefix, (long long) T);
		S = g * P;
	}

	if (config->num_heads > 0)
		heads = config->num_heads;
	else if (config->backbone_path[0] != '\0' && config->backbone_heads == 0)
		return osv_fail(ld->err, OSV_ERR_MODEL,
						"config.json: the backbone \"%.100s\" is not one osv5m knows, so the number of attention heads is unknown: add \"num_attention_heads\" at the top level of config.json",
						config->backbone_path);
	else if (config->backbone_heads > 0)
	{
		if (config->backbone_width != D)
			return osv_fail(ld->err, OSV_ERR_MODEL,
							"config.json: the backbone \"%.100s\" has hidden size %d but the weights have %lld: add \"num_attention_heads\" at the top level of config.json",
							config->backbone_path, config->backbone_width, (long long) D);
		heads = config->backbone_heads;
	}
	else if (D == 1024)
		heads = 16;
	else if (D % 64 == 0)
		heads = (int) (D / 64);
	else
		return osv_fail(ld->err, OSV_ERR_MODEL,
						"hidden size %lld is not a multiple of 64: config.json must give num_attention_heads",
						(long long) D);
	if (D % heads != 0)
		return osv_fail(ld->err, OSV_ERR_MODEL,
						"hidden size %lld is not divisible by %d attention heads",
						(long long) D, heads);
	if (H1 % OSV_GROUPNORM_GROUPS != 0 || H2 % OSV_GROUPNORM_GROUPS != 0)
		return osv_fail(ld->err, OSV_ERR_MODEL,
						"mid hidden sizes %lld and %lld must be multiples of %d (GroupNorm groups)",
						(long long) H1, (long long) H2, OSV_GROUPNORM_GROUPS);

	/* every weight, with its exact shape */
	m->layers = calloc((size_t) L, sizeof(osv_layer));
	ld->max_bindings = 5 + 16 * L + 24;
	ld->bindings = calloc((size_t) ld->max_bindings, sizeof(binding));
	if (m->layers == NULL || ld->bindings == NULL)
		return osv_fail(ld->err, OSV_ERR_NOMEM, "out of memory for %d layers", L);
	T = (S / P) * (S / P) + 1;
	if ((st = bind(ld, ld->prefix, "embeddings.class_embedding", &m->class_embedding,
				   SHAPE(D))) != OSV_OK ||
		(st = bind(ld, ld->prefix, "embeddings.patch_embedding.weight",
				   &m->patch_embedding, SHAPE(D, 3, P, P))) != OSV_OK ||
		(st = bind(ld, ld->prefix, "embeddings.position_embedding.weight",
				   &m->position_embedding, SHAPE(T, D))) != OSV_OK ||
		(st = bind(ld, ld->prefix, "pre_layrnorm.weight", &m->pre_layrnorm_weight,
				   SHAPE(D))) != OSV_OK ||
		(st = bind(ld, ld->prefix, "pre_layrnorm.bias", &m->pre_layrnorm_bias,
				   SHAPE(D))) != OSV_OK)
		return st;
	for (int l = 0; l < L; l++)
		if ((st = bind_layer(ld, l, D, F)) != OSV_OK)
			return st;
	if ((st = bind_branch(ld, "classif", &m->classif, D, H1, H2, C)) != OSV_OK ||
		(st = bind_branch(ld, "reg", &m->reg, D, H1, H2, 2 * C)) != OSV_OK)
		return st;

	bind_in_place(ld);
	if ((st = convert_weights(ld)) != OSV_OK)
		return st;

	info->hidden_size = (int) D;
	info->num_layers = L;
	info->num_heads = heads;
	info->intermediate_size = (int) F;
	info->patch_size = (int) P;
	info->image_size = (int) S;
	info->mid_hidden[0] = (int) H1;
	info->mid_hidden[1] = (int) H2;
	info->num_cells = (int) C;
	/* the big matrices' dtype; a mixed file reports layer 0's q_proj */
	if ((st = find_weight(ld, ld->prefix, "encoder.layers.0.self_attn.q_proj.weight",
						  &t)) != OSV_OK)
		return st;
	info->dtype = t->dtype;

	/* parameters the network reads: the sum over the bindings */
	info->num_parameters = 0;
	for (int b = 0; b < ld->num_bindings; b++)
		info->num_parameters += ld->bindings[b].tensor->num_elements;

	/*
	 * Multiply-adds of one image, times 2: the patch convolution, per layer
	 * the four D x D projections and the MLP over T tokens plus attention
	 * (q k^T and the weighted sum of v, T^2 D each), then both MLP branches
	 * on the class token.
	 */
	{
		double		d = (double) D,
					f = (double) F,
					tok = (double) T,
					mac;

		mac = (tok - 1) * d * 3.0 * (double) P * (double) P;
		mac += (double) L * (4.0 * tok * d * d + 2.0 * tok * d * f + 2.0 * tok * tok * d);
		mac += 2.0 * (d * (double) H1 + (double) H1 * (double) H2);
		mac += (double) H2 * (double) C * 3.0;
		info->gflop_per_image = 2.0 * mac / 1e9;
	}
	return OSV_OK;
}

/* Fill the non-derived fields of info: config values or the defaults. */
static void
apply_config(osv_model_info *info, const osv_config *config)
{
	static const float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f};
	static const float std[3] = {0.26862954f, 0.26130258f, 0.27577711f};

	info->hidden_act = config->hidden_act >= 0 ?
		(osv_activation) config->hidden_act : OSV_ACT_GELU;
	info->layer_norm_eps = config->layer_norm_eps > 0 ?
		(float) config->layer_norm_eps : 1e-5f;
	memcpy(info->image_mean, config->has_mean ? config->image_mean : mean,
		   sizeof(info->image_mean));
	memcpy(info->image_std, config->has_std ? config->image_std : std,
		   sizeof(info->image_std));
	info->scale_tanh = config->scale_tanh > 0 ? config->scale_tanh : 1.2;
}

/* Read config.json of dir if present; absent leaves config unset. */
static osv_status
load_config(osv_model *m, const char *dir, osv_config *config, osv_error *err)
{
	char	   *text;
	size_t		len;
	bool		missing;
	osv_status	st;

	st = join_path(m->info.config_path, sizeof(m->info.config_path), dir,
				   "config.json", err);
	if (st != OSV_OK)
		return st;
	st = read_small_file(m->info.config_path, CONFIG_MAX_BYTES, "config file", &text,
						 &len, &missing, err);
	if (st != OSV_OK)
	{
		if (!missing)
			return st;
		/* no config.json: everything from shapes and defaults */
		m->info.config_path[0] = '\0';
		return OSV_OK;
	}
	st = osv_config_parse(text, len, config, err);
	free(text);
	return st;
}

/*
 * Read the quadtree CSV: override, else config's base name, else the
 * default.  *missing (when not NULL) is set when the directory simply has
 * no CSV (never for an override), and the error then says so.
 */
static osv_status
load_quadtree(osv_model *m, const char *dir, const char *override,
			  const osv_config *config, int *num_cells, bool *missing, osv_error *err)
{
	char	   *path = m->info.quadtree_path;
	size_t		path_size = sizeof(m->info.quadtree_path);
	char	   *text;
	size_t		len;
	bool		absent = false;
	osv_status	st;

	if (missing)
		*missing = false;
	if (override != NULL && override[0] != '\0')
	{
		if ((size_t) snprintf(path, path_size, "%s", override) >= path_size)
			return osv_fail(err, OSV_ERR_ARGUMENT, "quadtree path is too long");
		st = read_small_file(path, QUADTREE_MAX_BYTES, "quadtree file", &text, &len,
							 NULL, err);
	}
	else
	{
		const char *name = config->quadtree_file[0] ? config->quadtree_file :
			DEFAULT_QUADTREE;

		if ((st = join_path(path, path_size, dir, name, err)) != OSV_OK)
			return st;
		st = read_small_file(path, QUADTREE_MAX_BYTES, "quadtree file", &text, &len,
							 &absent, err);
		if (st != OSV_OK && absent && strcmp(name, DEFAULT_QUADTREE) != 0)
		{
			/* the config's name may be stale; the default is worth a try */
			osv_error	first = *err;

			if ((st = join_path(path, path_size, dir, DEFAULT_QUADTREE, err)) != OSV_OK)
				return st;
			st = read_small_file(path, QUADTREE_MAX_BYTES, "quadtree file", &text, &len,
								 &absent, err);
			if (st != OSV_OK)
			{
				*err = first;
				if ((st = join_path(path, path_size, dir, name, err)) != OSV_OK)
					return st;
				st = first.status;
			}
		}
		if (missing)
			*missing = absent;
	}
	if (st != OSV_OK)
		return st;
	st = osv_quadtree_parse(text, len, &m->cells, num_cells, err);
	free(text);
	if (st != OSV_OK)
		add_file_detail(err, path);
	return st;
}

/* The three cell buffers of the head, or none: *found tells. */
static osv_status
find_cell_buffers(osv_model *m, const osv_tensor *buf[3], bool *found, osv_error *err)
{
	static const char *const prefixes[] = {"model.head.", "head."};
	static const char *const names[] = {"cell_center", "cell_size_up", "cell_size_down"};
	int			C = m->info.num_cells;

	*found = false;
	for (size_t p = 0; p < sizeof(prefixes) / sizeof(prefixes[0]) && !*found; p++)
	{
		for (int k = 0; k < 3; k++)
		{
			char		name[64];

			snprintf(name, sizeof(name), "%s%s", prefixes[p], names[k]);
			buf[k] = osv_weights_find(&m->weights, name);
			if (buf[k] == NULL)
			{
				if (k > 0)
					return osv_fail(err, OSV_ERR_MODEL,
									"missing tensor %s (the checkpoint has %s%s)", name,
									prefixes[p], names[0]);
				break;
			}
			if (buf[k]->dtype != OSV_DTYPE_F64 && buf[k]->dtype != OSV_DTYPE_F32)
				return osv_fail(err, OSV_ERR_MODEL,
								"tensor %s has dtype %s, expected F64 or F32", name,
								osv_dtype_name(buf[k]->dtype));
			if (buf[k]->ndim != 2 || buf[k]->shape[0] != C || buf[k]->shape[1] != 2)
			{
				char		have[160];

				return osv_fail(err, OSV_ERR_MODEL, "tensor %s has shape %s, expected [%d, 2]",
								name, shape_text(have, sizeof(have), buf[k]->shape,
												 buf[k]->ndim), C);
			}
			if (k == 2)
				*found = true;
		}
	}
	return OSV_OK;
}

/*
 * The head's normalised cells and the degrees of the public API.  From the
 * buffers when there are some (checked finite, sizes >= 0, inside the
 * globe); from the CSV otherwise, exactly as the authors' init_quadtree.
 * With both, every CSV value must agree with the buffers' within
 * CELL_AGREE_DEG, or the first cell that does not is named.
 */
static osv_status
build_cells(osv_model *m, const osv_tensor *const buf[3], bool have_buffers,
			bool have_csv, osv_error *err)
{
	static const char *const fields[] = {"min_lat", "min_lon", "max_lat", "max_lon",
	"mean_lat", "mean_lon"};
	int			C = m->info.num_cells;

	m->cell_norm = malloc((size_t) C * 6 * sizeof(double));
	if (m->cell_norm == NULL)
		return osv_fail(err, OSV_ERR_NOMEM, "out of memory for %d cells", C);
	if (!have_buffers)
	{
		for (int c = 0; c < C; c++)
		{
			const osv_cell *q = &m->cells[c];
			double	   *n = m->cell_norm + (size_t) c * 6;

			n[0] = q->mean_lat / 90.0;
			n[1] = q->mean_lon / 180.0;
			n[2] = q->max_lat / 90.0 - n[0];
			n[3] = q->max_lon / 180.0 - n[1];
			n[4] = n[0] - q->min_lat / 90.0;
			n[5] = n[1] - q->min_lon / 180.0;
		}
		return OSV_OK;
	}
	if (!have_csv)
	{
		m->cells = malloc((size_t) C * sizeof(osv_cell));
		if (m->cells == NULL)
			return osv_fail(err, OSV_ERR_NOMEM, "out of memory for %d cells", C);
	}
	for (int c = 0; c < C; c++)
	{
		double	   *n = m->cell_norm + (size_t) c * 6;
		double		deg[6];

		for (int k = 0; k < 3; k++)
		{
			n[2 * k] = osv_tensor_get(buf[k], (uint64_t) c * 2);
			n[2 * k + 1] = osv_tensor_get(buf[k], (uint64_t) c * 2 + 1);
		}
		for (int i = 0; i < 6; i++)
			if (!isfinite(n[i]) || fabs(n[i]) > 2.0 || (i >= 2 && n[i] < 0))
				return osv_fail(err, OSV_ERR_MODEL,
								"cell %d of the checkpoint's %s is %g, not a normalised %s",
								c, i < 2 ? "cell_center" : i < 4 ? "cell_size_up" :
								"cell_size_down", n[i],
								i < 2 ? "coordinate" : "size");
		/* degrees: min = center - down, max = center + up (docs/MODEL.md) */
		deg[0] = (n[0] - n[4]) * 90.0;
		deg[1] = (n[1] - n[5]) * 180.0;
		deg[2] = (n[0] + n[2]) * 90.0;
		deg[3] = (n[1] + n[3]) * 180.0;
		deg[4] = n[0] * 90.0;
		deg[5] = n[1] * 180.0;
		if (have_csv)
		{
			const osv_cell *q = &m->cells[c];
			const double csv[6] = {q->min_lat, q->min_lon, q->max_lat, q->max_lon,
			q->mean_lat, q->mean_lon};

			for (int i = 0; i < 6; i++)
				if (!(fabs(csv[i] - deg[i]) <= CELL_AGREE_DEG))
				{
					osv_fail(err, OSV_ERR_MODEL,
							 "quadtree and checkpoint disagree on cell %d: %s is %.9g in the CSV but %.9g in the checkpoint's cell buffers",
							 c, fields[i], csv[i], deg[i]);
					add_file_detail(err, m->info.quadtree_path);
					return OSV_ERR_MODEL;
				}
		}
		else
		{
			osv_cell   *q = &m->cells[c];

			q->min_lat = deg[0];
			q->min_lon = deg[1];
			q->max_lat = deg[2];
			q->max_lon = deg[3];
			q->mean_lat = deg[4];
			q->mean_lon = deg[5];
		}
	}
	return OSV_OK;
}

/* Does path exist (as anything)?  *err_no the stat error otherwise. */
static bool
exists(const char *path, int *err_no)
{
	struct stat sb;

	if (stat(path, &sb) == 0)
		return true;
	*err_no = errno;
	return false;
}

/*
 * The weights file: model.safetensors when present (what conversion tools
 * and newer huggingface_hub write), else pytorch_model.bin (what
 * osv5m/baseline publishes).  With neither, model.safetensors, so that
 * opening it gives the usual "could not open" error.
 */
static osv_status
pick_weights(osv_model *m, const char *dir, osv_weights_format *format,
			 bool *neither, osv_error *err)
{
	char		pt_path[sizeof(m->info.weights_path)];
	int			e = 0;
	osv_status	st;

	*neither = false;
	*format = OSV_WEIGHTS_SAFETENSORS;
	if ((st = join_path(m->info.weights_path, sizeof(m->info.weights_path), dir,
						SAFETENSORS_NAME, err)) != OSV_OK)
		return st;
	if (exists(m->info.weights_path, &e) || e != ENOENT)
		return OSV_OK;
	if ((st = join_path(pt_path, sizeof(pt_path), dir, PYTORCH_NAME, err)) != OSV_OK)
		return st;
	if (exists(pt_path, &e) || e != ENOENT)
	{
		strcpy(m->info.weights_path, pt_path);
		*format = OSV_WEIGHTS_PYTORCH;
		return OSV_OK;
	}
	*neither = true;
	return OSV_OK;
}

/* Open a model directory; all or nothing. */
osv_status
osv_model_open(const char *dir, const char *quadtree_path, osv_model **out,
			   osv_error *err)
{
	osv_error	local;
	osv_model  *m;
	osv_config	config;
	loader		ld;
	osv_status	st;
	osv_weights_format format = OSV_WEIGHTS_SAFETENSORS;
	bool		neither = false;
	int			num_cells = 0;

	/* the steps below compare and copy *err: make sure there is one */
	if (err == NULL)
		err = &local;
	if (out == NULL)
		return osv_fail(err, OSV_ERR_ARGUMENT, "no output model pointer");
	*out = NULL;
	if (dir == NULL || dir[0] == '\0')
		return osv_fail(err, OSV_ERR_ARGUMENT, "no model directory");
	m = calloc(1, sizeof(*m));
	if (m == NULL)
		return osv_fail(err, OSV_ERR_NOMEM, "out of memory for the model");
	pthread_mutex_init(&m->fingerprint_lock, NULL);
	osv_config_init(&config);
	memset(&ld, 0, sizeof(ld));
	ld.model = m;
	ld.err = err;

	st = load_config(m, dir, &config, err);
	if (st == OSV_OK)
		st = pick_weights(m, dir, &format, &neither, err);
	if (st == OSV_OK)
	{
		st = osv_weights_open(m->info.weights_path, format, &m->weights, err);
		if (st == OSV_ERR_MODEL)
			add_file_detail(err, m->info.weights_path);
		else if (st != OSV_OK && neither)
			osv_fail_detail(err, "the directory holds neither %s nor %s",
							SAFETENSORS_NAME, PYTORCH_NAME);
	}
	if (st == OSV_OK)
	{
		m->info.file_size = m->weights.map_size;
		m->info.weights_format = format == OSV_WEIGHTS_PYTORCH ? "pytorch" : "safetensors";
		st = load_weights(&ld, &config);
		if (st == OSV_ERR_MODEL)
			add_file_detail(err, m->info.weights_path);
	}
	free(ld.bindings);
	if (st == OSV_OK)
	{
		const osv_tensor *buf[3] = {NULL, NULL, NULL};
		bool		have_buffers = false,
					missing = false;

		apply_config(&m->info, &config);
		st = find_cell_buffers(m, buf, &have_buffers, err);
		if (st == OSV_ERR_MODEL)
			add_file_detail(err, m->info.weights_path);
		if (st == OSV_OK)
		{
			st = load_quadtree(m, dir, quadtree_path, &config, &num_cells, &missing, err);
			if (st == OSV_OK && num_cells != m->info.num_cells)
				st = osv_fail(err, OSV_ERR_MODEL, "quadtree has %d cells, the model has %d",
							  num_cells, m->info.num_cells);
			else if (st != OSV_OK && missing && have_buffers)
			{
				/* no CSV: the checkpoint's cells are the quadtree */
				m->info.quadtree_path[0] = '\0';
				st = OSV_OK;
			}
			else if (st != OSV_OK && missing)
				osv_fail_detail(err, "the weights have no cell buffers (head.cell_center) either, so the quadtree CSV is needed");
		}
		if (st == OSV_OK)
		{
			m->info.cells_source = have_buffers ? "checkpoint" : "quadtree";
			st = build_cells(m, buf, have_buffers, m->info.quadtree_path[0] != '\0', err);
		}
	}
	if (st != OSV_OK)
	{
		osv_model_close(m);
		return st;
	}
	*out = m;
	return OSV_OK;
}

/* Free a model and everything it owns; NULL is fine. */
void
osv_model_close(osv_model *model)
{
	if (model == NULL)
		return;
	free(model->layers);
	free(model->cells);
	free(model->cell_norm);
	free(model->converted);
	osv_model_drop_pack_cache(model);
	osv_weights_close(&model->weights);
	pthread_mutex_destroy(&model->fingerprint_lock);
	free(model);
}

/* The hyperparameters and paths of an open model. */
const osv_model_info *
osv_model_get_info(const osv_model *model)
{
	return &model->info;
}

/* The quadtree cells, one per class, in degrees. */
const osv_cell *
osv_model_cells(const osv_model *model, int *num_cells)
{
	if (num_cells != NULL)
		*num_cells = model->info.num_cells;
	return model->cells;
}

/* SHA-256 of the weights file through the mapping, computed once. */
const char *
osv_model_fingerprint(osv_model *model)
{
	pthread_mutex_lock(&model->fingerprint_lock);
	if (model->fingerprint[0] == '\0')
		osv_sha256_hex(model->weights.map, model->weights.map_size, model->fingerprint);
	pthread_mutex_unlock(&model->fingerprint_lock);
	return model->fingerprint;
}
