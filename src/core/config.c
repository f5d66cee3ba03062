/*
 * config.c: read the hyperparameters a model directory's config.json gives.
 *
 * Two forms are accepted, and may be mixed:
 *   - flat Hugging Face CLIPVisionConfig keys at the top level (hidden_size,
 *     num_hidden_layers, num_attention_heads, intermediate_size, patch_size,
 *     image_size, hidden_act, layer_norm_eps) plus image_mean, image_std and
 *     scale_tanh; the same keys under "vision_config" (a full CLIPConfig);
 *   - the authors' nested form written by save_as_huggingface:
 *     {"model": {"head": {"instance": {"scale_tanh", "use_tanh",
 *     "quadtree_path"}}, "backbone": {"instance": {"path"}}, ...},
 *     "transform": {... Resize/CenterCrop size, Normalize mean/std ...}}.
 * Its exact bytes are unknown, so the transform is searched defensively:
 * any object under "transform" with "mean"/"std" gives them, and objects
 * whose "_target_" ends in Resize or CenterCrop give the image size.
 *
 * Unknown keys are ignored; a known key of the wrong type or range is an
 * error naming the key.  quadtree_path keeps only its base name: the file
 * is untrusted and must not steer the loader to another directory.
 * Fields the file does not give stay "unset" (see osv_config).
 */
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* no real ViT comes near this; it keeps later size arithmetic small */
#define CONFIG_MAX_DIM (1 << 20)

typedef struct config_reader
{
	const osv_json *json;
	osv_config *config;
	osv_error  *err;
	int			resize_size;	/* transform Resize size, 0 if none */
	int			crop_size;		/* transform CenterCrop size, 0 if none */
} config_reader;

/* Report a key of the wrong type or range. */
static osv_status
config_bad(config_reader *r, const char *key, const char *what)
{
	return osv_fail(r->err, OSV_ERR_MODEL, "config.json: %s must be %s", key, what);
}

/* Read member key of obj as an integer in [1, CONFIG_MAX_DIM] if present. */
static osv_status
config_int(config_reader *r, int obj, const char *key, const char *path, int *dst)
{
	int			n = osv_json_get(r->json, obj, key);
	double		v;

	if (n < 0 || r->json->nodes[n].type == OSV_JSON_NULL)
		return OSV_OK;
	v = r->json->nodes[n].number;
	if (r->json->nodes[n].type != OSV_JSON_NUMBER || v != floor(v) ||
		v < 1 || v > CONFIG_MAX_DIM)
		return config_bad(r, path, "a positive integer");
	*dst = (int) v;
	return OSV_OK;
}

/* Read member key of obj as a finite positive number if present. */
static osv_status
config_positive(config_reader *r, int obj, const char *key, const char *path,
				double *dst)
{
	int			n = osv_json_get(r->json, obj, key);

	if (n < 0 || r->json->nodes[n].type == OSV_JSON_NULL)
		return OSV_OK;
	if (r->json->nodes[n].type != OSV_JSON_NUMBER || !(r->json->nodes[n].number > 0))
		return config_bad(r, path, "a positive number");
	*dst = r->json->nodes[n].number;
	return OSV_OK;
}

/* Read a 3-number array (mean or std); positive requires > 0. */
static osv_status
config_triple(config_reader *r, int n, const char *path, bool positive,
			  float dst[3], bool *has)
{
	const osv_json *json = r->json;

	if (n < 0 || json->nodes[n].type == OSV_JSON_NULL)
		return OSV_OK;
	if (json->nodes[n].type != OSV_JSON_ARRAY || json->nodes[n].num_children != 3)
		return config_bad(r, path, "an array of 3 numbers");
	for (int i = 0; i < 3; i++)
	{
		int			c = osv_json_at(json, n, i);
		double		v = json->nodes[c].number;

		/* float range too: the values are stored as float */
		if (json->nodes[c].type != OSV_JSON_NUMBER || fabs(v) > 1e30 ||
			(positive && !(v > 0)))
			return config_bad(r, path, positive ? "an array of 3 positive numbers" :
							  "an array of 3 numbers");
		dst[i] = (float) v;
	}
	*has = true;
	return OSV_OK;
}

/* Read a string member, or NULL if absent; error if not a string. */
static osv_status
config_string(config_reader *r, int obj, const char *key, const char *path,
			  const char **dst)
{
	int			n = osv_json_get(r->json, obj, key);

	*dst = NULL;
	if (n < 0 || r->json->nodes[n].type == OSV_JSON_NULL)
		return OSV_OK;
	if (r->json->nodes[n].type != OSV_JSON_STRING)
		return config_bad(r, path, "a string");
	*dst = r->json->nodes[n].string;
	return OSV_OK;
}

