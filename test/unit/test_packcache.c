/*
 * test_packcache.c: the pack cache (packcache.c) on a copy of tiny-gelu in
 * a temporary directory: results with the cache are bit for bit those
 * without; a second process (here: a second open) reuses the file without
 * rewriting it; a truncated file, or one that others may write, is
 * replaced; touching the weights file gives a new file; a directory that
 * others may write, or a relative path, is refused and leaves the model
 * working without a cache.
 */
#include "internal.h"

#include "check.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MODEL "test/models/tiny-gelu"
#define IMAGE "test/data/images/jpeg_420_640x480.jpg"

static unsigned char image[1 << 20];
static size_t image_size;

/* Run the image on model in precision; the logits and regression into out (C + 2 x C floats). */
static void
run_in(osv_model *model, osv_precision precision, float *out)
{
	osv_context *ctx;
	osv_error	err;
	osv_params	params = osv_default_params();
	int			c = osv_model_get_info(model)->num_cells;

	params.precision = precision;
	CHECK(osv_context_new(model, &ctx, &err) == OSV_OK, "context: %s", err.message);
	CHECK(osv_run_image(ctx, image, image_size, &params, &err) == OSV_OK, "run: %s", err.message);
	memcpy(out, osv_context_logits(ctx), (size_t) c * sizeof(float));
	memcpy(out + c, osv_context_regression(ctx), 2 * (size_t) c * sizeof(float));
	osv_context_free(ctx);
}

static void
run(osv_model *model, float *out)
{
	run_in(model, OSV_PRECISION_FP32, out);
}

static osv_model *
open_model(const char *dir)
{
	osv_model  *m = NULL;
	osv_error	err;

	CHECK(osv_model_open(dir, NULL, &m, &err) == OSV_OK, "open %s: %s", dir, err.message);
	return m;
}

