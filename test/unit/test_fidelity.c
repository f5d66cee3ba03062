/*
 * test_fidelity.c: the core against the PyTorch reference.
 *
 * For every model directory test/models/<name>/ and every golden file
 * test/golden/models/<name>/<image>.safetensors (written by
 * test/reference/make_golden.py), runs osv_run_image on
 * test/data/images/<image> and compares the preprocessed tensor, the
 * feature, logits and regression, the cell, the point and the top-k cells
 * with the reference's.  The network is also run on the reference's own
 * pixels (osv_run_pixels), so that it is tested independently of decoding
 * and resizing.  Then, on the first model: the abort callback (stop before
 * block 1, the context stays usable and gives the same result), determinism
 * (the same image twice, on every kernel path the CPU runs and on 1, 2 and
 * 3 threads, gives bitwise the same outputs) and the edge cases
 * of the result accessors.  Each model's images also go through the batch
 * path, osv_run_images, with a non-image among them (check_batches).
 * Models with bf16 or int8 golden files (test/golden/models/<name>/bf16/
 * and int8/, the reference's bf16 and int8 modes) are also run with
 * osv_params.precision = OSV_PRECISION_BF16 or OSV_PRECISION_INT8 and
 * compared with those, with their own tolerances, and with the fp32
 * goldens, which they must not match (check_reduced).  Single int8
 * products of the reference (test/golden/int8_products.safetensors) must
 * come out bit for bit on every kernel path (check_int8_products).
 *
 * With no models or no golden files the test fails: it must never pass
 * without having compared anything.  Run from the repository root.
 */
#include "network.h"
#include "gemm.h"
#include "pool.h"

#include "check.h"

#include <dirent.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MODELS_DIR "test/models"
#define GOLDEN_DIR "test/golden/models"
#define IMAGES_DIR "test/data/images"
#define INT8_PRODUCTS "test/golden/int8_products.safetensors"

/* Tolerances (see the brief in the file header). */
#define FEATURE_RTOL 1e-4		/* ||a - b|| / ||b|| */
#define LOGITS_RTOL 1e-4
#define LATLON_TOL 1e-4			/* degrees */
#define PROB_TOL 1e-5			/* absolute */
#define MAX_NAMES 512
#define MAX_TOPK 64

/* Worst differences seen over one model's images. */
typedef struct stats
{
	int			images;
	int			pixel_runs;
	double		pixels;			/* max abs, preprocessing */
	double		feature;		/* max relative norm error */
	double		logits;
	double		regression;
	double		latlon;			/* max degrees */
	double		probs;			/* max abs */
	double		feature_px;		/* the same, network on the golden pixels */
	double		latlon_px;
} stats;

/* qsort order of C strings. */
static int
compare_names(const void *a, const void *b)
{
	return strcmp(*(char *const *) a, *(char *const *) b);
}

/* Sorted names in dir ending with suffix (malloc'ed); returns how many. */
static int
list_dir(const char *dir, const char *suffix, char **names)
{
	DIR		   *d = opendir(dir);
	struct dirent *e;
	int			n = 0;
	size_t		sl = strlen(suffix);

	if (d == NULL)
		return 0;
	while ((e = readdir(d)) != NULL && n < MAX_NAMES)
	{
		size_t		len = strlen(e->d_name);

		if (e->d_name[0] == '.' || len < sl || strcmp(e->d_name + len - sl, suffix) != 0)
			continue;
		names[n++] = strdup(e->d_name);
	}
	closedir(d);
	qsort(names, (size_t) n, sizeof(char *), compare_names);
	return n;
}

