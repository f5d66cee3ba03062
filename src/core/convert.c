/*
 * convert.c: write an open model as a plain, Python-free, inspectable model
 * directory: model.safetensors (F32), config.json (flat keys) and
 * quadtree_10_1000.csv (osv_model_convert, `osv5m convert`).
 *
 * What is written is exactly what the network reads, so opening the output
 * gives bit-identical predictions:
 *   - every weight the network binds, as F32 (already converted at load:
 *     F16/BF16/F64 widened or narrowed, strided views gathered), under
 *     the osv5m/baseline names backbone.clip.vision_model.* and mid.*;
 *   - the head's normalised cell buffers head.cell_center, cell_size_up and
 *     cell_size_down as F64 [C, 2], which the loader prefers over the CSV,
 *     so the head does not depend on a decimal round trip of the degrees;
 *   - config.json with every hyperparameter, floats printed with enough
 *     digits to read back the same float or double;
 *   - the CSV in degrees (%.17g), which the loader cross-checks against
 *     the buffers.
 * Each file is written to a temporary name in out_dir and renamed into
 * place, so a reader never sees half a file.
 */
#include "internal.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct out_tensor
{
	char		name[128];
	osv_dtype	dtype;			/* F32 or F64 */
	int			ndim;
	int64_t		shape[4];
	const void *data;
	size_t		nbytes;
} out_tensor;

typedef struct tensor_list
{
	out_tensor *t;
	int			n,
				cap;
} tensor_list;

static bool
add(tensor_list *l, const char *name, osv_dtype dtype, const void *data, int ndim,
	int64_t a, int64_t b, int64_t c, int64_t d)
{
	out_tensor *t;
	int64_t		count = 1;

	if (l->n == l->cap)
	{
		int			cap = l->cap ? l->cap * 2 : 64;
		out_tensor *p = realloc(l->t, (size_t) cap * sizeof(out_tensor));

		if (p == NULL)
			return false;
		l->t = p;
		l->cap = cap;
	}
	t = &l->t[l->n++];
	snprintf(t->name, sizeof(t->name), "%s", name);
	t->dtype = dtype;
	t->ndim = ndim;
	t->shape[0] = a;
	t->shape[1] = b;
	t->shape[2] = c;
	t->shape[3] = d;
	for (int i = 0; i < ndim; i++)
		count *= t->shape[i];
	t->data = data;
	t->nbytes = (size_t) count * osv_dtype_size(dtype);
	return true;
}

