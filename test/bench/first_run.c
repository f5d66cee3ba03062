/*
 * first_run.c: where a fresh process's first inference spends its time,
 * in the core alone: opening the model (which maps the weights' pages,
 * src/core/file.c), allocating the run state, then RUNS inferences of the
 * same image, each timed.  The overhead of the first call is
 * open + run state + (run 1 - run 2).
 *
 * Usage: first_run MODEL_DIR IMAGE [THREADS [RUNS]]   (default 1 thread, 4 runs)
 * Build: cc -std=gnu11 -O2 -pthread -ffp-contract=off -Isrc/core -o build/first_run \
 *            test/bench/first_run.c src/core/[a-z]*.c -ljpeg -lpng -ldl -lm
 */
#include "osv5m.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double
now_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

int
main(int argc, char **argv)
{
	static unsigned char image[1 << 24];
	osv_model  *model;
	osv_context *ctx;
	osv_error	err;
	FILE	   *f;
	size_t		size;
	int			runs;
	double		t0,
				t1,
				t2;

	if (argc < 3 || (f = fopen(argv[2], "rb")) == NULL)
	{
		fprintf(stderr, "usage: first_run MODEL_DIR IMAGE [THREADS [RUNS]]\n");
		return 2;
	}
	size = fread(image, 1, sizeof(image), f);
	fclose(f);
	osv_set_threads(argc > 3 ? atoi(argv[3]) : 1);
	runs = argc > 4 ? atoi(argv[4]) : 4;

	t0 = now_ms();
	if (osv_model_open(argv[1], NULL, &model, &err) != OSV_OK)
	{
		fprintf(stderr, "%s\n", err.message);
		return 1;
	}
	t1 = now_ms();
	if (osv_context_new(model, &ctx, &err) != OSV_OK)
	{
		fprintf(stderr, "%s\n", err.message);
		return 1;
	}
	t2 = now_ms();
	printf("{\"threads\":%d,\"open_ms\":%.1f,\"run_state_ms\":%.1f,\"runs_ms\":[",
		   osv_threads(), t1 - t0, t2 - t1);
	for (int i = 0; i < runs; i++)
	{
		double		a = now_ms();

		if (osv_run_image(ctx, image, size, NULL, &err) != OSV_OK)
		{
			fprintf(stderr, "%s\n", err.message);
			return 1;
		}
		printf("%s%.1f", i ? "," : "", now_ms() - a);
	}
	printf("]}\n");
	osv_context_free(ctx);
	osv_model_close(model);
	return 0;
}
