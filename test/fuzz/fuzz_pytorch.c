/*
 * fuzz_pytorch.c: libFuzzer harness over the PyTorch checkpoint reader (the
 * zip reader, zip.c, and the allow-list unpickler, pytorch.c) and the
 * loader on the published layout of osv5m/baseline.
 *
 * Input format: <pytorch_model.bin bytes> SPLIT <config.json>, SPLIT the
 * line below (in the dictionary); with no config part the directory has
 * no config.json.  There is never a CSV: the cells come from the
 * checkpoint's buffers, as in the published layout.
 *
 * The checkpoint goes first to osv_pytorch_parse from memory; then both
 * files are written to a private temporary directory and opened with
 * osv_model_open, and a model that opens and is tiny is run once.
 *
 * Invariants beyond ASan/UBSan: every failure has a status and a non-empty
 * message; every element every tensor addresses (its first and its last,
 * by shape and strides) lies inside the buffer; every tensor can be found
 * by name; converting a float tensor to F32 reads only inside the buffer
 * (ASan sees it, the buffer is libFuzzer's exact-size copy).
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
#define FUZZ_MAX_GFLOP 0.001
/* convert tensors to F32 only up to this many elements (time, not safety) */
#define FUZZ_MAX_CONVERT 100000

#define FUZZ_ASSERT(cond) do { if (!(cond)) __builtin_trap(); } while (0)

static char dir[256];

static void
check_error(osv_status status, const osv_error *err)
{
	FUZZ_ASSERT(status != OSV_OK);
	FUZZ_ASSERT(err->status == status);
	FUZZ_ASSERT(memchr(err->message, '\0', sizeof(err->message)) != NULL);
	FUZZ_ASSERT(err->message[0] != '\0');
}

static void
remove_dir(void)
{
	static const char *const names[] = {"pytorch_model.bin", "config.json"};
	char		path[512];

	for (int i = 0; i < 2; i++)
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

	snprintf(dir, sizeof(dir), "%s/osv5m-fuzz-pt-XXXXXX", tmp ? tmp : "/tmp");
	if (mkdtemp(dir) == NULL)
	{
		perror("mkdtemp");
		exit(1);
	}
	atexit(remove_dir);
	osv_set_threads(1);
	return 0;
}

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

/* The reader from memory: every addressed element lies in buf. */
static void
fuzz_reader(const uint8_t *buf, size_t len)
{
	osv_pytorch pt;
	osv_error	err;
	osv_status	status;

	memset(&err, 0, sizeof(err));
	status = osv_pytorch_parse(buf, len, &pt, &err);
	if (status != OSV_OK)
	{
		check_error(status, &err);
		return;
	}
	for (int i = 0; i < pt.num_tensors; i++)
	{
		const osv_tensor *t = &pt.tensors[i];
		const uint8_t *p = t->data;
		size_t		es = osv_dtype_size(t->dtype);

		FUZZ_ASSERT(t->name != NULL && es > 0);
		FUZZ_ASSERT(osv_tensor_find(pt.tensors, pt.num_tensors, t->name) != NULL);
		if (t->num_elements == 0)
			continue;
		FUZZ_ASSERT(p >= buf && t->nbytes >= es && t->nbytes <= len &&
					p - buf <= (ptrdiff_t) (len - t->nbytes));
		if (t->num_elements <= FUZZ_MAX_CONVERT &&
			(t->dtype == OSV_DTYPE_F32 || t->dtype == OSV_DTYPE_F16 ||
			 t->dtype == OSV_DTYPE_BF16 || t->dtype == OSV_DTYPE_F64))
		{
			float	   *f = malloc((size_t) t->num_elements * sizeof(float));

			FUZZ_ASSERT(f != NULL);
			osv_tensor_to_f32(t, f);
			(void) osv_tensor_get(t, t->num_elements - 1);
			free(f);
		}
	}
	osv_pytorch_close(&pt);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const uint8_t *cfg = NULL;
	size_t		bin_len = size,
				cfg_len = 0;
	const uint8_t *s = memmem(data, size, SPLIT, SPLIT_LEN);
	osv_model  *model = NULL;
	osv_error	err;
	osv_status	status;

	if (s != NULL)
	{
		bin_len = (size_t) (s - data);
		cfg = s + SPLIT_LEN;
		cfg_len = size - bin_len - SPLIT_LEN;
	}
	/* an exact-size copy, so that ASan sees any read past the end */
	{
		uint8_t    *copy = malloc(bin_len ? bin_len : 1);

		FUZZ_ASSERT(copy != NULL);
		memcpy(copy, data, bin_len);
		fuzz_reader(copy, bin_len);
		free(copy);
	}
	write_file("pytorch_model.bin", data, bin_len, true);
	write_file("config.json", cfg, cfg_len, cfg != NULL);
	memset(&err, 0, sizeof(err));
	status = osv_model_open(dir, NULL, &model, &err);
	if (status != OSV_OK)
	{
		check_error(status, &err);
		FUZZ_ASSERT(model == NULL);
		return 0;
	}
	{
		const osv_model_info *info = osv_model_get_info(model);
		const char *fp = osv_model_fingerprint(model);

		FUZZ_ASSERT(strlen(fp) == 64);
		if (info->gflop_per_image <= FUZZ_MAX_GFLOP)
		{
			osv_context *ctx = NULL;
			float	   *pixels;
			size_t		n = (size_t) 3 * info->image_size * info->image_size;

			if (osv_context_new(model, &ctx, &err) == OSV_OK)
			{
				pixels = calloc(n, sizeof(float));
				FUZZ_ASSERT(pixels != NULL);
				status = osv_run_pixels(ctx, pixels, NULL, &err);
				if (status == OSV_OK)
				{
					osv_prediction p[2];

					(void) osv_context_topk(ctx, 2, p);
				}
				free(pixels);
				osv_context_free(ctx);
			}
		}
	}
	osv_model_close(model);
	return 0;
}