/* The tensors the network reads, under the osv5m/baseline names. */
static bool
collect(const osv_model *m, tensor_list *l)
{
	const osv_model_info *in = &m->info;
	int64_t		D = in->hidden_size,
				F = in->intermediate_size,
				P = in->patch_size,
				S = in->image_size,
				T = (S / P) * (S / P) + 1,
				H1 = in->mid_hidden[0],
				H2 = in->mid_hidden[1],
				C = in->num_cells;
	const char *bb = "backbone.clip.vision_model.";
	char		name[128];
	bool		ok = true;

	snprintf(name, sizeof(name), "%sembeddings.class_embedding", bb);
	ok = ok && add(l, name, OSV_DTYPE_F32, m->class_embedding, 1, D, 0, 0, 0);
	snprintf(name, sizeof(name), "%sembeddings.patch_embedding.weight", bb);
	ok = ok && add(l, name, OSV_DTYPE_F32, m->patch_embedding, 4, D, 3, P, P);
	snprintf(name, sizeof(name), "%sembeddings.position_embedding.weight", bb);
	ok = ok && add(l, name, OSV_DTYPE_F32, m->position_embedding, 2, T, D, 0, 0);
	snprintf(name, sizeof(name), "%spre_layrnorm.weight", bb);
	ok = ok && add(l, name, OSV_DTYPE_F32, m->pre_layrnorm_weight, 1, D, 0, 0, 0);
	snprintf(name, sizeof(name), "%spre_layrnorm.bias", bb);
	ok = ok && add(l, name, OSV_DTYPE_F32, m->pre_layrnorm_bias, 1, D, 0, 0, 0);
	for (int i = 0; i < in->num_layers && ok; i++)
	{
		const osv_layer *y = &m->layers[i];
		const struct
		{
			const char *n;
			const float *p;
			int64_t		r,
						c;
		}			w[] =
		{
			{"layer_norm1.weight", y->layer_norm1_weight, D, 0},
			{"layer_norm1.bias", y->layer_norm1_bias, D, 0},
			{"self_attn.q_proj.weight", y->q_proj_weight, D, D},
			{"self_attn.q_proj.bias", y->q_proj_bias, D, 0},
			{"self_attn.k_proj.weight", y->k_proj_weight, D, D},
			{"self_attn.k_proj.bias", y->k_proj_bias, D, 0},
			{"self_attn.v_proj.weight", y->v_proj_weight, D, D},
			{"self_attn.v_proj.bias", y->v_proj_bias, D, 0},
			{"self_attn.out_proj.weight", y->out_proj_weight, D, D},
			{"self_attn.out_proj.bias", y->out_proj_bias, D, 0},
			{"layer_norm2.weight", y->layer_norm2_weight, D, 0},
			{"layer_norm2.bias", y->layer_norm2_bias, D, 0},
			{"mlp.fc1.weight", y->fc1_weight, F, D},
			{"mlp.fc1.bias", y->fc1_bias, F, 0},
			{"mlp.fc2.weight", y->fc2_weight, D, F},
			{"mlp.fc2.bias", y->fc2_bias, D, 0},
		};

		for (size_t k = 0; k < sizeof(w) / sizeof(w[0]) && ok; k++)
		{
			snprintf(name, sizeof(name), "%sencoder.layers.%d.%s", bb, i, w[k].n);
			ok = add(l, name, OSV_DTYPE_F32, w[k].p, w[k].c ? 2 : 1, w[k].r,
					 w[k].c, 0, 0);
		}
	}
	for (int b = 0; b < 2 && ok; b++)
	{
		const osv_branch *br = b == 0 ? &m->classif : &m->reg;
		const char *which = b == 0 ? "classif" : "reg";
		int64_t		out = b == 0 ? C : 2 * C;
		const struct
		{
			const char *n;
			const float *p;
			int64_t		r,
						c;
		}			w[] =
		{
			{"0.weight", br->norm_weight, D, 0},
			{"0.bias", br->norm_bias, D, 0},
			{"1.weight", br->fc1_weight, H1, D},
			{"1.bias", br->fc1_bias, H1, 0},
			{"2.weight", br->gn1_weight, H1, 0},
			{"2.bias", br->gn1_bias, H1, 0},
			{"4.weight", br->fc2_weight, H2, H1},
			{"4.bias", br->fc2_bias, H2, 0},
			{"5.weight", br->gn2_weight, H2, 0},
			{"5.bias", br->gn2_bias, H2, 0},
			{"7.weight", br->out_weight, out, H2},
			{"7.bias", br->out_bias, out, 0},
		};

		for (size_t k = 0; k < sizeof(w) / sizeof(w[0]) && ok; k++)
		{
			snprintf(name, sizeof(name), "mid.%s.%s", which, w[k].n);
			ok = add(l, name, OSV_DTYPE_F32, w[k].p, w[k].c ? 2 : 1, w[k].r, w[k].c,
					 0, 0);
		}
	}
	return ok;
}

/* Sort order of the safetensors layout: F64 first (8-byte aligned), then by name. */
static int
cmp_layout(const void *a, const void *b)
{
	const out_tensor *x = a,
			   *y = b;

	if (x->dtype != y->dtype)
		return x->dtype == OSV_DTYPE_F64 ? -1 : 1;
	return strcmp(x->name, y->name);
}