int
main(void)
{
	char		root[] = "/tmp/osv5m-packcache-XXXXXX";
	char		model_dir[256],
				cache[256],
				cmd[1024],
				first[1024];
	osv_model  *m;
	osv_error	err;
	float	   *want,
			   *got;
	struct stat st,
				st2;
	FILE	   *f = fopen(IMAGE, "rb");
	int			c;

	CHECK(f != NULL, "cannot read %s", IMAGE);
	if (f == NULL)
		return check_summary("test_packcache");
	image_size = fread(image, 1, sizeof(image), f);
	fclose(f);
	CHECK(mkdtemp(root) != NULL, "mkdtemp");
	snprintf(model_dir, sizeof(model_dir), "%s/model", root);
	snprintf(cache, sizeof(cache), "%s/cache", root);
	snprintf(cmd, sizeof(cmd), "cp -r %s %s && mkdir -m 700 %s", MODEL, model_dir, cache);
	CHECK(system(cmd) == 0, "%s", cmd);

	/* without, then with the cache: the same bits */
	m = open_model(model_dir);
	c = osv_model_get_info(m)->num_cells;
	want = malloc(3 * (size_t) c * sizeof(float));
	got = malloc(3 * (size_t) c * sizeof(float));
	run(m, want);
	CHECK(osv_model_use_pack_cache(m, cache, OSV_PRECISION_FP32, &err) == OSV_OK, "use: %s", err.message);
	snprintf(first, sizeof(first), "%s", osv_model_get_info(m)->pack_cache_path);
	CHECK(strncmp(first, cache, strlen(cache)) == 0, "cache file \"%s\"", first);
	run(m, got);
	CHECK(memcmp(want, got, 3 * (size_t) c * sizeof(float)) == 0, "results with the pack cache differ");
	CHECK(stat(first, &st) == 0 && (st.st_mode & 0777) == 0600, "cache file mode %o", st.st_mode & 0777);

	/* bf16 and int8: a file each, the same bits as packed on the fly; fp32 unchanged */
	for (int p = OSV_PRECISION_BF16; p <= OSV_PRECISION_INT8; p++)
	{
		float	   *want_p = malloc(3 * (size_t) c * sizeof(float));
		const char *name = osv_precision_name((osv_precision) p);
		const char *path_p;

		run_in(m, (osv_precision) p, want_p);
		CHECK(memcmp(want_p, want, 3 * (size_t) c * sizeof(float)) != 0,
			  "%s gives float32's bits: the precision is not applied", name);
		CHECK(osv_model_use_pack_cache(m, cache, (osv_precision) p, &err) == OSV_OK, "use %s: %s", name, err.message);
		path_p = p == OSV_PRECISION_BF16 ? osv_model_get_info(m)->pack_cache_path_bf16
			: osv_model_get_info(m)->pack_cache_path_int8;
		CHECK(strncmp(path_p, cache, strlen(cache)) == 0 && strcmp(path_p, first) != 0,
			  "%s cache file \"%s\" (float32's: \"%s\")", name, path_p, first);
		run_in(m, (osv_precision) p, got);
		CHECK(memcmp(want_p, got, 3 * (size_t) c * sizeof(float)) == 0, "%s results with the pack cache differ", name);
		run(m, got);
		CHECK(memcmp(want, got, 3 * (size_t) c * sizeof(float)) == 0,
			  "float32 results with the %s cache in use differ", name);
		free(want_p);
	}
	CHECK(strcmp(osv_model_get_info(m)->pack_cache_path_bf16, osv_model_get_info(m)->pack_cache_path_int8) != 0,
		  "bf16 and int8 share a file");
	osv_model_close(m);

	/* reused as it is by the next open */
	m = open_model(model_dir);
	CHECK(osv_model_use_pack_cache(m, cache, OSV_PRECISION_FP32, &err) == OSV_OK, "reuse: %s", err.message);
	CHECK(strcmp(osv_model_get_info(m)->pack_cache_path, first) == 0 &&
		  stat(first, &st2) == 0 && st2.st_ino == st.st_ino, "the cache file was rewritten");
	run(m, got);
	CHECK(memcmp(want, got, 3 * (size_t) c * sizeof(float)) == 0, "results with the reused cache differ");
	osv_model_close(m);

	/* truncated, then writable by others: replaced */
	CHECK(truncate(first, st.st_size / 2) == 0, "truncate");
	m = open_model(model_dir);
	CHECK(osv_model_use_pack_cache(m, cache, OSV_PRECISION_FP32, &err) == OSV_OK, "after truncation: %s", err.message);
	CHECK(stat(first, &st2) == 0 && st2.st_size == st.st_size, "a truncated file was kept");
	run(m, got);
	CHECK(memcmp(want, got, 3 * (size_t) c * sizeof(float)) == 0, "results after truncation differ");
	osv_model_close(m);
	CHECK(chmod(first, 0666) == 0, "chmod");
	m = open_model(model_dir);
	CHECK(osv_model_use_pack_cache(m, cache, OSV_PRECISION_FP32, &err) == OSV_OK, "after chmod: %s", err.message);
	CHECK(stat(first, &st2) == 0 && (st2.st_mode & 0777) == 0600, "a file others may write was kept");
	osv_model_close(m);

	/* the weights file touched: another file */
	snprintf(cmd, sizeof(cmd), "touch -d '2001-02-03 04:05:06' %s/model.safetensors", model_dir);
	CHECK(system(cmd) == 0, "%s", cmd);
	m = open_model(model_dir);
	CHECK(osv_model_use_pack_cache(m, cache, OSV_PRECISION_FP32, &err) == OSV_OK, "after touch: %s", err.message);
	CHECK(strcmp(osv_model_get_info(m)->pack_cache_path, first) != 0,
		  "a touched weights file kept its cache file");
	osv_model_close(m);

	/* refused: a directory others may write, a relative path; the model still runs */
	CHECK(chmod(cache, 0777) == 0, "chmod");
	m = open_model(model_dir);
	CHECK(osv_model_use_pack_cache(m, cache, OSV_PRECISION_FP32, &err) == OSV_ERR_ARGUMENT &&
		  strstr(err.message, "writable by no one else") != NULL, "an open directory: %s", err.message);
	CHECK(osv_model_use_pack_cache(m, "relative/dir", OSV_PRECISION_FP32, &err) == OSV_ERR_ARGUMENT, "a relative path");
	CHECK(osv_model_get_info(m)->pack_cache_path[0] == '\0', "a refused cache is in use");
	run(m, got);
	CHECK(memcmp(want, got, 3 * (size_t) c * sizeof(float)) == 0, "results without the cache differ");
	osv_model_close(m);

	snprintf(cmd, sizeof(cmd), "rm -rf %s", root);
	CHECK(system(cmd) == 0, "%s", cmd);
	free(want);
	free(got);
	return check_summary("test_packcache");
}
