/*
 * fuzz_model.c: libFuzzer harness over the model loader: the safetensors
 * container, config.json, the quadtree CSV and osv_model_open on a
 * directory holding all three.
 *
 * Input format: up to three parts separated by the line SPLIT below,
 *     <model.safetensors bytes> SPLIT <config.json> SPLIT <quadtree CSV>
 * A separator keeps the parts aligned when libFuzzer inserts or deletes
 * bytes (a length prefix would shift every part at each mutation); it is
 * in the dictionary so the fuzzer finds it.  A missing part is absent:
 * with no config part the directory has no config.json, so that path is
 * fuzzed too.
 *
 * Each part goes first to its parser from memory, then the three are
 * written to a private temporary directory and opened as a model.  A model
 * that opens and is tiny (the seeds' 8-wide one, or a config twisting it)
 * is also run once, so that hyperparameters the loader accepted are known
 * to be safe for the network: cells in range, no out-of-bounds access.
 *
 * Invariants beyond ASan/UBSan: every failure has a status and a non-empty
 * message; every indexed tensor lies inside the buffer.
 */
#define _GNU_SOURCE				/* memmem */
#include "internal.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SPLIT "\n==osv==\n"
#define SPLIT_LEN (sizeof(SPLIT) - 1)

/* Run the network only on models this small (multiply-adds x 2). */
#define FUZZ_MAX_GFLOP 0.001

#define FUZZ_ASSERT(cond) do { if (!(cond)) __builtin_trap(); } while (0)

static char dir[256];			/* temporary model directory, made once */

/* A failure must carry its status and a terminated, non-empty message. */
static void
check_error(osv_status status, const osv_error *err)
{
	FUZZ_ASSERT(status != OSV_OK);
	FUZZ_ASSERT(err->status == status);
	FUZZ_ASSERT(memchr(err->message, '\0', sizeof(err->message)) != NULL);
	FUZZ_ASSERT(err->message[0] != '\0');
}

/* Remove the temporary directory when libFuzzer exits normally. */
static void
remove_dir(void)
{
	static const char *const names[] = {"model.safetensors", "config.json",
	"quadtree_10_1000.csv"};
	char		path[512];

	for (int i = 0; i < 3; i++)
	{
		snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
		unlink(path);
	}
	rmdir(dir);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	const char *tmp = getenv("TMPDIR");

	snprintf(dir, sizeof(dir), "%s/osv5m-fuzz-XXXXXX", tmp ? tmp : "/tmp");
	if (mkdtemp(dir) == NULL)
	{
		perror("mkdtemp");
		exit(1);
	}
	atexit(remove_dir);
	osv_set_threads(1);
	return 0;
}

/* Write len bytes to dir/name, or remove it when present is false. */
static void
write_file(const char *name, const uint8_t *buf, size_t len, bool present)
{
	char		path[512];
	int			fd;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	unlink(path);
	if (!present)
		return;
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	FUZZ_ASSERT(fd >= 0);
	while (len > 0)
	{
		ssize_t		n = write(fd, buf, len);

		FUZZ_ASSERT(n > 0);
		buf += n;
		len -= (size_t) n;
	}
	close(fd);
}

/* The safetensors parser from memory: every tensor must lie in buf. */
static void
fuzz_safetensors(const uint8_t *buf, size_t len)
{
	osv_safetensors st;
	osv_error	err;
	osv_status	status;
	uint8_t		x = 0;

	memset(&err, 0, sizeof(err));
	status = osv_safetensors_parse(buf, len, &st, &err);
	if (status != OSV_OK)
	{
		check_error(status, &err);
		return;
	}
	for (int i = 0; i < st.num_tensors; i++)
	{
		const osv_tensor *t = &st.tensors[i];
		const uint8_t *p = t->data;

		FUZZ_ASSERT(t->name != NULL);
		FUZZ_ASSERT(osv_safetensors_find(&st, t->name) != NULL);
		if (t->nbytes > 0)
		{
			FUZZ_ASSERT(p >= buf && t->nbytes <= len && p - buf <= (ptrdiff_t) (len - t->nbytes));
			x ^= p[0] ^ p[t->nbytes - 1];
		}
	}
	(void) x;
	osv_safetensors_close(&st);
}

/* A 3x2 RGB PNG (made with Pillow), for the batch path of fuzz_run. */
static const uint8_t tiny_png[] = {
	0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48,
	0x44, 0x52, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x02, 0x08, 0x02, 0x00, 0x00,
	0x00, 0x12, 0x16, 0xf1, 0x4d, 0x00, 0x00, 0x00, 0x18, 0x49, 0x44, 0x41, 0x54, 0x78,
	0xda, 0x63, 0xf8, 0xcf, 0xc0, 0xc0, 0x00, 0xc1, 0x9c, 0xc9, 0xc7, 0x7f, 0x35, 0x30,
	0x6b, 0x68, 0x68, 0x00, 0x00, 0x3f, 0x19, 0x06, 0x26, 0x89, 0xfe, 0xfe, 0xc0, 0x00,
	0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82
};

/*
 * The batch path on a model that opened: an image, 5 bytes that are none
 * and the image again in one run of osv_run_images.
 */