/* Write buf to dir/name through dir/.name.tmp and a rename. */
static osv_status
write_atomic(const char *dir, const char *name, const void *head, size_t head_len,
			 const out_tensor *t, int n, osv_error *err)
{
	char		tmp[1200],
				path[1200],
				label[1300];
	FILE	   *f;
	bool		ok;
	int			fd;
	osv_status	st;

	snprintf(tmp, sizeof(tmp), "%s/.%s.tmp", dir, name);
	if ((size_t) snprintf(path, sizeof(path), "%s/%s", dir, name) >= sizeof(path))
		return osv_fail(err, OSV_ERR_ARGUMENT, "output path is too long");
	/* a fresh regular file: never a FIFO or a symbolic link left there */
	osv_file_label(label, sizeof(label), NULL, tmp);
	if ((st = osv_file_create(tmp, label, &fd, err)) != OSV_OK)
		return st;
	f = fdopen(fd, "wb");
	if (f == NULL)
	{
		int			e = errno;

		close(fd);
		unlink(tmp);
		return osv_fail(err, OSV_ERR_IO, "could not create \"%s\": %s", tmp, strerror(e));
	}
	ok = fwrite(head, 1, head_len, f) == head_len;
	for (int i = 0; i < n && ok; i++)
		ok = fwrite(t[i].data, 1, t[i].nbytes, f) == t[i].nbytes;
	ok = (fflush(f) == 0) && ok;
	ok = (fsync(fileno(f)) == 0) && ok;
	if (fclose(f) != 0 || !ok)
	{
		int			e = errno;

		unlink(tmp);
		return osv_fail(err, OSV_ERR_IO, "could not write \"%s\": %s", tmp, strerror(e));
	}
	if (rename(tmp, path) != 0)
	{
		int			e = errno;

		unlink(tmp);
		return osv_fail(err, OSV_ERR_IO, "could not rename \"%s\" to \"%s\": %s", tmp, path,
						strerror(e));
	}
	return OSV_OK;
}

/* A growing text buffer. */
typedef struct text
{
	char	   *s;
	size_t		len,
				cap;
	bool		failed;
} text;

static void
append(text *t, const char *fmt,...)
__attribute__((format(printf, 2, 3)));

static void
append(text *t, const char *fmt,...)
{
	va_list		ap;
	int			n;

	if (t->failed)
		return;
	for (;;)
	{
		size_t		room = t->cap - t->len;

		va_start(ap, fmt);
		n = vsnprintf(t->s ? t->s + t->len : NULL, room, fmt, ap);
		va_end(ap);
		if (n < 0)
		{
			t->failed = true;
			return;
		}
		if ((size_t) n < room)
		{
			t->len += (size_t) n;
			return;
		}
		{
			size_t		cap = (t->cap ? t->cap * 2 : 4096) + (size_t) n;
			char	   *p = realloc(t->s, cap);

			if (p == NULL)
			{
				t->failed = true;
				return;
			}
			t->s = p;
			t->cap = cap;
		}
	}
}

