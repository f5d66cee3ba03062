/*
 * gemm_rate.c: the rate of osv5m's own matrix-product kernels (gemm.c) on
 * the products of one CLIP ViT-L/14 block, weights pre-packed as the pack
 * cache holds them, against the FMA peak measured in the same run.
 *
 * Shapes (row-major, activations [T, in] times weights [out, in]^T):
 *   qkv   M=T N=3D K=D     out  M=T N=D K=D
 *   fc1   M=T N=F  K=D     fc2  M=T N=D K=F        T=257, D=1024, F=4096
 * with the network's epilogues (bias; the residual for out and fc2).  Each
 * simulated block has its own weights and there are --layers of them
 * (default 4, 200 MB), more than the caches hold, as in the real model.
 *
 * With --precision bf16 or int8, the products are bf16 or int8 ones
 * (gemm.h), the weights packed for them.
 *
 * Usage: gemm_rate [--threads N] [--layers L] [--reps R] [--tokens T]
 *                  [--precision fp32|bf16|int8]
 * Prints one JSON object: {"kernels":S,"precision":P,"threads":N,"tokens":T,
 *   "shapes":[{"name":"qkv","gflops":G},...],"gflops":G}
 * ("gflops" at the top: all FLOPs over all seconds), median of R reps.
 *
 * Build: make build/gemm_rate
 */
#include "gemm.h"
#include "pool.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NSHAPES 4

static double
now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static float *
filled(size_t n, unsigned seed)
{
	float	   *p = aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64);

	for (size_t i = 0; i < n; i++)
	{
		seed = seed * 1103515245u + 12345u;
		p[i] = ((seed >> 8) & 0xffff) / 65536.0f - 0.5f;
	}
	return p;
}

static int
cmp_double(const void *a, const void *b)
{
	double		x = *(const double *) a,
				y = *(const double *) b;

	return (x > y) - (x < y);
}

int
main(int argc, char **argv)
{
	int			threads = 1,
				layers = 4,
				reps = 5,
				t = 257,
				d = 1024,
				f = 4096;
	const char *names[NSHAPES] = {"qkv", "out", "fc1", "fc2"};
	int			ns[NSHAPES] = {3 * d, d, f, d};
	int			ks[NSHAPES] = {d, d, d, f};
	void	   *packed[NSHAPES][16];
	osv_precision precision = OSV_PRECISION_FP32;
	float	   *bias[NSHAPES];
	double		secs[NSHAPES][64];
	osv_error	err;
	int			nr;

	for (int i = 1; i + 1 < argc; i += 2)
	{
		if (strcmp(argv[i], "--threads") == 0)
			threads = atoi(argv[i + 1]);
		else if (strcmp(argv[i], "--layers") == 0)
			layers = atoi(argv[i + 1]);
		else if (strcmp(argv[i], "--reps") == 0)
			reps = atoi(argv[i + 1]);
		else if (strcmp(argv[i], "--tokens") == 0)
			t = atoi(argv[i + 1]);
		else if (strcmp(argv[i], "--precision") == 0 && !osv_precision_parse(argv[i + 1], &precision))
			layers = 0;			/* a usage error below */
	}
	if (layers < 1 || layers > 16 || reps < 1 || reps > 64 || t < 1 || threads < 1)
	{
		fprintf(stderr, "usage: gemm_rate [--threads N] [--layers 1..16] [--reps 1..64] [--tokens T] [--precision fp32|bf16|int8]\n");
		return 2;
	}
	nr = osv_gemm_nr();
	for (int s = 0; s < NSHAPES; s++)
	{
		float	   *w = filled((size_t) ns[s] * ks[s], 7u + s);

		for (int l = 0; l < layers; l++)
		{
			if (precision == OSV_PRECISION_INT8)
			{
				packed[s][l] = aligned_alloc(64, (osv_gemm_packed_weight_int8_bytes(ns[s], ks[s], nr) + 63) / 64 * 64);
				osv_gemm_pack_weight_int8(w, ns[s], ks[s], nr, packed[s][l]);
			}
			else if (precision == OSV_PRECISION_BF16)
			{
				packed[s][l] = aligned_alloc(64, osv_gemm_packed_weight_halves(ns[s], ks[s], nr) * sizeof(uint16_t));
				osv_gemm_pack_weight_bf16(w, ns[s], ks[s], nr, packed[s][l]);
			}
			else
			{
				packed[s][l] = aligned_alloc(64, osv_gemm_packed_weight_floats(ns[s], ks[s], nr) * sizeof(float));
				osv_gemm_pack_weight(w, ns[s], ks[s], nr, packed[s][l]);
			}
		}
		free(w);
		bias[s] = filled(ns[s], 99u + s);
	}

	float	   *x = filled((size_t) t * f, 1);
	float	   *y = filled((size_t) t * f, 2);	/* the widest output, fc1 */
	float	   *pa = aligned_alloc(64, osv_gemm_packed_a_floats(t, f) * sizeof(float));

	if (osv_pool_prepare(threads, osv_gemm_scratch_floats(t, f) * sizeof(float), &err) != OSV_OK)
	{
		fprintf(stderr, "gemm_rate: %s\n", err.message);
		return 1;
	}
	for (int r = -1; r < reps; r++)	/* rep -1: warm-up */
		for (int s = 0; s < NSHAPES; s++)
		{
			double		t0 = now();

			for (int l = 0; l < layers; l++)
			{
				osv_gemm	g = {.m = t,.n = ns[s],.k = ks[s],.a = x,.lda = (size_t) ks[s],
					.b_is_nk = true,.ldb = (size_t) ks[s],.alpha = 1.0f,.bias = bias[s],
					.accumulate = s == 1 || s == 3,.c = y,.ldc = (size_t) ns[s],
				.bf16 = precision == OSV_PRECISION_BF16,.int8 = precision == OSV_PRECISION_INT8};

				if (g.int8)
				{
					g.b_packed8 = packed[s][l];
					g.b_packed8_nr = nr;
				}
				else if (g.bf16)
				{
					g.b_packed16 = packed[s][l];
					g.b_packed16_nr = nr;
				}
				else
				{
					g.b_packed = packed[s][l];
					g.b_packed_nr = nr;
				}

				osv_gemm_run(&g, pa);
			}
			if (r >= 0)
				secs[s][r] = now() - t0;
		}

	double		flops_all = 0,
				secs_all = 0;

	printf("{\"kernels\":\"%s\",\"precision\":\"%s\",\"threads\":%d,\"tokens\":%d,\"layers\":%d,\"reps\":%d,\"shapes\":[",
		   osv_gemm_kernels_name(), osv_precision_name(precision), threads, t, layers, reps);
	for (int s = 0; s < NSHAPES; s++)
	{
		double		flops = 2.0 * t * ns[s] * ks[s] * layers;
		double		med;

		qsort(secs[s], reps, sizeof(double), cmp_double);
		med = secs[s][reps / 2];
		flops_all += flops;
		secs_all += med;
		printf("%s{\"name\":\"%s\",\"m\":%d,\"n\":%d,\"k\":%d,\"gflops\":%.1f}", s ? "," : "",
			   names[s], t, ns[s], ks[s], flops / med / 1e9);
	}
	printf("],\"gflops\":%.1f}\n", flops_all / secs_all / 1e9);
	return 0;
}