/* Map "gelu" / "quick_gelu" to osv_activation. */
static osv_status
config_act(config_reader *r, const char *name, const char *path)
{
	if (strcmp(name, "gelu") == 0)
		r->config->hidden_act = OSV_ACT_GELU;
	else if (strcmp(name, "quick_gelu") == 0)
		r->config->hidden_act = OSV_ACT_QUICK_GELU;
	else
		return osv_fail(r->err, OSV_ERR_MODEL,
						"config.json: %s \"%.40s\" is not supported (use \"gelu\" or \"quick_gelu\")",
						path, name);
	return OSV_OK;
}

/* The flat CLIPVisionConfig keys of object obj; prefix names it in errors. */
static osv_status
config_flat(config_reader *r, int obj, const char *prefix)
{
	osv_config *c = r->config;
	char		path[96];
	const char *act;
	osv_status	st;
	double		eps = -1,
				scale = -1;

#define KEY(k) (snprintf(path, sizeof(path), "%s%s", prefix, k), path)
	if ((st = config_int(r, obj, "hidden_size", KEY("hidden_size"), &c->hidden_size)) ||
		(st = config_int(r, obj, "num_hidden_layers", KEY("num_hidden_layers"),
						 &c->num_layers)) ||
		(st = config_int(r, obj, "num_attention_heads", KEY("num_attention_heads"),
						 &c->num_heads)) ||
		(st = config_int(r, obj, "intermediate_size", KEY("intermediate_size"),
						 &c->intermediate_size)) ||
		(st = config_int(r, obj, "patch_size", KEY("patch_size"), &c->patch_size)) ||
		(st = config_int(r, obj, "image_size", KEY("image_size"), &c->image_size)) ||
		(st = config_positive(r, obj, "layer_norm_eps", KEY("layer_norm_eps"), &eps)) ||
		(st = config_positive(r, obj, "scale_tanh", KEY("scale_tanh"), &scale)) ||
		(st = config_triple(r, osv_json_get(r->json, obj, "image_mean"),
							KEY("image_mean"), false, c->image_mean, &c->has_mean)) ||
		(st = config_triple(r, osv_json_get(r->json, obj, "image_std"),
							KEY("image_std"), true, c->image_std, &c->has_std)) ||
		(st = config_string(r, obj, "hidden_act", KEY("hidden_act"), &act)))
		return st;
	if (act != NULL && (st = config_act(r, act, KEY("hidden_act"))) != OSV_OK)
		return st;
#undef KEY
	if (eps > 0)
		c->layer_norm_eps = eps;
	if (scale > 0)
		c->scale_tanh = scale;
	return OSV_OK;
}

/* Keep the base name of a quadtree_path: never a directory from the file. */
static osv_status
config_quadtree_path(config_reader *r, const char *path)
{
	const char *base = strrchr(path, '/');
	const char *bs = strrchr(path, '\\');

	if (bs != NULL && (base == NULL || bs > base))
		base = bs;
	base = base ? base + 1 : path;
	if (base[0] == '\0' || strcmp(base, ".") == 0 || strcmp(base, "..") == 0)
		return config_bad(r, "model.head.instance.quadtree_path", "a file name");
	if (strlen(base) >= sizeof(r->config->quadtree_file))
		return config_bad(r, "model.head.instance.quadtree_path",
						  "a file name shorter than 256 bytes");
	strcpy(r->config->quadtree_file, base);
	return OSV_OK;
}

/*
 * Vision towers a backbone path names: what the path implies and the
 * weights cannot say (the head count) or say only through the numbers (the
 * activation).  OpenAI's CLIPs use quick_gelu, the open_clip/laion ones
 * exact gelu; the widths are checked against the weights by model.c.
 */
static const struct
{
	const char *path;
	int			heads;
	int			width;
	osv_activation act;
}			known_backbones[] =
{
	/* osv5m/baseline */
	{"laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K", 16, 1024, OSV_ACT_GELU},
	{"laion/CLIP-ViT-L-14-laion2B-s32B-b82K", 16, 1024, OSV_ACT_GELU},
	{"laion/CLIP-ViT-H-14-laion2B-s32B-b79K", 16, 1280, OSV_ACT_GELU},
	{"laion/CLIP-ViT-B-32-laion2B-s34B-b79K", 12, 768, OSV_ACT_GELU},
	{"openai/clip-vit-large-patch14", 16, 1024, OSV_ACT_QUICK_GELU},
	{"openai/clip-vit-large-patch14-336", 16, 1024, OSV_ACT_QUICK_GELU},
	{"openai/clip-vit-base-patch16", 12, 768, OSV_ACT_QUICK_GELU},
	{"openai/clip-vit-base-patch32", 12, 768, OSV_ACT_QUICK_GELU},
};

