/*
 * fma_peak.c: the float32 FMA peak of this machine, the ceiling every
 * benchmark here is compared with: a register-only loop (no memory
 * traffic) of independent FMA chains on each of N threads.
 *
 * It uses the widest FMA the CPU has, chosen at run time: AVX-512 (16
 * floats per instruction), else AVX2 + FMA (8); 12 independent
 * accumulators per thread hide the FMA latency on every x86-64 core of
 * the last ten years (latency 4-5 cycles, 2 FMA ports).
 *
 * Usage: fma_peak [THREADS [SECONDS [fp32|bf16|int8]]]   default 1 thread, 1 s, fp32
 * (bf16: the vdpbf16ps peak of AVX512_BF16 CPUs, each lane's two products
 * counted as two FMAs; int8: the vpdpbusd peak of AVX512_VNNI CPUs, each
 * lane's four products counted as four; "gflops" is then GOP/s)
 * Prints one JSON object: {"isa":S,"threads":N,"seconds":S,"gflops":G}
 * where gflops counts an FMA as 2 floating-point operations per lane.
 *
 * Build: cc -std=gnu11 -O3 -pthread -o fma_peak test/bench/fma_peak.c
 * (-O3: at -O2 GCC keeps the accumulators in memory and measures half)
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHAINS 12
#define ITERS 100000			/* FMA rounds between clock reads */

static double seconds_wanted = 1.0;

static double
now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Each returns the FMAs (lanes x instructions) done; the sum is printed
 * nowhere but returned, so that the compiler cannot drop the loop. */
__attribute__((target("avx512f"))) static double
run_avx512(float *sink)
{
	__m512		acc[CHAINS];
	__m512		a = _mm512_set1_ps(0.999999f),
				b = _mm512_set1_ps(1e-7f);
	double		start = now(),
				lanes = 0;

	for (int i = 0; i < CHAINS; i++)
		acc[i] = _mm512_set1_ps((float) i);
	do
	{
		for (int r = 0; r < ITERS; r++)
			for (int i = 0; i < CHAINS; i++)
				acc[i] = _mm512_fmadd_ps(acc[i], a, b);
		lanes += (double) ITERS * CHAINS * 16;
	} while (now() - start < seconds_wanted);
	for (int i = 1; i < CHAINS; i++)
		acc[0] = _mm512_add_ps(acc[0], acc[i]);
	*sink = _mm512_reduce_add_ps(acc[0]);
	return lanes;
}

/*
 * The bf16 dot-product peak: vdpbf16ps, each lane two multiply-adds of
 * bf16 pairs into a float32 sum (counted as 2 FMAs, 4 operations).
 */
__attribute__((target("avx512f,avx512bf16"))) static double
run_bf16(float *sink)
{
	__m512		acc[CHAINS];
	__m512bh	a = (__m512bh) _mm512_set1_epi32(0x3f803f80),	/* bf16 pairs (1, 1) */
				b = (__m512bh) _mm512_set1_epi32(0x33d633d6);	/* about 1e-7 */
	double		start = now(),
				lanes = 0;

	for (int i = 0; i < CHAINS; i++)
		acc[i] = _mm512_set1_ps((float) i);
	do
	{
		for (int r = 0; r < ITERS; r++)
			for (int i = 0; i < CHAINS; i++)
				acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
		lanes += (double) ITERS * CHAINS * 16 * 2;
	} while (now() - start < seconds_wanted);
	for (int i = 1; i < CHAINS; i++)
		acc[0] = _mm512_add_ps(acc[0], acc[i]);
	*sink = _mm512_reduce_add_ps(acc[0]);
	return lanes;
}

/*
 * The int8 dot-product peak: vpdpbusd, each lane four products of bytes
 * into a 32-bit sum (counted as 4 multiply-adds, 8 operations).
 */
/* the instruction itself: GCC 12 keeps the intrinsic's accumulators in memory */
__attribute__((target("avx512f,avx512vnni"), always_inline)) static inline __m512i
dpbusd(__m512i acc, __m512i a, __m512i b)
{
	__asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
	return acc;
}