osv_status
osv_model_convert(const osv_model *m, const char *out_dir, osv_error *err)
{
	const osv_model_info *in;
	tensor_list l = {0};
	text		h = {0},
				cfg = {0},
				csv = {0};
	uint64_t	offset = 0;
	double	   *buffers = NULL;
	osv_status	st = OSV_OK;
	int			C;

	if (m == NULL || out_dir == NULL || out_dir[0] == '\0')
		return osv_fail(err, OSV_ERR_ARGUMENT, "no model or no output directory");
	in = &m->info;
	C = in->num_cells;

	/* the head's buffers, [C, 2] each, from the normalised cells */
	buffers = malloc((size_t) C * 6 * sizeof(double));
	if (buffers == NULL || !collect(m, &l))
	{
		st = osv_fail(err, OSV_ERR_NOMEM, "out of memory converting the model");
		goto done;
	}
	for (int c = 0; c < C; c++)
		for (int k = 0; k < 3; k++)
		{
			buffers[(size_t) k * C * 2 + (size_t) c * 2] = m->cell_norm[(size_t) c * 6 + 2 * k];
			buffers[(size_t) k * C * 2 + (size_t) c * 2 + 1] =
				m->cell_norm[(size_t) c * 6 + 2 * k + 1];
		}
	if (!add(&l, "head.cell_center", OSV_DTYPE_F64, buffers, 2, C, 2, 0, 0) ||
		!add(&l, "head.cell_size_up", OSV_DTYPE_F64, buffers + (size_t) C * 2, 2, C, 2, 0, 0) ||
		!add(&l, "head.cell_size_down", OSV_DTYPE_F64, buffers + (size_t) C * 4, 2, C, 2, 0, 0))
	{
		st = osv_fail(err, OSV_ERR_NOMEM, "out of memory converting the model");
		goto done;
	}
	qsort(l.t, (size_t) l.n, sizeof(out_tensor), cmp_layout);

	/* safetensors header: 8 bytes of length, JSON padded to 8 bytes */
	append(&h, "%8s{\"__metadata__\":{\"format\":\"pt\",\"converted_by\":\"osv5m %s\"}",
		   "", OSV_VERSION);
	for (int i = 0; i < l.n; i++)
	{
		append(&h, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[", l.t[i].name,
			   osv_dtype_name(l.t[i].dtype));
		for (int d = 0; d < l.t[i].ndim; d++)
			append(&h, "%s%lld", d ? "," : "", (long long) l.t[i].shape[d]);
		append(&h, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long) offset,
			   (unsigned long long) (offset + l.t[i].nbytes));
		offset += l.t[i].nbytes;
	}
	append(&h, "}");
	while (!h.failed && (h.len - 8) % 8 != 0)
		append(&h, " ");
	if (h.failed)
	{
		st = osv_fail(err, OSV_ERR_NOMEM, "out of memory converting the model");
		goto done;
	}
	for (int i = 0; i < 8; i++)
		h.s[i] = (char) (((uint64_t) (h.len - 8) >> (8 * i)) & 0xff);

	append(&cfg, "{\n  \"hidden_size\": %d,\n  \"num_hidden_layers\": %d,\n"
		   "  \"num_attention_heads\": %d,\n  \"intermediate_size\": %d,\n"
		   "  \"patch_size\": %d,\n  \"image_size\": %d,\n  \"hidden_act\": \"%s\",\n"
		   "  \"layer_norm_eps\": %.9g,\n"
		   "  \"image_mean\": [%.9g, %.9g, %.9g],\n  \"image_std\": [%.9g, %.9g, %.9g],\n"
		   "  \"scale_tanh\": %.17g\n}\n",
		   in->hidden_size, in->num_layers, in->num_heads, in->intermediate_size,
		   in->patch_size, in->image_size,
		   in->hidden_act == OSV_ACT_QUICK_GELU ? "quick_gelu" : "gelu",
		   (double) in->layer_norm_eps,
		   (double) in->image_mean[0], (double) in->image_mean[1],
		   (double) in->image_mean[2], (double) in->image_std[0],
		   (double) in->image_std[1], (double) in->image_std[2], in->scale_tanh);
	append(&csv, "cluster_id,min_lat,min_lon,max_lat,max_lon,mean_lat,mean_lon\n");
	for (int c = 0; c < C; c++)
	{
		const osv_cell *q = &m->cells[c];

		append(&csv, "%d,%.17g,%.17g,%.17g,%.17g,%.17g,%.17g\n", c, q->min_lat,
			   q->min_lon, q->max_lat, q->max_lon, q->mean_lat, q->mean_lon);
	}
	if (cfg.failed || csv.failed)
	{
		st = osv_fail(err, OSV_ERR_NOMEM, "out of memory converting the model");
		goto done;
	}
	/* the weights last: a directory is complete once they are in place */
	if ((st = write_atomic(out_dir, "config.json", cfg.s, cfg.len, NULL, 0, err)) == OSV_OK &&
		(st = write_atomic(out_dir, "quadtree_10_1000.csv", csv.s, csv.len, NULL, 0,
						   err)) == OSV_OK)
		st = write_atomic(out_dir, "model.safetensors", h.s, h.len, l.t, l.n, err);
done:
	free(l.t);
	free(h.s);
	free(cfg.s);
	free(csv.s);
	free(buffers);
	return st;
}
