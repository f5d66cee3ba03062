/*
 * sgemm_rate.c: the OpenBLAS SGEMM rate of this machine on the matrix
 * products of one CLIP ViT-L/14 transformer block, the yardstick of the
 * forward pass's speed (test/bench/compare.py divides by it).
 *
 * The shapes are those network.c issues, row-major, activations [T, in]
 * times weights [out, in] transposed, T = 257 tokens:
 *   q, k, v, out_proj  M=T N=D K=D   4 calls per block
 *   fc1                M=T N=F K=D   1 call
 *   fc2                M=T N=D K=F   1 call
 * (D = 1024, F = 4096: each group is a third of the block's FLOPs).  Each
 * simulated block has its own weights, and there are --layers of them
 * (default 4, 200 MB), more than the caches hold, so that weights stream
 * from memory as they do in the real 1.2 GB model.
 *
 * Usage: sgemm_rate [--threads N] [--layers L] [--reps R]
 *                   [--tokens T] [--hidden D] [--ffn F]
 * Prints one JSON object:
 *   {"blas_core":S,"threads":N,"tokens":T,"hidden":D,"ffn":F,"layers":L,
 *    "reps":R,"shapes":[{"name":"qkvo","m":T,"n":D,"k":D,"calls":C,
 *    "seconds":S,"gflops":G},{"name":"fc1",...},{"name":"fc2",...}],
 *    "gflops":G}
 * where the top-level "gflops" is all FLOPs over all seconds: the rate
 * weighted by each shape's share of the FLOPs.  One warm-up pass is not
 * counted.
 *
 * Build: cc -std=gnu11 -O2 -o sgemm_rate test/bench/sgemm_rate.c -lopenblas -lm
 */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* OpenBLAS extensions (declared by OpenBLAS's cblas.h; repeated for clarity). */
extern void openblas_set_num_threads(int num_threads);
extern char *openblas_get_corename(void);

#define NSHAPES 3

typedef struct shape
{
	const char *name;
	int			n,
				k,
				calls;			/* per block */
	double		seconds;
	double		flops;
} shape;

/* Monotonic clock in seconds. */
static double
now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* n floats, uniform in [-1, 1), from a fixed LCG; exits on allocation failure. */
static float *
random_floats(size_t n, unsigned *seed)
{
	float	   *p = malloc(n * sizeof(float));

	if (p == NULL)
	{
		fprintf(stderr, "sgemm_rate: out of memory\n");
		exit(1);
	}
	for (size_t i = 0; i < n; i++)
	{
		*seed = *seed * 1664525u + 1013904223u;
		p[i] = (float) ((*seed >> 8) / 8388608.0 - 1.0);
	}
	return p;
}

/* Parse "--name VALUE" at argv[*i] into *out; 1 if it matched. */
static int
int_option(int argc, char **argv, int *i, const char *name, int *out)
{
	if (strcmp(argv[*i], name) != 0)
		return 0;
	if (*i + 1 >= argc || (*out = atoi(argv[*i + 1])) < 1)
	{
		fprintf(stderr, "sgemm_rate: %s needs a positive integer\n", name);
		exit(2);
	}
	(*i)++;
	return 1;
}

int
main(int argc, char **argv)
{
	int			threads = 1,
				layers = 4,
				reps = 3,
				t = 257,
				d = 1024,
				f = 4096;
	unsigned	seed = 12345;
	shape		shapes[NSHAPES];
	float	   *x,
			   *h,
			   *y,
			   *yf;
	float	  **w;
	double		flops = 0.0,
				seconds = 0.0;

	for (int i = 1; i < argc; i++)
	{
		if (int_option(argc, argv, &i, "--threads", &threads) ||
			int_option(argc, argv, &i, "--layers", &layers) ||
			int_option(argc, argv, &i, "--reps", &reps) ||
			int_option(argc, argv, &i, "--tokens", &t) ||
			int_option(argc, argv, &i, "--hidden", &d) ||
			int_option(argc, argv, &i, "--ffn", &f))
			continue;
		fprintf(stderr, "usage: sgemm_rate [--threads N] [--layers L] [--reps R] "
				"[--tokens T] [--hidden D] [--ffn F]\n");
		return 2;
	}
	openblas_set_num_threads(threads);

	shapes[0] = (shape) {"qkvo", d, d, 4, 0.0, 0.0};
	shapes[1] = (shape) {"fc1", f, d, 1, 0.0, 0.0};
	shapes[2] = (shape) {"fc2", d, f, 1, 0.0, 0.0};

	/* activations: x [T, D] and h [T, F] inputs, y [T, D] and yf [T, F] outputs */
	x = random_floats((size_t) t * d, &seed);
	h = random_floats((size_t) t * f, &seed);
	y = random_floats((size_t) t * d, &seed);
	yf = random_floats((size_t) t * f, &seed);
	/* per layer: 4 weights [D, D], fc1 [F, D], fc2 [D, F] */
	w = malloc((size_t) layers * 6 * sizeof(float *));
	for (int l = 0; l < layers; l++)
		for (int j = 0; j < 6; j++)
			w[l * 6 + j] = random_floats((size_t) (j < 4 ? d : f) * d, &seed);

	for (int rep = -1; rep < reps; rep++)
		for (int l = 0; l < layers; l++)
			for (int j = 0; j < 6; j++)
			{
				shape	   *s = &shapes[j < 4 ? 0 : j - 3];
				const float *a = j == 5 ? h : x;
				float	   *c = j == 4 ? yf : y;
				double		t0 = now();

				cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, t, s->n, s->k,
							1.0f, a, s->k, w[l * 6 + j], s->k, 1.0f, c, s->n);
				/* the first pass warms up threads and page mappings: not counted */
				if (rep >= 0)
				{
					s->seconds += now() - t0;
					s->flops += 2.0 * t * s->n * s->k;
				}
			}

	printf("{\"blas_core\":\"%s\",\"threads\":%d,\"tokens\":%d,\"hidden\":%d,"
		   "\"ffn\":%d,\"layers\":%d,\"reps\":%d,\"shapes\":[",
		   openblas_get_corename(), threads, t, d, f, layers, reps);
	for (int i = 0; i < NSHAPES; i++)
	{
		printf("%s{\"name\":\"%s\",\"m\":%d,\"n\":%d,\"k\":%d,\"calls\":%d,"
			   "\"seconds\":%.6f,\"gflops\":%.3f}", i ? "," : "", shapes[i].name,
			   t, shapes[i].n, shapes[i].k, shapes[i].calls * layers * reps,
			   shapes[i].seconds, shapes[i].flops / shapes[i].seconds * 1e-9);
		flops += shapes[i].flops;
		seconds += shapes[i].seconds;
	}
	printf("],\"gflops\":%.3f}\n", flops / seconds * 1e-9);

	for (int l = 0; l < layers * 6; l++)
		free(w[l]);
	free(w);
	free(x);
	free(h);
	free(y);
	free(yf);
	return 0;
}