/* Read a whole file; NULL if it cannot. */
static uint8_t *
slurp(const char *path, size_t *size)
{
	FILE	   *f = fopen(path, "rb");
	uint8_t    *buf;
	long		len;

	if (f == NULL)
		return NULL;
	if (fseek(f, 0, SEEK_END) != 0 || (len = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0)
	{
		fclose(f);
		return NULL;
	}
	buf = malloc((size_t) len + 1);
	if (buf != NULL && fread(buf, 1, (size_t) len, f) != (size_t) len)
	{
		free(buf);
		buf = NULL;
	}
	fclose(f);
	*size = (size_t) len;
	return buf;
}

/* The tensor name of golden file st with dtype and element count, or NULL. */
static const osv_tensor *
golden_tensor(const osv_safetensors *st, const char *name, osv_dtype dtype,
			  uint64_t count, const char *file)
{
	const osv_tensor *t = osv_safetensors_find(st, name);

	if (t == NULL)
		return NULL;
	CHECK(t->dtype == dtype && (count == 0 || t->num_elements == count),
		  "%s: %s has dtype %s and %llu elements, expected %s and %llu", file,
		  name, osv_dtype_name(t->dtype), (unsigned long long) t->num_elements,
		  osv_dtype_name(dtype), (unsigned long long) count);
	if (t->dtype != dtype || (count != 0 && t->num_elements != count))
		return NULL;
	return t;
}

/* A string member of the golden file's __metadata__, or NULL. */
static const char *
golden_meta(const osv_safetensors *st, const char *key)
{
	int			meta = osv_json_get(&st->header, 0, "__metadata__");
	int			node;

	if (meta < 0)
		return NULL;
	node = osv_json_get(&st->header, meta, key);
	if (node < 0 || st->header.nodes[node].type != OSV_JSON_STRING)
		return NULL;
	return st->header.nodes[node].string;
}

/* ||a - b|| / ||b|| in double. */
static double
relative_error(const float *a, const float *b, size_t n)
{
	double		num = 0.0,
				den = 0.0;

	for (size_t i = 0; i < n; i++)
	{
		double		d = (double) a[i] - (double) b[i];

		num += d * d;
		den += (double) b[i] * b[i];
	}
	return den > 0.0 ? sqrt(num / den) : sqrt(num);
}

/*
 * Error of a predicted point against the reference's, as a fraction of its
 * tolerance (<= 1 passes), for a regression known to reg_rtol (relative to
 * its RMS).  The tolerance is LATLON_TOL plus what the regression
 * tolerance allows: a regression error delta moves the point by
 * up to scale_tanh * delta * (the cell's extent), which in a large cell of
 * a tiny test model exceeds 1e-4 degrees for float32 rounding alone.
 */
static double
point_error_rtol(const osv_context *ctx, const osv_prediction *p, const double *ref,
				 const float *ref_reg, double reg_rtol)
{
	const osv_cell *cell = &ctx->model->cells[p->cell];
	double		rms = 0.0,
				delta,
				tol_lat,
				tol_lon;
	size_t		n = 2 * (size_t) ctx->cells;

	for (size_t i = 0; i < n; i++)
		rms += (double) ref_reg[i] * ref_reg[i];
	rms = sqrt(rms / (double) n);
	delta = reg_rtol * rms;
	tol_lat = LATLON_TOL + ctx->model->info.scale_tanh * delta * (cell->max_lat - cell->min_lat);
	tol_lon = LATLON_TOL + ctx->model->info.scale_tanh * delta * (cell->max_lon - cell->min_lon);
	return fmax(fabs(p->lat - ref[0]) / tol_lat, fabs(p->lon - ref[1]) / tol_lon);
}

/* The same with the fp32 tolerance of the regression. */
static double
point_error(const osv_context *ctx, const osv_prediction *p, const double *ref,
			const float *ref_reg)
{
	return point_error_rtol(ctx, p, ref, ref_reg, LOGITS_RTOL);
}

/*
 * Compare the outputs of input `image` of the context's last run with the
 * golden outputs; updates the worst.
 */
static void
compare_outputs(osv_context *ctx, int image, const osv_safetensors *g,
				const char *what, double *feature_err, double *latlon_err,
				stats *s)
{
	int			d = ctx->hidden,
				c = ctx->cells;
	int			b = ctx->has_result && image < ctx->inputs ? ctx->slot[image] : -1;
	const osv_tensor *feature = golden_tensor(g, "feature", OSV_DTYPE_F32, d, what);
	const osv_tensor *logits = golden_tensor(g, "logits", OSV_DTYPE_F32, c, what);
	const osv_tensor *reg = golden_tensor(g, "regression", OSV_DTYPE_F32, 2 * (uint64_t) c, what);
	const osv_tensor *cell = golden_tensor(g, "cell", OSV_DTYPE_I64, 1, what);
	const osv_tensor *latlon = golden_tensor(g, "latlon", OSV_DTYPE_F64, 2, what);
	const osv_tensor *tcells = golden_tensor(g, "topk_cells", OSV_DTYPE_I64, 0, what);
	const osv_tensor *tprobs = golden_tensor(g, "topk_probs", OSV_DTYPE_F64, 0, what);
	const osv_tensor *tlatlon = golden_tensor(g, "topk_latlon", OSV_DTYPE_F64, 0, what);
	osv_prediction top[MAX_TOPK];
	double		e;
	float	   *saved;

	CHECK(feature && logits && reg && cell && latlon && tcells && tprobs && tlatlon,
		  "%s: a golden tensor is missing or malformed", what);
	CHECK(b >= 0, "%s: no result", what);
	if (!(feature && logits && reg && cell && latlon && tcells && tprobs && tlatlon) || b < 0)
		return;

	e = relative_error(ctx->feature + (size_t) b * d, feature->data, (size_t) d);
	CHECK(e <= FEATURE_RTOL, "%s: feature relative error %.3g", what, e);
	*feature_err = fmax(*feature_err, e);
	e = relative_error(ctx->logits + (size_t) b * c, logits->data, (size_t) c);
	CHECK(e <= LOGITS_RTOL, "%s: logits relative error %.3g", what, e);
	s->logits = fmax(s->logits, e);
	e = relative_error(ctx->regression + (size_t) b * 2 * c, reg->data, 2 * (size_t) c);
	CHECK(e <= LOGITS_RTOL, "%s: regression relative error %.3g", what, e);
	s->regression = fmax(s->regression, e);

	{
		int64_t		gcell = ((const int64_t *) cell->data)[0];
		const double *ll = latlon->data;
		int			n = osv_context_topk_at(ctx, image, 1, top);

		CHECK(n == 1 && top[0].cell == gcell, "%s: cell %d, reference %lld",
			  what, top[0].cell, (long long) gcell);
		CHECK(ctx->cell[b] == top[0].cell, "%s: argmax %d but top-1 %d", what,
			  ctx->cell[b], top[0].cell);
		e = point_error(ctx, &top[0], ll, reg->data);
		CHECK(e <= 1.0, "%s: point (%.9f, %.9f), reference (%.9f, %.9f)",
			  what, top[0].lat, top[0].lon, ll[0], ll[1]);
		*latlon_err = fmax(*latlon_err, fmax(fabs(top[0].lat - ll[0]),
											 fabs(top[0].lon - ll[1])));
	}

	{
		int			k = (int) tcells->num_elements;
		const int64_t *gc = tcells->data;
		const double *gp = tprobs->data;
		const double *gl = tlatlon->data;
		int			n;

		CHECK(k >= 1 && k <= MAX_TOPK && tprobs->num_elements == (uint64_t) k &&
			  tlatlon->num_elements == 2 * (uint64_t) k, "%s: top-k shapes", what);
		if (k < 1 || k > MAX_TOPK || tprobs->num_elements != (uint64_t) k ||
			tlatlon->num_elements != 2 * (uint64_t) k)
			return;
		n = osv_context_topk_at(ctx, image, k, top);
		CHECK(n == k, "%s: topk returned %d of %d", what, n, k);
		if (n != k)
			return;
		for (int i = 0; i < n; i++)
		{
			CHECK(top[i].cell == gc[i], "%s: top-%d cell %d, reference %lld",
				  what, i + 1, top[i].cell, (long long) gc[i]);
			e = fabs(top[i].probability - gp[i]);
			CHECK(e <= PROB_TOL, "%s: top-%d probability %.9g, reference %.9g",
				  what, i + 1, top[i].probability, gp[i]);
			s->probs = fmax(s->probs, e);
			e = point_error(ctx, &top[i], gl + 2 * i, reg->data);
			CHECK(e <= 1.0, "%s: top-%d point off by %.3g of its tolerance", what, i + 1, e);
			*latlon_err = fmax(*latlon_err, fmax(fabs(top[i].lat - gl[2 * i]),
												 fabs(top[i].lon - gl[2 * i + 1])));
		}

		/*
		 * The head's geometry alone, exactly: on the reference's own
		 * regression our points must be the reference's to 1e-9 degrees.
		 */
		saved = malloc(2 * (size_t) c * sizeof(float));
		memcpy(saved, ctx->regression + (size_t) b * 2 * c, 2 * (size_t) c * sizeof(float));
		memcpy(ctx->regression + (size_t) b * 2 * c, reg->data, 2 * (size_t) c * sizeof(float));
		for (int i = 0; i < k; i++)
		{
			osv_prediction p = osv_context_cell_at(ctx, image, (int) gc[i]);

			CHECK(fabs(p.lat - gl[2 * i]) <= 1e-9 && fabs(p.lon - gl[2 * i + 1]) <= 1e-9,
				  "%s: head geometry of cell %lld gives (%.12f, %.12f), reference (%.12f, %.12f)",
				  what, (long long) gc[i], p.lat, p.lon, gl[2 * i], gl[2 * i + 1]);
		}
		memcpy(ctx->regression + (size_t) b * 2 * c, saved, 2 * (size_t) c * sizeof(float));
		free(saved);
	}
}

/*
 * The reference's preprocessed pixels for this golden file: its own, or
 * those of the model named in __metadata__ "pixels" ("same as NAME").
 * Returns a malloc'ed copy, or NULL when there are none.
 */
static float *
golden_pixels(const osv_safetensors *g, const char *image, size_t count)
{
	const osv_tensor *t = golden_tensor(g, "pixels", OSV_DTYPE_F32, count, image);
	const char *note = golden_meta(g, "pixels");
	float	   *out = NULL;

	if (t != NULL)
	{
		out = malloc(count * sizeof(float));
		memcpy(out, t->data, count * sizeof(float));
	}
	else if (note != NULL && strncmp(note, "same as ", 8) == 0)
	{
		char		path[1024];
		osv_safetensors other;
		osv_error	err;

		snprintf(path, sizeof(path), "%s/%s/%s.safetensors", GOLDEN_DIR, note + 8, image);
		if (osv_safetensors_open(path, &other, &err) == OSV_OK)
		{
			t = golden_tensor(&other, "pixels", OSV_DTYPE_F32, count, path);
			if (t != NULL)
			{
				out = malloc(count * sizeof(float));
				memcpy(out, t->data, count * sizeof(float));
			}
			osv_safetensors_close(&other);
		}
	}
	return out;
}

/* One golden file of one model. */
static void
check_golden(osv_context *ctx, const char *model, const char *file, stats *s)
{
	const osv_model_info *info = &ctx->model->info;
	size_t		count = 3 * (size_t) info->image_size * info->image_size;
	char		path[1024],
				what[1024];
	osv_safetensors g;
	osv_error	err;
	const char *image;
	uint8_t    *bytes;
	size_t		size;
	float	   *pixels;
	osv_status	status;

	snprintf(path, sizeof(path), "%s/%s/%s", GOLDEN_DIR, model, file);
	status = osv_safetensors_open(path, &g, &err);
	CHECK(status == OSV_OK, "%s: %s", path, err.message);
	if (status != OSV_OK)
		return;
	image = golden_meta(&g, "image");
	CHECK(image != NULL, "%s: no __metadata__ image", path);
	if (image == NULL)
	{
		osv_safetensors_close(&g);
		return;
	}

	/* the whole path: bytes -> decode -> preprocess -> network */
	snprintf(what, sizeof(what), "%s/%s", model, image);
	snprintf(path, sizeof(path), "%s/%s", IMAGES_DIR, image);
	bytes = slurp(path, &size);
	CHECK(bytes != NULL, "cannot read %s", path);
	if (bytes != NULL)
	{
		status = osv_run_image(ctx, bytes, size, NULL, &err);
		CHECK(status == OSV_OK, "%s: %s", what, err.message);
		free(bytes);
		if (status == OSV_OK)
		{
			const osv_tensor *gp = golden_tensor(&g, "pixels", OSV_DTYPE_F32, count, what);

			s->images++;
			if (gp != NULL)
			{
				const float *ours = osv_context_pixels(ctx);
				const float *ref = gp->data;
				double		worst = 0.0;
				/* one 8-bit step after normalisation, for PIL's off-by-one */
				double		tol = 1.0 / 255.0 / fmin(fmin(info->image_std[0], info->image_std[1]),
													 info->image_std[2]) + 1e-6;

				for (size_t i = 0; i < count; i++)
					worst = fmax(worst, fabs((double) ours[i] - ref[i]));
				CHECK(worst <= tol, "%s: pixels differ by %.3g (tolerance %.3g)", what, worst, tol);
				s->pixels = fmax(s->pixels, worst);
			}
			compare_outputs(ctx, 0, &g, what, &s->feature, &s->latlon, s);
		}
	}

	/* the network alone, on the reference's pixels */
	pixels = golden_pixels(&g, image, count);
	if (pixels != NULL)
	{
		snprintf(what, sizeof(what), "%s/%s (reference pixels)", model, image);
		status = osv_run_pixels(ctx, pixels, NULL, &err);
		CHECK(status == OSV_OK, "%s: %s", what, err.message);
		if (status == OSV_OK)
		{
			s->pixel_runs++;
			compare_outputs(ctx, 0, &g, what, &s->feature_px, &s->latlon_px, s);
		}
		free(pixels);
	}
	osv_safetensors_close(&g);
}

/* Inputs per run in check_batches: three images and one that is none. */
#define BATCH_IMAGES 4

/* A golden file and its image's bytes, for check_batches. */
typedef struct golden_case
{
	osv_safetensors g;
	char		what[1024];
	uint8_t    *bytes;
	size_t		size;
} golden_case;

/*
 * The batch path: the model's golden images through osv_run_images,
 * BATCH_IMAGES - 1 at a time plus one input that is no image, at a place
 * that moves from run to run.  Each image must match the reference as in
 * a single run and be bit for bit its own single run (osv_run_image): no
 * sum's order depends on the rows of a product; the bad input must fail
 * alone and have no result.
 */
static void
check_batches(const osv_model *model, const char *name, char **golden, int ngolden)
{
	static const uint8_t garbage[] = "this is not an image";
	osv_context *batch = NULL,
			   *one = NULL;
	golden_case *cases = calloc((size_t) ngolden, sizeof(*cases));
	int			ncases = 0,
				runs = 0,
				bitwise = 0,
				images = 0;
	double		worst = 0.0;
	osv_error	err;
	stats		s;

	memset(&s, 0, sizeof(s));
	CHECK(osv_context_new_batch(model, BATCH_IMAGES, &batch, &err) == OSV_OK &&
		  osv_context_new(model, &one, &err) == OSV_OK, "%s: batch contexts: %s", name, err.message);
	if (batch == NULL || one == NULL || cases == NULL)
		goto done;
	CHECK(osv_context_max_images(batch) == BATCH_IMAGES && osv_context_max_images(one) == 1,
		  "%s: capacities %d and %d", name, osv_context_max_images(batch),
		  osv_context_max_images(one));

	for (int i = 0; i < ngolden; i++)
	{
		golden_case *gc = &cases[ncases];
		char		path[1024];
		const char *image;

		snprintf(path, sizeof(path), "%s/%s/%s", GOLDEN_DIR, name, golden[i]);
		if (osv_safetensors_open(path, &gc->g, &err) != OSV_OK)
			continue;			/* check_golden has reported it */
		image = golden_meta(&gc->g, "image");
		if (image != NULL)
		{
			snprintf(gc->what, sizeof(gc->what), "%s/%s (batch)", name, image);
			snprintf(path, sizeof(path), "%s/%s", IMAGES_DIR, image);
			gc->bytes = slurp(path, &gc->size);
		}
		if (gc->bytes == NULL)
		{
			osv_safetensors_close(&gc->g);
			continue;
		}
		ncases++;
	}

	for (int start = 0; start < ncases; start += BATCH_IMAGES - 1, runs++)
	{
		int			good = ncases - start < BATCH_IMAGES - 1 ? ncases - start : BATCH_IMAGES - 1;
		int			bad = runs % (good + 1);	/* where the non-image goes */
		const uint8_t *data[BATCH_IMAGES];
		size_t		sizes[BATCH_IMAGES];
		osv_error	errs[BATCH_IMAGES];
		golden_case *of[BATCH_IMAGES];
		osv_prediction p;
		osv_status	status;

		for (int i = 0, j = 0; i <= good; i++)
		{
			of[i] = i == bad ? NULL : &cases[start + j++];
			data[i] = of[i] ? of[i]->bytes : garbage;
			sizes[i] = of[i] ? of[i]->size : sizeof(garbage);
		}
		status = osv_run_images(batch, good + 1, data, sizes, NULL, errs, &err);
		CHECK(status == OSV_OK, "%s: batch run %d: %s", name, runs, err.message);
		if (status != OSV_OK)
			continue;
		CHECK(errs[bad].status == OSV_ERR_IMAGE_UNSUPPORTED && errs[bad].message[0] != '\0' &&
			  osv_context_topk_at(batch, bad, 1, &p) == 0 &&
			  osv_context_cell_at(batch, bad, 0).cell == -1,
			  "%s: batch run %d: the non-image at %d got status %d and a result", name,
			  runs, bad, errs[bad].status);
		for (int i = 0; i <= good; i++)
		{
			int			b;
			double		e;

			if (of[i] == NULL)
				continue;
			CHECK(errs[i].status == OSV_OK, "%s: %s", of[i]->what, errs[i].message);
			if (errs[i].status != OSV_OK)
				continue;
			compare_outputs(batch, i, &of[i]->g, of[i]->what, &s.feature, &s.latlon, &s);
			images++;

			/* against the same image alone */
			b = batch->slot[i];
			status = osv_run_image(one, of[i]->bytes, of[i]->size, NULL, &err);
			CHECK(status == OSV_OK, "%s alone: %s", of[i]->what, err.message);
			if (status != OSV_OK || b < 0)
				continue;
			e = fmax(relative_error(batch->feature + (size_t) b * batch->hidden,
									one->feature, (size_t) one->hidden),
					 relative_error(batch->logits + (size_t) b * batch->cells,
									one->logits, (size_t) one->cells));
			CHECK(e <= 1e-5, "%s: batch and single runs differ by %.3g", of[i]->what, e);
			CHECK(batch->cell[b] == one->cell[0], "%s: cell %d in a batch, %d alone",
				  of[i]->what, batch->cell[b], one->cell[0]);
			worst = fmax(worst, e);
			CHECK(memcmp(batch->feature + (size_t) b * batch->hidden, one->feature,
					   (size_t) one->hidden * sizeof(float)) == 0 &&
				memcmp(batch->logits + (size_t) b * batch->cells, one->logits,
					   (size_t) one->cells * sizeof(float)) == 0 &&
				memcmp(batch->regression + (size_t) b * 2 * batch->cells, one->regression,
					   2 * (size_t) one->cells * sizeof(float)) == 0,
				  "%s: a batch run is not bit for bit the single run", of[i]->what);
			bitwise++;
		}
	}
	CHECK(images > 0, "%s: no image went through a batch", name);

	/* runs the capacity refuses; a run of inputs that are all bad */
	{
		const uint8_t *data[BATCH_IMAGES + 1];
		size_t		sizes[BATCH_IMAGES + 1];
		osv_error	errs[BATCH_IMAGES + 1];
		osv_prediction p;

		for (int i = 0; i <= BATCH_IMAGES; i++)
		{
			data[i] = garbage;
			sizes[i] = sizeof(garbage);
		}
		CHECK(osv_run_images(batch, BATCH_IMAGES + 1, data, sizes, NULL, errs, &err) ==
			  OSV_ERR_ARGUMENT && osv_run_images(batch, 0, data, sizes, NULL, errs, &err) ==
			  OSV_ERR_ARGUMENT, "%s: batch sizes 0 and %d accepted", name, BATCH_IMAGES + 1);
		CHECK(osv_run_images(batch, 2, data, sizes, NULL, errs, &err) == OSV_OK &&
			  errs[0].status != OSV_OK && errs[1].status != OSV_OK &&
			  osv_context_topk_at(batch, 0, 1, &p) == 0,
			  "%s: a run of non-images", name);
	}
	printf("%s: %d images in %d batch runs of up to %d inputs, %d of them bitwise equal "
		   "to their single runs, max batch-vs-single rel diff %.3g; feature rel err %.3g, "
		   "point %.3g deg\n", name, images, runs, BATCH_IMAGES, bitwise, worst,
		   s.feature, s.latlon);

done:
	for (int i = 0; i < ncases; i++)
	{
		osv_safetensors_close(&cases[i].g);
		free(cases[i].bytes);
	}
	free(cases);
	osv_context_free(batch);
	osv_context_free(one);
}

/* Abort callback: stop on the call number *(int *) data counts down to. */
static bool
abort_at(void *data)
{
	int		   *left = data;

	return --(*left) < 0;
}

/* Abort, determinism and accessor edge cases on one model and image. */
static void
check_run_state(osv_context *ctx, const char *image)
{
	char		path[1024];
	uint8_t    *bytes;
	size_t		size;
	osv_error	err;
	osv_params	params = osv_default_params();
	int			d = ctx->hidden,
				c = ctx->cells;
	float	   *feature = malloc((size_t) d * sizeof(float));
	float	   *logits = malloc((size_t) c * sizeof(float));
	float	   *reg = malloc(2 * (size_t) c * sizeof(float));
	int			left,
				threads;
	osv_status	status;
	osv_prediction p[4];
	static const uint8_t garbage[] = "this is not an image";

	snprintf(path, sizeof(path), "%s/%s", IMAGES_DIR, image);
	bytes = slurp(path, &size);
	CHECK(bytes != NULL, "cannot read %s", path);
	if (bytes == NULL)
		goto done;

	/* determinism: the same image twice gives bitwise the same outputs */
	status = osv_run_image(ctx, bytes, size, &params, &err);
	CHECK(status == OSV_OK, "first run: %s", err.message);
	memcpy(feature, osv_context_feature(ctx), (size_t) d * sizeof(float));
	memcpy(logits, osv_context_logits(ctx), (size_t) c * sizeof(float));
	memcpy(reg, osv_context_regression(ctx), 2 * (size_t) c * sizeof(float));
	status = osv_run_image(ctx, bytes, size, &params, &err);
	CHECK(status == OSV_OK, "second run: %s", err.message);
	CHECK(memcmp(feature, osv_context_feature(ctx), (size_t) d * sizeof(float)) == 0 &&
		  memcmp(logits, osv_context_logits(ctx), (size_t) c * sizeof(float)) == 0 &&
		  memcmp(reg, osv_context_regression(ctx), 2 * (size_t) c * sizeof(float)) == 0,
		  "two runs of %s differ", image);

	/*
	 * Every kernel path this CPU runs, on 1, 2 and 3 threads: the same
	 * outputs bit for bit (gemm.c and network.c keep every sum in one
	 * order, whatever the split and the instruction set).
	 */
	threads = osv_threads();
	for (int path = OSV_KERNELS_AVX512; path <= OSV_KERNELS_PORTABLE; path++)
	{
		if (!osv_gemm_use_kernels((osv_kernels) path))
		{
			printf("%s: the %s kernels do not run on this CPU\n", image,
				   path == OSV_KERNELS_AVX512 ? "avx512" : "avx2");
			continue;
		}
		for (int n = 1; n <= 3; n++)
		{
			osv_set_threads(n);
			status = osv_run_image(ctx, bytes, size, &params, &err);
			CHECK(status == OSV_OK, "run on %d threads: %s", n, err.message);
			CHECK(memcmp(feature, osv_context_feature(ctx), (size_t) d * sizeof(float)) == 0 &&
				  memcmp(logits, osv_context_logits(ctx), (size_t) c * sizeof(float)) == 0 &&
				  memcmp(reg, osv_context_regression(ctx), 2 * (size_t) c * sizeof(float)) == 0,
				  "%s with the %s kernels on %d threads differs from the first run",
				  image, osv_kernels_name(), n);
		}
	}
	printf("%s: avx512, avx2 and portable kernels (those this CPU runs) on 1, 2 and 3 threads checked\n",
		   image);
	osv_gemm_use_kernels(OSV_KERNELS_AUTO);
	osv_set_threads(threads);

	/* abort before block 1 (or 0 for a one-block model): calls 0 and 1 */
	left = ctx->model->info.num_layers >= 2 ? 1 : 0;
	params.abort_callback = abort_at;
	params.abort_data = &left;
	status = osv_run_image(ctx, bytes, size, &params, &err);
	CHECK(status == OSV_ERR_ABORTED && err.status == OSV_ERR_ABORTED,
		  "abort gave status %d (%s)", status, err.message);
	CHECK(strstr(err.message, "aborted") != NULL, "abort message \"%s\"", err.message);
	CHECK(osv_context_topk(ctx, 1, p) == 0, "an aborted run has no result");
	CHECK(osv_context_cell(ctx, 0).cell == -1, "an aborted run has no cell result");

	/* a callback that never fires is polled and changes nothing */
	left = 1 << 30;
	status = osv_run_image(ctx, bytes, size, &params, &err);
	CHECK(status == OSV_OK, "run after abort: %s", err.message);
	CHECK(left == (1 << 30) - ctx->model->info.num_layers - 1,
		  "abort callback polled %d times, expected %d", (1 << 30) - left,
		  ctx->model->info.num_layers + 1);
	CHECK(memcmp(feature, osv_context_feature(ctx), (size_t) d * sizeof(float)) == 0 &&
		  memcmp(logits, osv_context_logits(ctx), (size_t) c * sizeof(float)) == 0,
		  "the run after an abort differs");

	/* accessors */
	{
		osv_prediction all[2];
		int			n = osv_context_topk(ctx, 3, p);

		CHECK(n == (c < 3 ? c : 3), "topk(3) returned %d", n);
		for (int i = 1; i < n; i++)
			CHECK(p[i - 1].probability > p[i].probability ||
				  (p[i - 1].probability == p[i].probability && p[i - 1].cell < p[i].cell),
				  "top-k not sorted at %d", i);
		CHECK(p[0].cell == ctx->cell[0], "top-1 %d is not the argmax %d", p[0].cell, ctx->cell[0]);
		CHECK(osv_context_topk(ctx, 0, all) == 0, "topk(0)");
		CHECK(osv_context_cell(ctx, -1).cell == -1 && osv_context_cell(ctx, c).cell == -1,
			  "cells out of range");
		CHECK(osv_context_cell(ctx, p[0].cell).lat == p[0].lat, "cell() agrees with topk()");
		CHECK(fabs(p[0].lat) <= 90.0 && fabs(p[0].lon) <= 180.0, "point in range");
	}

	/* a bad image fails cleanly and leaves the context usable */
	status = osv_run_image(ctx, garbage, sizeof(garbage), NULL, &err);
	CHECK(status == OSV_ERR_IMAGE_UNSUPPORTED || status == OSV_ERR_IMAGE_CORRUPT,
		  "garbage gave status %d (%s)", status, err.message);
	status = osv_run_image(ctx, bytes, size, NULL, &err);
	CHECK(status == OSV_OK && memcmp(feature, osv_context_feature(ctx),
									 (size_t) d * sizeof(float)) == 0,
		  "run after a bad image differs");
	/* osv_run_pixels on the context's own pixels (memmove) */
	status = osv_run_pixels(ctx, osv_context_pixels(ctx), NULL, &err);
	CHECK(status == OSV_OK && memcmp(feature, osv_context_feature(ctx),
									 (size_t) d * sizeof(float)) == 0,
		  "run on the context's own pixels differs");

done:
	free(bytes);
	free(feature);
	free(logits);
	free(reg);
}

/* ---- bf16 and int8 ---------------------------------------------------------- */

/*
 * bf16 runs (osv_params.precision = OSV_PRECISION_BF16) against the
 * reference's bf16 mode, test/golden/models/<model>/bf16/<image>.safetensors.
 *
 * Both round the same float32 values to bfloat16 and multiply them exactly,
 * but sum the products in another order, so a product's outputs differ by
 * float32 rounding.  That alone would give errors near 1e-6, as in fp32;
 * but those outputs, after a norm or an activation, are rounded to
 * bfloat16 again on entering the next product, and a value that lies
 * within a float32 rounding of a point halfway between two bfloat16 values
 * goes to one neighbour here and to the other there: one bfloat16 step,
 * 2^-8 to 2^-7 of the value, 65536 times the float32 difference that
 * decided it.  Every product has tens of thousands of inputs, so some
 * images see a few such flips and others none: then the feature agrees to
 * about 1e-7, else to about 1e-3.  Measured (10 images each, the same
 * bits on the AVX512_BF16, AVX-512, AVX2 and portable paths): 4 of
 * tiny-gelu's images and 6 of tiny-quickgelu's flipped; the worst feature
 * error was 1.27e-3, logits 2.19e-3, regression 2.99e-3, top-1
 * probability 9.7e-4, the point 0.25 of the tolerance below; the bf16
 * features were 2.3e-3 to 4.3e-3 from the fp32 reference's (cosine
 * >= 0.999991).  A flip is one bfloat16 step of one value, so a larger
 * error takes more flips, and the error grows about as their square root:
 * the tolerances are 2 to 2.7 times the worst seen, room for four to seven
 * times as many flips as in the worst image.
 *
 * That leaves a single image's tolerance near its whole distance to fp32
 * (the worst image's error was 0.43 of it), so what shows that bf16 ran
 * is elsewhere: every image must be BF16_MIN_DISTANCE from the fp32
 * reference (4.6 times below the nearest seen, 5 times above what
 * FEATURE_RTOL lets fp32 be off by), and over a model's images the summed
 * error must stay under BF16_ERROR_SHARE of the summed distance (0.04 and
 * 0.19 seen, 0.43 for the worst image alone; a run that computed fp32
 * instead fails both, its distances being float32 rounding, and most
 * images' BF16_FEATURE_RTOL too).
 */
#define BF16_FEATURE_RTOL 3e-3
#define BF16_LOGITS_RTOL 6e-3	/* logits and regression; the point follows */
#define BF16_PROB_TOL 2.5e-3	/* top-1 probability, absolute */
#define BF16_ERROR_SHARE 0.5	/* sum of errors / sum of distances to fp32 */
#define BF16_MIN_DISTANCE 5e-4	/* feature relative distance to fp32, each image */
#define BF16_MIN_COSINE 0.9999	/* of the bf16 and fp32 features, each image */

/*
 * int8 runs (OSV_PRECISION_INT8) against the reference's int8 mode,
 * test/golden/models/<model>/int8/<image>.safetensors.
 *
 * Both quantize the same float32 values in the same float32 steps (each
 * token's and each output channel's largest magnitude to 127, to nearest
 * even) and sum the integer products exactly, so an int8 product agrees
 * bit for bit whenever its inputs do (check_int8_products shows it on
 * chosen rows).  The inputs are what the float32 parts (norms, attention,
 * GELU, residuals) make of the previous block, and those sum in another
 * order here than in PyTorch: a value whose x * 127 / largest lies within
 * a float32 rounding of a point halfway between two integers goes to one
 * integer here and to the other there.  Such a flip moves one input of a
 * product by a whole step, 1/127 of its token's largest value: over 10^5
 * times the float32 rounding that decided it (a bfloat16 flip is 65536
 * times).  The reference holds 30 to 70 values per image of tiny-gelu (1
 * to 9 of tiny-quickgelu, 17 tokens against 257) within 1e-4 of a step of
 * such a point, so some images see a flip and others none, and a
 * flip in a token that the class token barely attends to hardly moves the
 * feature.  The reference does it to itself: with only its patch
 * embedding summed in float64 instead of float32, its tiny-gelu int8
 * features move by up to 6.4e-3, on the same three images as here.
 *
 * Measured (10 images each, whole path and reference pixels alike; the
 * same bits on the AVX512_VNNI paths (vpdpbusd) and the integer C of the
 * AVX-512, AVX2 and portable paths): tiny-gelu, 3 images flipped in a way
 * that reached the feature (errors 6.4e-3, 4.0e-3, 3.1e-3), 5 by 7e-6 to
 * 1.8e-5, 2 not at all (<= 4e-7); tiny-quickgelu, 1 image (5.2e-3), the
 * others <= 2.5e-7.  Worst logits error 1.27e-2, regression 1.78e-2,
 * top-1 probability 1.65e-3, the point 0.13 of its tolerance; the int8
 * features were 6.6e-3 to 1.35e-2 from the fp32 reference's (cosine >=
 * 0.99990).  The tolerances are 2.2 to 2.4 times the worst seen, room
 * for about five times the flips of the worst image (the error grows as
 * the square root of their number).  The core's results are the same bits
 * on every CPU, so these figures hold on any machine until the core's
 * float32 order changes.
 *
 * A flip costs int8 a larger share of its distance to fp32 than bf16 (the
 * worst image's error was 0.49 of it), so that int8 ran shows, as for
 * bf16, in INT8_MIN_DISTANCE (5.3 times below the nearest seen, 12.5
 * times above FEATURE_RTOL) and INT8_ERROR_SHARE (0.13 and 0.05 seen; an
 * fp32 run would give about 1), and in a bound bf16 does without: at
 * least INT8_CLOSE_SHARE of a model's runs must agree to fp32's
 * FEATURE_RTOL (0.7 and 0.9 did).  Goldens from a reference that
 * truncated instead of rounding fail nearly every bound here; from one
 * that quantized the patch embedding too, both share bounds, the
 * probability on 11 runs of 40 and the cell on 2.  A one-ulp slip (the
 * factor as 127 times a reciprocal, the two scales multiplied first, ties
 * away from zero) moves these outputs no more than the summation order
 * does: only check_int8_products sees it.
 */
#define INT8_FEATURE_RTOL 1.5e-2
#define INT8_LOGITS_RTOL 4e-2	/* logits and regression; the point follows */
#define INT8_PROB_TOL 4e-3		/* top-1 probability, absolute */
#define INT8_ERROR_SHARE 0.5	/* sum of errors / sum of distances to fp32 */
#define INT8_MIN_DISTANCE 1.25e-3	/* feature relative distance to fp32, each image */
#define INT8_MIN_COSINE 0.999	/* of the int8 and fp32 features, each image */
#define INT8_CLOSE_RTOL FEATURE_RTOL	/* a run with no flip that reached the feature */
#define INT8_CLOSE_SHARE 0.5	/* of a model's runs, at least this share within it */

/* What a reduced precision's runs must satisfy (see above). */
typedef struct reduced_tolerances
{
	osv_precision precision;
	double		feature_rtol;	/* against the reference in the same precision */
	double		logits_rtol;	/* logits and regression; the point follows */
	double		prob_tol;		/* top-1 probability, absolute */
	double		error_share;	/* sum of errors / sum of distances to fp32 */
	double		min_distance;	/* feature relative distance to fp32, each run */
	double		min_cosine;		/* of the feature and the fp32 one, each run */
	double		close_rtol;		/* feature error of a run counted as close */
	double		close_share;	/* share of runs that must be close (0: none) */
} reduced_tolerances;

static const reduced_tolerances BF16 = {
	OSV_PRECISION_BF16, BF16_FEATURE_RTOL, BF16_LOGITS_RTOL, BF16_PROB_TOL,
	BF16_ERROR_SHARE, BF16_MIN_DISTANCE, BF16_MIN_COSINE, 0.0, 0.0
};
static const reduced_tolerances INT8 = {
	OSV_PRECISION_INT8, INT8_FEATURE_RTOL, INT8_LOGITS_RTOL, INT8_PROB_TOL,
	INT8_ERROR_SHARE, INT8_MIN_DISTANCE, INT8_MIN_COSINE, INT8_CLOSE_RTOL, INT8_CLOSE_SHARE
};

/* What the runs of one model in one reduced precision came to. */
typedef struct reduced_stats
{
	int			runs;			/* image and pixel runs compared */
	int			images;
	int			close;			/* runs within close_rtol */
	double		feature;		/* max relative error against the reference */
	double		logits;
	double		regression;
	double		latlon;			/* max degrees, top-1 point */
	double		point;			/* max point error, as a share of its tolerance */
	double		probability;	/* max abs, top-1 probability */
	double		error_sum;		/* of the feature errors against the reference */
	double		distance_sum;	/* of the feature distances to the fp32 reference */
	double		min_distance;
	double		max_distance;
	double		min_cosine;
} reduced_stats;

/* cos(a, b) in double. */
static double
cosine(const float *a, const float *b, size_t n)
{
	double		ab = 0.0,
				aa = 0.0,
				bb = 0.0;

	for (size_t i = 0; i < n; i++)
	{
		ab += (double) a[i] * b[i];
		aa += (double) a[i] * a[i];
		bb += (double) b[i] * b[i];
	}
	return aa > 0.0 && bb > 0.0 ? ab / sqrt(aa * bb) : 0.0;
}

/*
 * Compare the outputs of the context's last run, in t->precision, with
 * that precision's golden file g, and its feature with the fp32 golden
 * file fp32.
 */
static void
compare_reduced(osv_context *ctx, const osv_safetensors *g, const osv_safetensors *fp32,
				const char *what, const reduced_tolerances *t, reduced_stats *s)
{
	const char *pname = osv_precision_name(t->precision);
	int			d = ctx->hidden,
				c = ctx->cells;
	const osv_tensor *feature = golden_tensor(g, "feature", OSV_DTYPE_F32, d, what);
	const osv_tensor *logits = golden_tensor(g, "logits", OSV_DTYPE_F32, c, what);
	const osv_tensor *reg = golden_tensor(g, "regression", OSV_DTYPE_F32, 2 * (uint64_t) c, what);
	const osv_tensor *cell = golden_tensor(g, "cell", OSV_DTYPE_I64, 1, what);
	const osv_tensor *latlon = golden_tensor(g, "latlon", OSV_DTYPE_F64, 2, what);
	const osv_tensor *tprobs = golden_tensor(g, "topk_probs", OSV_DTYPE_F64, 0, what);
	const osv_tensor *feature32 = golden_tensor(fp32, "feature", OSV_DTYPE_F32, d, what);
	osv_prediction top;
	double		e,
				distance,
				cos;

	CHECK(feature && logits && reg && cell && latlon && tprobs && tprobs->num_elements >= 1 &&
		  feature32, "%s: a golden tensor is missing or malformed", what);
	CHECK(ctx->has_result, "%s: no result", what);
	if (!(feature && logits && reg && cell && latlon && tprobs && tprobs->num_elements >= 1 &&
		  feature32) || !ctx->has_result)
		return;
	s->runs++;

	e = relative_error(osv_context_feature(ctx), feature->data, (size_t) d);
	CHECK(e <= t->feature_rtol, "%s: feature relative error %.3g against the %s reference",
		  what, e, pname);
	s->feature = fmax(s->feature, e);
	s->error_sum += e;
	s->close += e <= t->close_rtol;

	distance = relative_error(osv_context_feature(ctx), feature32->data, (size_t) d);
	cos = cosine(osv_context_feature(ctx), feature32->data, (size_t) d);
	CHECK(distance >= t->min_distance, "%s: the %s feature is within %.3g of the fp32 "
		  "reference's: did the run use fp32?", what, pname, distance);
	CHECK(cos >= t->min_cosine, "%s: cosine %.6f of the %s and fp32 features", what, cos, pname);
	s->distance_sum += distance;
	s->min_distance = s->runs == 1 ? distance : fmin(s->min_distance, distance);
	s->max_distance = fmax(s->max_distance, distance);
	s->min_cosine = s->runs == 1 ? cos : fmin(s->min_cosine, cos);

	e = relative_error(osv_context_logits(ctx), logits->data, (size_t) c);
	CHECK(e <= t->logits_rtol, "%s: logits relative error %.3g", what, e);
	s->logits = fmax(s->logits, e);
	e = relative_error(osv_context_regression(ctx), reg->data, 2 * (size_t) c);
	CHECK(e <= t->logits_rtol, "%s: regression relative error %.3g", what, e);
	s->regression = fmax(s->regression, e);

	CHECK(osv_context_topk(ctx, 1, &top) == 1, "%s: no top-1", what);
	CHECK(top.cell == ((const int64_t *) cell->data)[0], "%s: cell %d, reference %lld",
		  what, top.cell, (long long) ((const int64_t *) cell->data)[0]);
	if (top.cell != ((const int64_t *) cell->data)[0])
		return;
	e = point_error_rtol(ctx, &top, latlon->data, reg->data, t->logits_rtol);
	CHECK(e <= 1.0, "%s: point (%.9f, %.9f), reference (%.9f, %.9f)", what, top.lat, top.lon,
		  ((const double *) latlon->data)[0], ((const double *) latlon->data)[1]);
	s->point = fmax(s->point, e);
	s->latlon = fmax(s->latlon, fmax(fabs(top.lat - ((const double *) latlon->data)[0]),
									 fabs(top.lon - ((const double *) latlon->data)[1])));
	e = fabs(top.probability - ((const double *) tprobs->data)[0]);
	CHECK(e <= t->prob_tol, "%s: probability %.9g, reference %.9g", what, top.probability,
		  ((const double *) tprobs->data)[0]);
	s->probability = fmax(s->probability, e);
}

/*
 * The same images in the reduced precision through osv_run_images,
 * BATCH_IMAGES at a time, and the first on every kernel path and 1, 2 and
 * 3 threads: bit for bit the single run each time (the sums keep their
 * order in bf16 too, and the paths without AVX512_BF16 emulate vdpbf16ps
 * bit for bit; int8 sums are exact integers, by vpdpbusd or in C).
 */
static void
check_reduced_determinism(const osv_model *model, const char *name, osv_precision precision,
						  uint8_t **bytes, size_t *sizes, int n)
{
	const char *pname = osv_precision_name(precision);
	osv_context *batch = NULL,
			   *one = NULL;
	osv_params	params = osv_default_params();
	osv_error	err;
	osv_error	errs[BATCH_IMAGES];
	int			bitwise = 0,
				threads = osv_threads();
	float	   *feature = NULL,
			   *logits = NULL;
	char		paths[160];

	params.precision = precision;
	CHECK(osv_context_new_batch(model, BATCH_IMAGES, &batch, &err) == OSV_OK &&
		  osv_context_new(model, &one, &err) == OSV_OK, "%s %s: contexts: %s", name, pname,
		  err.message);
	if (batch == NULL || one == NULL || n < 1)
		goto done;
	for (int start = 0; start < n; start += BATCH_IMAGES)
	{
		int			m = n - start < BATCH_IMAGES ? n - start : BATCH_IMAGES;

		osv_status	status = osv_run_images(batch, m, (const uint8_t *const *) bytes + start,
											sizes + start, &params, errs, &err);

		CHECK(status == OSV_OK, "%s %s batch: %s", name, pname, err.message);
		if (status != OSV_OK)
			continue;
		for (int i = 0; i < m; i++)
		{
			int			b = batch->slot[i];

			CHECK(errs[i].status == OSV_OK && b >= 0, "%s %s batch image %d: %s", name, pname,
				  start + i, errs[i].message);
			if (errs[i].status != OSV_OK || b < 0 ||
				osv_run_image(one, bytes[start + i], sizes[start + i], &params, &err) != OSV_OK)
				continue;
			CHECK(memcmp(batch->feature + (size_t) b * batch->hidden, one->feature,
						 (size_t) one->hidden * sizeof(float)) == 0 &&
				  memcmp(batch->logits + (size_t) b * batch->cells, one->logits,
						 (size_t) one->cells * sizeof(float)) == 0 &&
				  memcmp(batch->regression + (size_t) b * 2 * batch->cells, one->regression,
						 2 * (size_t) one->cells * sizeof(float)) == 0,
				  "%s %s: image %d in a batch is not bit for bit its single run", name, pname,
				  start + i);
			bitwise++;
		}
	}

	if (osv_run_image(one, bytes[0], sizes[0], &params, &err) != OSV_OK)
	{
		CHECK(false, "%s %s: %s", name, pname, err.message);
		goto done;
	}
	feature = malloc((size_t) one->hidden * sizeof(float));
	logits = malloc((size_t) one->cells * sizeof(float));
	memcpy(feature, one->feature, (size_t) one->hidden * sizeof(float));
	memcpy(logits, one->logits, (size_t) one->cells * sizeof(float));
	paths[0] = '\0';
	for (int path = OSV_KERNELS_AUTO + 1; path <= OSV_KERNELS_PORTABLE; path++)
	{
		if (!osv_gemm_use_kernels((osv_kernels) path))
			continue;
		snprintf(paths + strlen(paths), sizeof(paths) - strlen(paths), "%s%s",
				 paths[0] ? ", " : "", osv_kernels_name());
		for (int t = 1; t <= 3; t++)
		{
			osv_set_threads(t);
			CHECK(osv_run_image(one, bytes[0], sizes[0], &params, &err) == OSV_OK &&
				  memcmp(feature, one->feature, (size_t) one->hidden * sizeof(float)) == 0 &&
				  memcmp(logits, one->logits, (size_t) one->cells * sizeof(float)) == 0,
				  "%s %s with the %s kernels on %d threads differs", name, pname,
				  osv_kernels_name(), t);
		}
	}
	osv_gemm_use_kernels(OSV_KERNELS_AUTO);
	osv_set_threads(threads);
	printf("%s %s: %d images bit for bit in batches of %d and alone; the first on the "
		   "kernel paths this CPU runs (%s) and 1 to 3 threads\n", name, pname, bitwise,
		   BATCH_IMAGES, paths);

done:
	free(feature);
	free(logits);
	osv_context_free(batch);
	osv_context_free(one);
}

/*
 * The golden files of one model in t->precision, if it has any: each
 * image in that precision (whole path, then the network on the
 * reference's pixels), against the reference's outputs in that precision
 * and, for distance, its fp32 feature; then the same image in fp32 on the
 * same context (the precision is the call's, nothing of it stays behind);
 * then check_reduced_determinism.  Returns the number of images compared.
 */
static int
check_reduced(const osv_model *model, const char *name, const reduced_tolerances *t)
{
	const char *pname = osv_precision_name(t->precision);
	const osv_model_info *info = osv_model_get_info(model);
	size_t		count = 3 * (size_t) info->image_size * info->image_size;
	char		dir[1024];
	char	   *golden[MAX_NAMES];
	uint8_t    *bytes[MAX_NAMES];
	size_t		sizes[MAX_NAMES];
	int			ngolden,
				nbytes = 0;
	osv_context *ctx = NULL;
	osv_params	reduced = osv_default_params(),
				fp32 = osv_default_params();
	osv_error	err;
	reduced_stats s;
	char		close[64];

	memset(&s, 0, sizeof(s));
	reduced.precision = t->precision;
	snprintf(dir, sizeof(dir), "%s/%s/%s", GOLDEN_DIR, name, pname);
	ngolden = list_dir(dir, ".safetensors", golden);
	if (ngolden == 0)
		return 0;
	CHECK(osv_context_new(model, &ctx, &err) == OSV_OK, "%s %s: context: %s", name, pname,
		  err.message);

	for (int i = 0; i < ngolden && ctx != NULL; i++)
	{
		char		path[2048],
					what[2048];
		osv_safetensors g,
					g32;
		const char *image;
		uint8_t    *data;
		size_t		size;
		float	   *pixels;
		osv_status	status;

		snprintf(path, sizeof(path), "%s/%s", dir, golden[i]);
		status = osv_safetensors_open(path, &g, &err);
		CHECK(status == OSV_OK, "%s: %s", path, err.message);
		if (status != OSV_OK)
			continue;
		image = golden_meta(&g, "image");
		CHECK(image != NULL && golden_meta(&g, "precision") != NULL &&
			  strcmp(golden_meta(&g, "precision"), pname) == 0,
			  "%s: no __metadata__ image or precision %s", path, pname);
		snprintf(path, sizeof(path), "%s/%s/%s.safetensors", GOLDEN_DIR, name,
				 image ? image : "?");
		if (image == NULL || osv_safetensors_open(path, &g32, &err) != OSV_OK)
		{
			CHECK(false, "%s: no fp32 golden file to compare with", path);
			osv_safetensors_close(&g);
			continue;
		}
		snprintf(path, sizeof(path), "%s/%s", IMAGES_DIR, image);
		data = slurp(path, &size);
		CHECK(data != NULL, "cannot read %s", path);
		if (data != NULL)
		{
			snprintf(what, sizeof(what), "%s/%s (%s)", name, image, pname);
			status = osv_run_image(ctx, data, size, &reduced, &err);
			CHECK(status == OSV_OK, "%s: %s", what, err.message);
			if (status == OSV_OK)
			{
				compare_reduced(ctx, &g, &g32, what, t, &s);
				s.images++;
			}

			/* then fp32 on the same context: the fp32 reference's feature again */
			snprintf(what, sizeof(what), "%s/%s (fp32 after %s)", name, image, pname);
			status = osv_run_image(ctx, data, size, &fp32, &err);
			CHECK(status == OSV_OK, "%s: %s", what, err.message);
			if (status == OSV_OK)
			{
				const osv_tensor *f32 = golden_tensor(&g32, "feature", OSV_DTYPE_F32,
													  (uint64_t) ctx->hidden, what);
				double		e = f32 ? relative_error(osv_context_feature(ctx), f32->data,
													 (size_t) ctx->hidden) : 1.0;

				CHECK(e <= FEATURE_RTOL, "%s: feature relative error %.3g", what, e);
			}
			bytes[nbytes] = data;
			sizes[nbytes++] = size;
		}

		/* the network alone, on the reference's pixels */
		pixels = golden_pixels(&g, image, count);
		CHECK(pixels != NULL, "%s/%s (%s): no reference pixels", name, image, pname);
		if (pixels != NULL)
		{
			snprintf(what, sizeof(what), "%s/%s (%s, reference pixels)", name, image, pname);
			status = osv_run_pixels(ctx, pixels, &reduced, &err);
			CHECK(status == OSV_OK, "%s: %s", what, err.message);
			if (status == OSV_OK)
				compare_reduced(ctx, &g, &g32, what, t, &s);
			free(pixels);
		}
		osv_safetensors_close(&g32);
		osv_safetensors_close(&g);
	}

	/* the precision is what ran: far nearer its reference than the fp32 one */
	CHECK(s.runs > 0 && s.error_sum <= t->error_share * s.distance_sum,
		  "%s %s: summed feature error against the %s reference %.3g, %.3g of the "
		  "summed distance to fp32", name, pname, pname, s.error_sum,
		  s.distance_sum > 0.0 ? s.error_sum / s.distance_sum : 0.0);
	CHECK(s.close >= t->close_share * s.runs,
		  "%s %s: %d of %d runs within %.3g of the %s reference", name, pname, s.close,
		  s.runs, t->close_rtol, pname);
	close[0] = '\0';
	if (t->close_share > 0.0)
		snprintf(close, sizeof(close), " (%d runs within %.3g)", s.close, t->close_rtol);
	printf("%s %s: %d images, %d runs; against the %s reference: feature rel err %.3g%s, "
		   "logits %.3g, regression %.3g, point %.3g deg (%.2f of its tolerance), top-1 prob "
		   "%.3g; against fp32: feature distance %.3g to %.3g, cosine >= %.7f; errors %.3g of "
		   "the distances\n",
		   name, pname, s.images, s.runs, pname, s.feature, close, s.logits, s.regression,
		   s.latlon, s.point, s.probability, s.min_distance, s.max_distance, s.min_cosine,
		   s.distance_sum > 0.0 ? s.error_sum / s.distance_sum : 0.0);

	check_reduced_determinism(model, name, t->precision, bytes, sizes, nbytes);
	for (int i = 0; i < nbytes; i++)
		free(bytes[i]);
	for (int i = 0; i < ngolden; i++)
		free(golden[i]);
	osv_context_free(ctx);
	return s.images;
}

/* ---- int8 products ----------------------------------------------------------- */

/*
 * Single int8 products of the reference's Int8Linear
 * (test/golden/int8_products.safetensors, make_golden.py int8_products):
 * C = A W^T + bias, and the same added to a residual C0, bit for bit on
 * every kernel path this CPU runs, on 1 and 2 threads, serially, and from
 * weights quantized and packed in advance (as a pack cache holds them).
 * Their rows hold ties (x * 127 / largest exactly an integer and a half),
 * zero rows, rows where 127 * (1 / largest) would round a value apart from
 * 127 / largest, and sums past 2^24.  A slip of one step there is below
 * what the whole-network comparison above can see (the float32 noise of
 * summation order flips values anyway); here nothing else differs, so
 * the two must agree bit for bit.  Returns the number of products compared.
 */
static int
check_int8_products(void)
{
	static const char *const cases[] = {"small", "long"};
	osv_safetensors g;
	osv_error	err;
	osv_status	status = osv_safetensors_open(INT8_PRODUCTS, &g, &err);
	int			compared = 0;
	char		paths[160];

	CHECK(status == OSV_OK, "%s: %s", INT8_PRODUCTS, err.message);
	if (status != OSV_OK)
		return 0;
	for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++)
	{
		char		name[64];
		const osv_tensor *t[6];
		static const char *const parts[] = {"a", "w", "bias", "c0", "out", "out_residual"};
		int			m,
					n,
					k;
		size_t		bytes;
		float	   *out,
				   *packed_a,
				   *scratch;

		for (int i = 0; i < 6; i++)
		{
			snprintf(name, sizeof(name), "%s_%s", cases[c], parts[i]);
			t[i] = golden_tensor(&g, name, OSV_DTYPE_F32, 0, INT8_PRODUCTS);
			CHECK(t[i] != NULL, "%s: no %s", INT8_PRODUCTS, name);
			if (t[i] == NULL)
				goto next;
		}
		m = (int) t[0]->shape[0];
		k = (int) t[0]->shape[1];
		n = (int) t[1]->shape[0];
		CHECK(t[0]->ndim == 2 && t[1]->ndim == 2 && t[1]->shape[1] == k &&
			  t[2]->num_elements == (uint64_t) n && t[3]->num_elements == (uint64_t) m * n &&
			  t[4]->num_elements == (uint64_t) m * n && t[5]->num_elements == (uint64_t) m * n,
			  "%s: %s shapes do not fit", INT8_PRODUCTS, cases[c]);
		if (!(t[0]->ndim == 2 && t[1]->ndim == 2 && t[1]->shape[1] == k &&
			  t[2]->num_elements == (uint64_t) n && t[3]->num_elements == (uint64_t) m * n &&
			  t[4]->num_elements == (uint64_t) m * n && t[5]->num_elements == (uint64_t) m * n))
			goto next;
		bytes = (size_t) m * n * sizeof(float);
		out = malloc(bytes);
		packed_a = malloc(osv_gemm_packed_a_floats(m, k) * sizeof(float));
		scratch = aligned_alloc(64, (osv_gemm_scratch_floats(m, k) * sizeof(float) + 63) / 64 * 64);

		for (int residual = 0; residual <= 1; residual++)
		{
			const float *want = t[residual ? 5 : 4]->data;
			osv_gemm	gm = {
				.m = m,.n = n,.k = k,.a = t[0]->data,.lda = (size_t) k,.b = t[1]->data,
				.ldb = (size_t) k,.b_is_nk = true,.alpha = 1.0f,.bias = t[2]->data,
				.accumulate = residual,.c = out,.ldc = (size_t) n,.int8 = true
			};

			paths[0] = '\0';
			for (int path = OSV_KERNELS_AUTO + 1; path <= OSV_KERNELS_PORTABLE; path++)
			{
				osv_gemm	packed = gm;
				uint8_t    *packed8;

				if (!osv_gemm_use_kernels((osv_kernels) path))
					continue;
				snprintf(paths + strlen(paths), sizeof(paths) - strlen(paths), "%s%s",
						 paths[0] ? ", " : "", osv_kernels_name());
				for (int nth = 1; nth <= 2; nth++)
				{
					CHECK(osv_pool_prepare(nth, osv_gemm_scratch_floats(0, k) * sizeof(float),
										   &err) == OSV_OK, "pool: %s", err.message);
					memcpy(out, t[3]->data, bytes);
					osv_gemm_run(&gm, packed_a);
					CHECK(memcmp(out, want, bytes) == 0, "int8 product %s%s: the %s kernels on %d "
						  "threads are not the reference's bits", cases[c],
						  residual ? " + residual" : "", osv_kernels_name(), nth);
				}
				memcpy(out, t[3]->data, bytes);
				osv_gemm_serial(&gm, scratch);
				CHECK(memcmp(out, want, bytes) == 0, "int8 product %s%s: the %s kernels, serial, "
					  "are not the reference's bits", cases[c], residual ? " + residual" : "",
					  osv_kernels_name());
				/* the layout of a pack cache: quantized and packed for this path's panels */
				packed.b_packed8_nr = osv_gemm_nr();
				packed8 = aligned_alloc(64, (osv_gemm_packed_weight_int8_bytes(n, k, packed.b_packed8_nr)
											 + 63) / 64 * 64);
				osv_gemm_pack_weight_int8(gm.b, n, k, packed.b_packed8_nr, packed8);
				packed.b_packed8 = packed8;
				memcpy(out, t[3]->data, bytes);
				osv_gemm_run(&packed, packed_a);
				CHECK(memcmp(out, want, bytes) == 0, "int8 product %s%s: the %s kernels, weights "
					  "packed in advance, are not the reference's bits", cases[c],
					  residual ? " + residual" : "", osv_kernels_name());
				free(packed8);
			}
			osv_gemm_use_kernels(OSV_KERNELS_AUTO);
			compared++;
		}
		printf("int8 products %s [%d, %d] x [%d, %d]^T + bias, and + a residual: bit for bit the "
			   "reference's on the kernel paths this CPU runs (%s), 1 and 2 threads, serial "
			   "and packed in advance\n", cases[c], m, k, n, k, paths);
		free(out);
		free(packed_a);
		free(scratch);
next:
		;
	}
	osv_safetensors_close(&g);
	return compared;
}