/* Record the backbone path and what it implies (explicit keys win). */
static void
config_backbone(config_reader *r, const char *path)
{
	osv_config *c = r->config;

	snprintf(c->backbone_path, sizeof(c->backbone_path), "%s", path);
	c->backbone_heads = 0;
	c->backbone_width = 0;
	for (size_t i = 0; i < sizeof(known_backbones) / sizeof(known_backbones[0]); i++)
	{
		if (strcmp(path, known_backbones[i].path) == 0)
		{
			c->backbone_heads = known_backbones[i].heads;
			c->backbone_width = known_backbones[i].width;
			if (c->hidden_act < 0)
				c->hidden_act = known_backbones[i].act;
			return;
		}
	}
	/* an unknown OpenAI tower still uses OpenAI's activation */
	if (strncmp(path, "openai/", 7) == 0 && c->hidden_act < 0)
		c->hidden_act = OSV_ACT_QUICK_GELU;
}

/* The "model" object of the nested form. */
static osv_status
config_model(config_reader *r, int model)
{
	const osv_json *json = r->json;
	int			head = osv_json_get(json, osv_json_get(json, model, "head"), "instance");
	int			backbone = osv_json_get(json, osv_json_get(json, model, "backbone"),
										"instance");
	int			mid = osv_json_get(json, osv_json_get(json, model, "mid"), "instance");
	const char *s;
	osv_status	st;

	if (mid >= 0)
	{
		int			hidden = osv_json_get(json, mid, "hidden_dim");

		st = config_int(r, mid, "initial_dim", "model.mid.instance.initial_dim",
						&r->config->mid_initial);
		if (st != OSV_OK)
			return st;
		if (hidden >= 0 && json->nodes[hidden].type != OSV_JSON_NULL)
		{
			int			a = osv_json_at(json, hidden, 0),
						b = osv_json_at(json, hidden, 1);

			if (json->nodes[hidden].type != OSV_JSON_ARRAY ||
				json->nodes[hidden].num_children != 2 ||
				json->nodes[a].type != OSV_JSON_NUMBER ||
				json->nodes[b].type != OSV_JSON_NUMBER ||
				json->nodes[a].number < 1 || json->nodes[a].number > CONFIG_MAX_DIM ||
				json->nodes[b].number < 1 || json->nodes[b].number > CONFIG_MAX_DIM ||
				json->nodes[a].number != floor(json->nodes[a].number) ||
				json->nodes[b].number != floor(json->nodes[b].number))
				return config_bad(r, "model.mid.instance.hidden_dim",
								  "an array of 2 positive integers");
			r->config->mid_hidden[0] = (int) json->nodes[a].number;
			r->config->mid_hidden[1] = (int) json->nodes[b].number;
		}
	}

	if (head >= 0)
	{
		int			use_tanh = osv_json_get(json, head, "use_tanh");
		double		scale = -1;

		st = config_positive(r, head, "scale_tanh", "model.head.instance.scale_tanh",
							 &scale);
		if (st != OSV_OK)
			return st;
		st = config_int(r, head, "final_dim", "model.head.instance.final_dim",
						&r->config->num_cells);
		if (st != OSV_OK)
			return st;
		if (scale > 0)
			r->config->scale_tanh = scale;
		/* the network always applies tanh; a model without it would be wrong */
		if (use_tanh >= 0 && json->nodes[use_tanh].type == OSV_JSON_FALSE)
			return osv_fail(r->err, OSV_ERR_MODEL,
							"config.json: model.head.instance.use_tanh false is not supported");
		st = config_string(r, head, "quadtree_path", "model.head.instance.quadtree_path",
						   &s);
		if (st != OSV_OK)
			return st;
		if (s != NULL && (st = config_quadtree_path(r, s)) != OSV_OK)
			return st;
	}
	if (backbone >= 0)
	{
		st = config_string(r, backbone, "path", "model.backbone.instance.path", &s);
		if (st != OSV_OK)
			return st;
		if (s != NULL)
			config_backbone(r, s);
	}
	return OSV_OK;
}