__attribute__((target("avx512f,avx512vnni"))) static double
run_int8(float *sink)
{
	__m512i		acc[CHAINS];
	__m512i		a = _mm512_set1_epi32(0x01010101),
				b = _mm512_set1_epi32(0x01ff01ff);
	double		start = now(),
				lanes = 0;
	int			out[16];

	for (int i = 0; i < CHAINS; i++)
		acc[i] = _mm512_set1_epi32(i);
	do
	{
		for (int r = 0; r < ITERS; r++)
			for (int i = 0; i < CHAINS; i++)
				acc[i] = dpbusd(acc[i], a, b);
		lanes += (double) ITERS * CHAINS * 16 * 4;
	} while (now() - start < seconds_wanted);
	for (int i = 1; i < CHAINS; i++)
		acc[0] = _mm512_add_epi32(acc[0], acc[i]);
	_mm512_storeu_si512(out, acc[0]);
	*sink = (float) out[0];
	return lanes;
}

__attribute__((target("avx2,fma"))) static double
run_avx2(float *sink)
{
	__m256		acc[CHAINS];
	__m256		a = _mm256_set1_ps(0.999999f),
				b = _mm256_set1_ps(1e-7f);
	double		start = now(),
				lanes = 0;
	float		out[8];

	for (int i = 0; i < CHAINS; i++)
		acc[i] = _mm256_set1_ps((float) i);
	do
	{
		for (int r = 0; r < ITERS; r++)
			for (int i = 0; i < CHAINS; i++)
				acc[i] = _mm256_fmadd_ps(acc[i], a, b);
		lanes += (double) ITERS * CHAINS * 8;
	} while (now() - start < seconds_wanted);
	for (int i = 1; i < CHAINS; i++)
		acc[0] = _mm256_add_ps(acc[0], acc[i]);
	_mm256_storeu_ps(out, acc[0]);
	*sink = out[0];
	return lanes;
}

typedef struct
{
	double		lanes;
	float		sink;
} job;

static int	use_avx512,
			use_bf16,
			use_int8;

static void *
worker(void *arg)
{
	job		   *j = arg;

	j->lanes = use_int8 ? run_int8(&j->sink) : use_bf16 ? run_bf16(&j->sink) : use_avx512 ? run_avx512(&j->sink) : run_avx2(&j->sink);
	return NULL;
}

int
main(int argc, char **argv)
{
	int			threads = argc > 1 ? atoi(argv[1]) : 1;
	pthread_t  *tids;
	job		   *jobs;
	double		start,
				elapsed,
				lanes = 0;

	if (argc > 2)
		seconds_wanted = atof(argv[2]);
	use_bf16 = argc > 3 && strcmp(argv[3], "bf16") == 0;
	use_int8 = argc > 3 && strcmp(argv[3], "int8") == 0;
	if (threads < 1 || threads > 1024 || seconds_wanted <= 0 ||
		(argc > 3 && !use_bf16 && !use_int8 && strcmp(argv[3], "fp32") != 0))
	{
		fprintf(stderr, "usage: fma_peak [THREADS [SECONDS [fp32|bf16|int8]]]\n");
		return 2;
	}
	__builtin_cpu_init();
	use_avx512 = __builtin_cpu_supports("avx512f");
	if (use_bf16 && !(use_avx512 && __builtin_cpu_supports("avx512bf16")))
	{
		fprintf(stderr, "fma_peak: this CPU has no AVX512_BF16\n");
		return 1;
	}
	if (use_int8 && !(use_avx512 && __builtin_cpu_supports("avx512vnni")))
	{
		fprintf(stderr, "fma_peak: this CPU has no AVX512_VNNI\n");
		return 1;
	}
	if (!use_avx512 && !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")))
	{
		fprintf(stderr, "fma_peak: this CPU has neither AVX-512 nor AVX2 + FMA\n");
		return 1;
	}
	tids = calloc(threads, sizeof(*tids));
	jobs = calloc(threads, sizeof(*jobs));
	if (tids == NULL || jobs == NULL)
		return 1;
	start = now();
	for (int t = 0; t < threads; t++)
		pthread_create(&tids[t], NULL, worker, &jobs[t]);
	for (int t = 0; t < threads; t++)
	{
		pthread_join(tids[t], NULL);
		lanes += jobs[t].lanes;
	}
	elapsed = now() - start;
	printf("{\"isa\":\"%s\",\"threads\":%d,\"seconds\":%.3f,\"gflops\":%.1f}\n",
		   use_int8 ? "avx512_vnni" : use_bf16 ? "avx512_bf16" : use_avx512 ? "avx512" : "avx2", threads, elapsed, 2.0 * lanes / elapsed / 1e9);
	return 0;
}