int
main(void)
{
	char	   *models[MAX_NAMES];
	int			nmodels = 0;
	int			compared = 0,
				compared_bf16 = 0,
				compared_int8 = 0;
	bool		state_checked = false;
	DIR		   *d = opendir(MODELS_DIR);
	struct dirent *e;

	/*
	 * model directories: those holding a model.safetensors, or a
	 * pytorch_model.bin (the published layout, <name>-pt)
	 */
	while (d != NULL && (e = readdir(d)) != NULL && nmodels < MAX_NAMES)
	{
		char		path[1024];
		char		pt[1024];
		FILE	   *f;

		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "%s/%s/model.safetensors", MODELS_DIR, e->d_name);
		snprintf(pt, sizeof(pt), "%s/%s/pytorch_model.bin", MODELS_DIR, e->d_name);
		if ((f = fopen(path, "rb")) == NULL && (f = fopen(pt, "rb")) == NULL)
			continue;
		fclose(f);
		models[nmodels++] = strdup(e->d_name);
	}
	if (d != NULL)
		closedir(d);
	qsort(models, (size_t) nmodels, sizeof(char *), compare_names);
	CHECK(nmodels > 0, "no models in %s: nothing was compared", MODELS_DIR);

	for (int m = 0; m < nmodels; m++)
	{
		char		dir[1024];
		char	   *golden[MAX_NAMES];
		int			ngolden;
		osv_model  *model = NULL;
		osv_context *ctx = NULL;
		osv_error	err;
		osv_status	status;
		stats		s;

		memset(&s, 0, sizeof(s));
		snprintf(dir, sizeof(dir), "%s/%s", MODELS_DIR, models[m]);
		status = osv_model_open(dir, NULL, &model, &err);
		CHECK(status == OSV_OK, "%s: %s", dir, err.message);
		if (status == OSV_OK)
		{
			status = osv_context_new(model, &ctx, &err);
			CHECK(status == OSV_OK, "%s: context: %s", dir, err.message);
		}
		snprintf(dir, sizeof(dir), "%s/%s", GOLDEN_DIR, models[m]);
		ngolden = list_dir(dir, ".safetensors", golden);
		CHECK(ngolden > 0, "no golden files in %s", dir);
		for (int i = 0; i < ngolden; i++)
		{
			if (ctx != NULL)
				check_golden(ctx, models[m], golden[i], &s);
			/* the run-state checks once, on the first model with an image */
			if (ctx != NULL && !state_checked && i == 0 && s.images > 0)
			{
				char		image[512];

				snprintf(image, sizeof(image), "%.*s", (int) (strlen(golden[i]) - 12), golden[i]);
				check_run_state(ctx, image);
				state_checked = true;
			}
		}
		if (model != NULL)
		{
			check_batches(model, models[m], golden, ngolden);
			compared_bf16 += check_reduced(model, models[m], &BF16);
			compared_int8 += check_reduced(model, models[m], &INT8);
		}
		for (int i = 0; i < ngolden; i++)
			free(golden[i]);
		compared += s.images;
		printf("%s: %d images, %d on reference pixels; max pixel diff %.3g, "
			   "feature rel err %.3g (%.3g on reference pixels), logits %.3g, "
			   "regression %.3g, point %.3g deg (%.3g), top-k prob %.3g\n",
			   models[m], s.images, s.pixel_runs, s.pixels, s.feature, s.feature_px,
			   s.logits, s.regression, s.latlon, s.latlon_px, s.probs);
		osv_context_free(ctx);
		osv_model_close(model);
		free(models[m]);
	}
	CHECK(compared > 0, "no image was compared with the reference");
	CHECK(compared_bf16 > 0, "no image was compared with the reference's bf16 mode");
	CHECK(compared_int8 > 0, "no image was compared with the reference's int8 mode");
	CHECK(check_int8_products() == 4, "the reference's int8 products were not all compared");
	CHECK(state_checked, "the abort and determinism checks did not run");
	return check_summary("test_fidelity");
}