/* Does string s end with suffix? */
static bool
ends_with(const char *s, const char *suffix)
{
	size_t		n = strlen(s),
				m = strlen(suffix);

	return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* A Resize/CenterCrop "size": an integer or a square [n, n] list. */
static osv_status
config_size(config_reader *r, int n, const char *path, int *dst)
{
	const osv_json *json = r->json;
	double		v;

	if (n < 0)
		return OSV_OK;
	if (json->nodes[n].type == OSV_JSON_ARRAY && json->nodes[n].num_children >= 1 &&
		json->nodes[n].num_children <= 2)
	{
		int			a = osv_json_at(json, n, 0);
		int			b = osv_json_at(json, n, json->nodes[n].num_children - 1);

		if (json->nodes[a].type != OSV_JSON_NUMBER ||
			json->nodes[b].type != OSV_JSON_NUMBER ||
			json->nodes[a].number != json->nodes[b].number)
			return config_bad(r, path, "an integer or a square size");
		n = a;
	}
	v = json->nodes[n].number;
	if (json->nodes[n].type != OSV_JSON_NUMBER || v != floor(v) || v < 1 ||
		v > CONFIG_MAX_DIM)
		return config_bad(r, path, "a positive integer");
	*dst = (int) v;
	return OSV_OK;
}

/* Search the transform subtree rooted at node for mean/std and sizes. */
static osv_status
config_transform(config_reader *r, int node)
{
	const osv_json *json = r->json;
	osv_status	st;

	if (json->nodes[node].type == OSV_JSON_OBJECT)
	{
		const char *target = NULL;
		int			t = osv_json_get(json, node, "_target_");

		if (t >= 0 && json->nodes[t].type == OSV_JSON_STRING)
			target = json->nodes[t].string;
		if (!r->config->has_mean &&
			(st = config_triple(r, osv_json_get(json, node, "mean"),
								"transform mean", false, r->config->image_mean,
								&r->config->has_mean)) != OSV_OK)
			return st;
		if (!r->config->has_std &&
			(st = config_triple(r, osv_json_get(json, node, "std"),
								"transform std", true, r->config->image_std,
								&r->config->has_std)) != OSV_OK)
			return st;
		if (target != NULL && ends_with(target, "CenterCrop") &&
			(st = config_size(r, osv_json_get(json, node, "size"),
							  "transform CenterCrop size", &r->crop_size)) != OSV_OK)
			return st;
		if (target != NULL && ends_with(target, "Resize") &&
			(st = config_size(r, osv_json_get(json, node, "size"),
							  "transform Resize size", &r->resize_size)) != OSV_OK)
			return st;
	}
	/* the recursion is bounded by the JSON reader's depth limit */
	if (json->nodes[node].type == OSV_JSON_OBJECT ||
		json->nodes[node].type == OSV_JSON_ARRAY)
	{
		for (int c = json->nodes[node].first_child; c >= 0; c = json->nodes[c].next_sibling)
			if ((st = config_transform(r, c)) != OSV_OK)
				return st;
	}
	return OSV_OK;
}

/* Everything unset; the loader applies the osv5m/baseline defaults. */
void
osv_config_init(osv_config *config)
{
	memset(config, 0, sizeof(*config));
	config->hidden_act = -1;
	config->layer_norm_eps = -1;
	config->scale_tanh = -1;
}

/* Parse config.json text into config (which osv_config_init prepared). */
osv_status
osv_config_parse(const char *text, size_t len, osv_config *config, osv_error *err)
{
	osv_json	json;
	config_reader r;
	osv_status	st;
	int			n;

	st = osv_json_parse(text, len, &json, err);
	if (st != OSV_OK)
	{
		char		detail[sizeof(err->message)];

		if (err == NULL)
			return st;
		snprintf(detail, sizeof(detail), "%s", err->message);
		osv_fail(err, st, "config.json is not valid JSON");
		osv_fail_detail(err, "%s", detail);
		return st;
	}
	memset(&r, 0, sizeof(r));
	r.json = &json;
	r.config = config;
	r.err = err;

	if (json.nodes[0].type != OSV_JSON_OBJECT)
	{
		osv_json_free(&json);
		return osv_fail(err, OSV_ERR_MODEL, "config.json is not a JSON object");
	}
	/* top-level flat keys last: they are the explicit overrides and win */
	st = OSV_OK;
	if ((n = osv_json_get(&json, 0, "vision_config")) >= 0)
		st = config_flat(&r, n, "vision_config.");
	if (st == OSV_OK)
		st = config_flat(&r, 0, "");
	if (st == OSV_OK && (n = osv_json_get(&json, 0, "model")) >= 0)
		st = config_model(&r, n);
	if (st == OSV_OK && (n = osv_json_get(&json, 0, "transform")) >= 0)
		st = config_transform(&r, n);
	if (st == OSV_OK && config->image_size <= 0)
	{
		/* the network sees the crop; Resize alone means it is square too */
		int			size = r.crop_size ? r.crop_size : r.resize_size;

		if (r.crop_size && r.resize_size && r.crop_size != r.resize_size)
			st = osv_fail(err, OSV_ERR_MODEL,
						  "config.json: transform resizes to %d but crops to %d; only equal sizes are supported",
						  r.resize_size, r.crop_size);
		else
			config->image_size = size;
	}
	osv_json_free(&json);
	return st;
}