static void
fuzz_run_batch(const osv_model *model)
{
	const osv_model_info *info = osv_model_get_info(model);
	const uint8_t *data[3] = {tiny_png, tiny_png, tiny_png};
	size_t		sizes[3] = {sizeof(tiny_png), 5, sizeof(tiny_png)};
	osv_context *ctx = NULL;
	osv_params	params = osv_default_params();
	osv_prediction top[3];
	osv_error	errs[3];
	osv_error	err;
	osv_status	status;

	memset(&err, 0, sizeof(err));
	status = osv_context_new_batch(model, 3, &ctx, &err);
	if (status != OSV_OK)
	{
		check_error(status, &err);
		return;
	}
	status = osv_run_images(ctx, 3, data, sizes, &params, errs, &err);
	if (status != OSV_OK)
		check_error(status, &err);
	else
	{
		FUZZ_ASSERT(errs[1].status != OSV_OK && errs[1].message[0] != '\0');
		FUZZ_ASSERT(osv_context_topk_at(ctx, 1, 3, top) == 0);
		for (int i = 0; i < 3; i += 2)
		{
			int			k;

			if (errs[i].status != OSV_OK)
			{
				check_error(errs[i].status, &errs[i]);
				continue;
			}
			k = osv_context_topk_at(ctx, i, 3, top);
			FUZZ_ASSERT(k >= 1 && k <= 3 && k <= info->num_cells);
			for (int j = 0; j < k; j++)
				FUZZ_ASSERT(top[j].cell >= 0 && top[j].cell < info->num_cells);
		}
	}
	osv_context_free(ctx);
}

/* Run a tiny model that opened once on constant pixels, then as a batch. */
static void
fuzz_run(const osv_model *model)
{
	const osv_model_info *info = osv_model_get_info(model);
	osv_context *ctx = NULL;
	osv_params	params = osv_default_params();
	osv_prediction top[3];
	osv_error	err;
	osv_status	status;
	float	   *pixels;
	size_t		n;
	int			k;

	if (!(info->gflop_per_image > 0 && info->gflop_per_image <= FUZZ_MAX_GFLOP) ||
		info->image_size <= 0 || info->image_size > 64)
		return;
	n = (size_t) 3 * info->image_size * info->image_size;
	pixels = calloc(n, sizeof(float));
	if (pixels == NULL)
		return;
	for (size_t i = 0; i < n; i++)
		pixels[i] = (float) (i % 7) * 0.25f - 0.75f;

	memset(&err, 0, sizeof(err));
	status = osv_context_new(model, &ctx, &err);
	if (status != OSV_OK)
		check_error(status, &err);
	else
	{
		status = osv_run_pixels(ctx, pixels, &params, &err);
		if (status != OSV_OK)
			check_error(status, &err);
		else
		{
			k = osv_context_topk(ctx, 3, top);
			FUZZ_ASSERT(k >= 1 && k <= 3 && k <= info->num_cells);
			for (int i = 0; i < k; i++)
				FUZZ_ASSERT(top[i].cell >= 0 && top[i].cell < info->num_cells);
		}
		osv_context_free(ctx);
	}
	free(pixels);
	fuzz_run_batch(model);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const uint8_t *part[3] = {data, NULL, NULL};
	size_t		len[3] = {size, 0, 0};
	int			nparts = 1;
	osv_config	config;
	osv_json	json;
	osv_cell   *cells = NULL;
	int			num_cells = 0;
	osv_model  *model = NULL;
	osv_error	err;
	osv_status	status;

	/* split at the first two separators */
	while (nparts < 3)
	{
		const uint8_t *s = memmem(part[nparts - 1], len[nparts - 1], SPLIT, SPLIT_LEN);

		if (s == NULL)
			break;
		part[nparts] = s + SPLIT_LEN;
		len[nparts] = len[nparts - 1] - (size_t) (part[nparts] - part[nparts - 1]);
		len[nparts - 1] = (size_t) (s - part[nparts - 1]);
		nparts++;
	}

	fuzz_safetensors(part[0], len[0]);

	if (nparts > 1)
	{
		memset(&err, 0, sizeof(err));
		status = osv_json_parse((const char *) part[1], len[1], &json, &err);
		if (status == OSV_OK)
			osv_json_free(&json);
		else
			check_error(status, &err);

		osv_config_init(&config);
		status = osv_config_parse((const char *) part[1], len[1], &config, &err);
		if (status != OSV_OK)
			check_error(status, &err);
		FUZZ_ASSERT(memchr(config.quadtree_file, '\0', sizeof(config.quadtree_file)) != NULL);
	}
	if (nparts > 2)
	{
		memset(&err, 0, sizeof(err));
		status = osv_quadtree_parse((const char *) part[2], len[2], &cells, &num_cells, &err);
		if (status == OSV_OK)
		{
			FUZZ_ASSERT(num_cells > 0 && cells != NULL);
			free(cells);
		}
		else
			check_error(status, &err);
	}

	/* the same bytes as a model directory */
	write_file("model.safetensors", part[0], len[0], true);
	write_file("config.json", part[1], len[1], nparts > 1);
	write_file("quadtree_10_1000.csv", part[2], len[2], nparts > 2);
	memset(&err, 0, sizeof(err));
	status = osv_model_open(dir, NULL, &model, &err);
	if (status != OSV_OK)
	{
		check_error(status, &err);
		FUZZ_ASSERT(model == NULL);
		return 0;
	}
	fuzz_run(model);
	osv_model_close(model);
	return 0;
}
