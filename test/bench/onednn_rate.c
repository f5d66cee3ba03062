/*
 * onednn_rate.c: oneDNN's matmul (the C API of Debian's libdnnl 2.6) on
 * exactly gemm_rate's products, so that our kernels can be set against a
 * tuned library on the same machine, shapes and precisions.
 *
 * Shapes (row-major, activations [T, in] times weights [out, in]^T):
 *   qkv   M=T N=3D K=D     out  M=T N=D K=D
 *   fc1   M=T N=F  K=D     fc2  M=T N=D K=F        T=257, D=1024, F=4096
 * with gemm_rate's epilogues: bias, and for out and fc2 the residual (a
 * sum post-op: C = C + product).  Each of the --layers simulated blocks has
 * its own weights (4 by default, 200 MB in fp32), so that they stream from
 * memory as the real model's do.  The data are gemm_rate's.
 *
 * What a server holding the model would do once, outside the timing: the
 * primitives are created (one per shape, shared by the layers) and each
 * weight is reordered into the layout oneDNN prefers (format_tag any on
 * the weights of the matmul, then a reorder from PyTorch's [out, in]).
 * What every forward pass has to do, inside the timing:
 *
 *   fp32   the matmul.
 *   bf16   a oneDNN reorder of the float32 activations to bfloat16, then
 *          the matmul (bf16 x bf16 weights, float32 bias and output).
 *   int8   our own loop (one OpenMP region, vectorized) quantizing the
 *          activations: one scale for the whole [T, K] tensor (largest
 *          magnitude / 127), taken from this call's activations as our
 *          kernels take theirs (they take one per row), stored as value +
 *          128 in unsigned bytes with a source zero point of 128, since the
 *          network's activations are signed; the bias divided by the
 *          output scale (the activations' scale times each column's weight
 *          scale), because oneDNN 2.x applies the output scales to the bias
 *          too; then the matmul (u8 x s8 weights quantized per output
 *          column as ours are, s32 sums, float32 output).  The weights'
 *          scales are the primitive's output scales and this call's
 *          activation scale a one-element binary multiply post-op: 2.6's
 *          brgemm matmul takes no runtime output scales (with them it falls
 *          back to gemm:jit).  The zero point's compensation (each
 *          column's sum) is made once by the weights' reorder.
 *
 * Before the timing, each shape's first layer is checked against a
 * reference computed in double from the float32 data at 64 places of C:
 * the largest error relative to the rms of the reference values there
 * must stay under 1e-4 (fp32), 2e-2 (bf16) or 5e-2 (int8), else it stops
 * with status 1.  A misconfigured primitive (a missing bias or residual,
 * wrong scales) errs by far more than that.
 *
 * After the timing, one more product is run and the CPU time the process
 * spends while its main thread sleeps is read in windows after the call
 * returns: the OpenMP workers' spinning, which a database server would pay
 * for between calls ("idle_cpu_ms": the windows 0-10, 10-100, 100-300 and
 * 300-1000 ms; the kernel adds a running thread's time at its ticks, so a
 * few ms may land one window late).
 *
 * Usage: onednn_rate [--threads N] [--layers L] [--reps R] [--tokens T]
 *                    [--precision fp32|bf16|int8]
 * Prints one JSON object as gemm_rate does, plus the oneDNN version, the
 * implementation of each shape's matmul ("impl", from
 * dnnl_query_impl_info_str) and each check's error ("max_rel_err").
 * The thread count is set with omp_set_num_threads (oneDNN runs on the
 * OpenMP runtime here; OMP_NUM_THREADS in the environment is overridden).
 *
 * Build: cc -std=gnu11 -O2 -fopenmp -o build/onednn_rate test/bench/onednn_rate.c -ldnnl -lm
 * (Debian: apt-get install -y libdnnl-dev)
 */
#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl_debug.h>
#include <math.h>
#include <omp.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NSHAPES 4
#define NCHECK 64				/* places of C checked per shape */

#define CHECK(call) \
	do { \
		dnnl_status_t st_ = (call); \
		if (st_ != dnnl_success) \
		{ \
			fprintf(stderr, "onednn_rate: %s: %s\n", #call, dnnl_status2str(st_)); \
			exit(1); \
		} \
	} while (0)

typedef enum
{
	PREC_FP32,
	PREC_BF16,
	PREC_INT8
} precision;

static const char *const precision_names[] = {"fp32", "bf16", "int8"};

static double
now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double
cpu_now(clockid_t clock)
{
	struct timespec ts;

	clock_gettime(clock, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* gemm_rate's data, so that both time the same values */
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

static void
md_2d(dnnl_memory_desc_t *md, int rows, int cols, dnnl_data_type_t type, dnnl_format_tag_t tag)
{
	dnnl_dims_t dims = {rows, cols};

	CHECK(dnnl_memory_desc_init_by_tag(md, 2, dims, type, tag));
}

/*
 * The activations x[0..n) quantized into q: returns their scale (largest
 * magnitude / 127, one for the tensor), q[i] being x[i] / scale clamped to
 * [-127, 127], rounded to nearest (even), + 128.  One parallel region for
 * both passes (the scale must be known before any value is quantized), so
 * that a call forks the threads once.  target_clones: the AVX-512 loops
 * where the CPU has them, as oneDNN's own code would run.
 */
__attribute__((target_clones("avx512f", "default"))) static float
quantize_activations(const float *x, size_t n, uint8_t *q)
{
	float		m = 0;

#pragma omp parallel
	{
		float		factor;

#pragma omp for simd reduction(max:m)
		for (size_t i = 0; i < n; i++)
		{
			float		a = fabsf(x[i]);

			/* not fmaxf: its NaN rule keeps GCC from vectorizing */
			m = a > m ? a : m;
		}
		/* the loop's implied barrier: m is final here */
		factor = m > 0 ? 127.0f / m : 0.0f;
#pragma omp for simd
		for (size_t i = 0; i < n; i++)
		{
			float		v = x[i] * factor;

			/* clamped before rounding (the same, the bounds being integers): that order GCC vectorizes */
			v = v < -127.0f ? -127.0f : v;
			v = v > 127.0f ? 127.0f : v;
			q[i] = (uint8_t) (128 + (int) nearbyintf(v));
		}
	}
	return m > 0 ? m / 127.0f : 1.0f;
}

/*
 * Column j of the weight w [n, k] (row j of PyTorch's layout) quantized
 * symmetrically, as our kernels quantize theirs: returns its scale (largest
 * magnitude / 127) and, unless q is NULL, stores the k values
 * nearbyint(w * 127 / largest) in q.
 */
static float
quantize_column(const float *w, int k, int j, int8_t *q)
{
	const float *col = w + (size_t) j * k;
	float		m = 0;

	for (int p = 0; p < k; p++)
		m = fmaxf(m, fabsf(col[p]));
	if (q != NULL)
		for (int p = 0; p < k; p++)
			q[p] = m > 0 ? (int8_t) nearbyintf(col[p] * (127.0f / m)) : 0;
	return m > 0 ? m / 127.0f : 1.0f;
}

/* Everything the products of one shape need, made once. */
typedef struct
{
	int			n,
				k;
	bool		residual;
	dnnl_primitive_t matmul;
	const char *impl;
	dnnl_memory_t weights[16];	/* in oneDNN's layout, one per layer */
	float	   *w_scale;		/* int8: each column's weight scale */
	float	   *bias;			/* gemm_rate's bias */
	dnnl_memory_t bias_mem;		/* int8: bias / output scale, per call */
	float	   *bias_q;
	dnnl_memory_t a_scale_mem;	/* int8: the activations' scale, per call */
	float	   *a_scale;
	dnnl_memory_t src_mem;		/* the matmul's activations: x, bf16 or u8 */
	dnnl_primitive_t to_bf16;	/* bf16: x to src_mem */
	dnnl_memory_t x_mem;		/* bf16: x as float32 [T, K] */
	dnnl_memory_t dst_mem;
} shape;

static dnnl_engine_t engine;
static dnnl_stream_t stream;
static precision prec = PREC_FP32;
static int	t = 257;
static float *x;				/* float32 activations, [T, K] at the start */
static float *y;				/* outputs, [T, N] at the start */
static uint8_t *xq;				/* int8: x quantized */

/* One forward-pass product of shape sh with layer l's weights: all the per-call work. */
static void
product(shape *sh, int l)
{
	dnnl_exec_arg_t args[6];
	int			nargs = 0;

	if (prec == PREC_BF16)
	{
		dnnl_exec_arg_t rargs[2] = {{DNNL_ARG_FROM, sh->x_mem}, {DNNL_ARG_TO, sh->src_mem}};

		CHECK(dnnl_primitive_execute(sh->to_bf16, stream, 2, rargs));
	}
	else if (prec == PREC_INT8)
	{
		size_t		count = (size_t) t * sh->k;
		float		a_scale = quantize_activations(x, count, xq);

		*sh->a_scale = a_scale;
		for (int j = 0; j < sh->n; j++)
			sh->bias_q[j] = sh->bias[j] / (a_scale * sh->w_scale[j]);
		args[nargs++] = (dnnl_exec_arg_t) {DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1, sh->a_scale_mem};
	}
	args[nargs++] = (dnnl_exec_arg_t) {DNNL_ARG_SRC, sh->src_mem};
	args[nargs++] = (dnnl_exec_arg_t) {DNNL_ARG_WEIGHTS, sh->weights[l]};
	args[nargs++] = (dnnl_exec_arg_t) {DNNL_ARG_BIAS, sh->bias_mem};
	args[nargs++] = (dnnl_exec_arg_t) {DNNL_ARG_DST, sh->dst_mem};
	CHECK(dnnl_primitive_execute(sh->matmul, stream, nargs, args));
	CHECK(dnnl_stream_wait(stream));
}

/*
 * Build shape sh: its matmul, and layers copies of weight w [n, k]
 * (PyTorch's layout) reordered, and for int8 quantized, into oneDNN's
 * layout.
 */
static void
setup(shape *sh, const float *w, int layers)
{
	dnnl_data_type_t in_type = prec == PREC_FP32 ? dnnl_f32 : prec == PREC_BF16 ? dnnl_bf16 : dnnl_u8;
	dnnl_data_type_t w_type = prec == PREC_FP32 ? dnnl_f32 : prec == PREC_BF16 ? dnnl_bf16 : dnnl_s8;
	dnnl_memory_desc_t src_md,
				w_md,
				w_user_md,
				bias_md,
				dst_md;
	dnnl_matmul_desc_t desc;
	dnnl_primitive_attr_t attr;
	dnnl_post_ops_t ops;
	dnnl_primitive_desc_t pd,
				rpd;
	dnnl_primitive_t reorder;
	const dnnl_memory_desc_t *w_best;
	int8_t	   *w_s8 = NULL;

	md_2d(&src_md, t, sh->k, in_type, dnnl_ab);
	md_2d(&w_md, sh->k, sh->n, w_type, dnnl_format_tag_any);
	md_2d(&bias_md, 1, sh->n, dnnl_f32, dnnl_ab);
	md_2d(&dst_md, t, sh->n, dnnl_f32, dnnl_ab);
	CHECK(dnnl_matmul_desc_init(&desc, &src_md, &w_md, &bias_md, &dst_md));

	CHECK(dnnl_primitive_attr_create(&attr));
	CHECK(dnnl_post_ops_create(&ops));
	if (prec == PREC_INT8)
	{
		int32_t		zero_point = 128;
		dnnl_memory_desc_t one_md;

		/*
		 * The output scale is each column's weight scale, fixed, times the
		 * activations' scale, which changes with each call.  Runtime output
		 * scales would carry both, but 2.6 has no brgemm matmul for them
		 * and falls back to gemm:jit; so the fixed part is the output
		 * scales and the call's part a binary multiply by a one-element
		 * tensor given at execution, before the residual is added.
		 */
		sh->w_scale = malloc(sh->n * sizeof(float));
		for (int j = 0; j < sh->n; j++)
			sh->w_scale[j] = quantize_column(w, sh->k, j, NULL);
		CHECK(dnnl_primitive_attr_set_output_scales(attr, sh->n, 1 << 1, sh->w_scale));
		CHECK(dnnl_primitive_attr_set_zero_points(attr, DNNL_ARG_SRC, 1, 0, &zero_point));
		md_2d(&one_md, 1, 1, dnnl_f32, dnnl_ab);
		CHECK(dnnl_post_ops_append_binary(ops, dnnl_binary_mul, &one_md));
		sh->a_scale = aligned_alloc(64, 64);
		CHECK(dnnl_memory_create(&sh->a_scale_mem, &one_md, engine, sh->a_scale));
	}
	if (sh->residual)
		CHECK(dnnl_post_ops_append_sum(ops, 1.0f));
	CHECK(dnnl_primitive_attr_set_post_ops(attr, ops));
	CHECK(dnnl_primitive_desc_create(&pd, &desc, attr, engine, NULL));
	CHECK(dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &sh->impl));
	sh->impl = strdup(sh->impl);
	CHECK(dnnl_primitive_create(&sh->matmul, pd));

	/* weights: [n, k] row-major is the matmul's [k, n] with tag ba */
	w_best = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
	md_2d(&w_user_md, sh->k, sh->n, prec == PREC_INT8 ? dnnl_s8 : dnnl_f32, dnnl_ba);
	if (prec == PREC_INT8)
	{
		/*
		 * Quantized here, then reordered as s8: 2.6 has no reorder from
		 * float32 into the blocked layout that also carries the zero
		 * point's compensation (each column's sum, which the reorder
		 * computes once so that no call has to).
		 */
		w_s8 = malloc((size_t) sh->n * sh->k);
		for (int j = 0; j < sh->n; j++)
			quantize_column(w, sh->k, j, w_s8 + (size_t) j * sh->k);
	}
	CHECK(dnnl_reorder_primitive_desc_create(&rpd, &w_user_md, engine, w_best, engine, NULL));
	CHECK(dnnl_primitive_create(&reorder, rpd));
	for (int l = 0; l < layers; l++)
	{
		dnnl_memory_t user;

		CHECK(dnnl_memory_create(&user, &w_user_md, engine, w_s8 ? (void *) w_s8 : (void *) w));
		CHECK(dnnl_memory_create(&sh->weights[l], w_best, engine, DNNL_MEMORY_ALLOCATE));
		{
			dnnl_exec_arg_t rargs[2] = {{DNNL_ARG_FROM, user}, {DNNL_ARG_TO, sh->weights[l]}};

			CHECK(dnnl_primitive_execute(reorder, stream, 2, rargs));
		}
		CHECK(dnnl_stream_wait(stream));
		CHECK(dnnl_memory_destroy(user));
	}
	CHECK(dnnl_primitive_destroy(reorder));
	CHECK(dnnl_primitive_desc_destroy(rpd));
	free(w_s8);

	/* per-call memories, over fixed buffers */
	if (prec == PREC_INT8)
	{
		sh->bias_q = aligned_alloc(64, (sh->n * sizeof(float) + 63) / 64 * 64);
		CHECK(dnnl_memory_create(&sh->bias_mem, &bias_md, engine, sh->bias_q));
		CHECK(dnnl_memory_create(&sh->src_mem, &src_md, engine, xq));
	}
	else
		CHECK(dnnl_memory_create(&sh->bias_mem, &bias_md, engine, sh->bias));
	if (prec == PREC_BF16)
	{
		dnnl_memory_desc_t x_md;

		md_2d(&x_md, t, sh->k, dnnl_f32, dnnl_ab);
		CHECK(dnnl_memory_create(&sh->x_mem, &x_md, engine, x));
		CHECK(dnnl_memory_create(&sh->src_mem, &src_md, engine, DNNL_MEMORY_ALLOCATE));
		CHECK(dnnl_reorder_primitive_desc_create(&rpd, &x_md, engine, &src_md, engine, NULL));
		CHECK(dnnl_primitive_create(&sh->to_bf16, rpd));
		CHECK(dnnl_primitive_desc_destroy(rpd));
	}
	if (prec == PREC_FP32)
		CHECK(dnnl_memory_create(&sh->src_mem, &src_md, engine, x));
	CHECK(dnnl_memory_create(&sh->dst_mem, &dst_md, engine, y));

	CHECK(dnnl_primitive_desc_destroy(pd));
	CHECK(dnnl_post_ops_destroy(ops));
	CHECK(dnnl_primitive_attr_destroy(attr));
}

/*
 * One product of shape sh (layer 0) checked against double precision at
 * NCHECK places of C; returns the largest error relative to the rms of the
 * reference values there.
 */
static double
check(shape *sh, const float *w)
{
	float	   *start = filled((size_t) t * sh->n, 5);
	int			rows[NCHECK],
				cols[NCHECK];
	double		ref[NCHECK],
				sq = 0,
				worst = 0;
	unsigned	seed = 11;

	memcpy(y, start, (size_t) t * sh->n * sizeof(float));
	product(sh, 0);
	for (int c = 0; c < NCHECK; c++)
	{
		double		sum = 0;

		seed = seed * 1103515245u + 12345u;
		rows[c] = (int) ((seed >> 8) % (unsigned) t);
		seed = seed * 1103515245u + 12345u;
		cols[c] = (int) ((seed >> 8) % (unsigned) sh->n);
		for (int p = 0; p < sh->k; p++)
			sum += (double) x[(size_t) rows[c] * sh->k + p] * w[(size_t) cols[c] * sh->k + p];
		sum += sh->bias[cols[c]];
		if (sh->residual)
			sum += start[(size_t) rows[c] * sh->n + cols[c]];
		ref[c] = sum;
		sq += sum * sum;
	}
	for (int c = 0; c < NCHECK; c++)
	{
		double		err = fabs(y[(size_t) rows[c] * sh->n + cols[c]] - ref[c]) / sqrt(sq / NCHECK);

		if (err > worst)
			worst = err;
	}
	free(start);
	return worst;
}

int
main(int argc, char **argv)
{
	int			threads = 1,
				layers = 4,
				reps = 5,
				d = 1024,
				f = 4096;
	const char *names[NSHAPES] = {"qkv", "out", "fc1", "fc2"};
	int			ns[NSHAPES] = {3 * d, d, f, d};
	int			ks[NSHAPES] = {d, d, d, f};
	shape		shapes[NSHAPES];
	double		errs[NSHAPES];
	double		secs[NSHAPES][64];
	double		tolerance;
	const dnnl_version_t *version;
	double		idle_ms[4];
	const double windows[4] = {0.010, 0.100, 0.300, 1.000};

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
		else if (strcmp(argv[i], "--precision") == 0)
		{
			if (strcmp(argv[i + 1], "fp32") == 0)
				prec = PREC_FP32;
			else if (strcmp(argv[i + 1], "bf16") == 0)
				prec = PREC_BF16;
			else if (strcmp(argv[i + 1], "int8") == 0)
				prec = PREC_INT8;
			else
				layers = 0;		/* a usage error below */
		}
	}
	if (layers < 1 || layers > 16 || reps < 1 || reps > 64 || t < 1 || threads < 1)
	{
		fprintf(stderr, "usage: onednn_rate [--threads N] [--layers 1..16] [--reps 1..64] [--tokens T] [--precision fp32|bf16|int8]\n");
		return 2;
	}
	tolerance = prec == PREC_FP32 ? 1e-4 : prec == PREC_BF16 ? 2e-2 : 5e-2;

	/* before any oneDNN call: it sizes its parallel work from this */
	omp_set_num_threads(threads);
	CHECK(dnnl_engine_create(&engine, dnnl_cpu, 0));
	CHECK(dnnl_stream_create(&stream, engine, dnnl_stream_default_flags));

	x = filled((size_t) t * f, 1);
	y = filled((size_t) t * f, 2);	/* the widest output, fc1 */
	xq = aligned_alloc(64, ((size_t) t * f + 63) / 64 * 64);
	for (int s = 0; s < NSHAPES; s++)
	{
		float	   *w = filled((size_t) ns[s] * ks[s], 7u + s);

		shapes[s] = (shape) {.n = ns[s],.k = ks[s],.residual = s == 1 || s == 3};
		shapes[s].bias = filled(ns[s], 99u + s);
		setup(&shapes[s], w, layers);
		errs[s] = check(&shapes[s], w);
		if (!(errs[s] <= tolerance))
		{
			fprintf(stderr, "onednn_rate: %s %s (%s): max relative error %.3g over the tolerance %.3g\n",
					precision_names[prec], names[s], shapes[s].impl, errs[s], tolerance);
			return 1;
		}
		free(w);
	}

	for (int r = -1; r < reps; r++)	/* rep -1: warm-up */
		for (int s = 0; s < NSHAPES; s++)
		{
			double		t0 = now();

			for (int l = 0; l < layers; l++)
				product(&shapes[s], l);
			if (r >= 0)
				secs[s][r] = now() - t0;
		}

	/* the CPU the other threads burn after a call, while this one sleeps */
	{
		double		start,
					cpu0,
					self0;

		product(&shapes[3], 0);
		start = now();
		cpu0 = cpu_now(CLOCK_PROCESS_CPUTIME_ID);
		self0 = cpu_now(CLOCK_THREAD_CPUTIME_ID);
		for (int i = 0; i < 4; i++)
		{
			struct timespec ts;
			double		wait = start + windows[i] - now(),
						cpu1,
						self1;

			if (wait > 0)
			{
				ts.tv_sec = (time_t) wait;
				ts.tv_nsec = (long) ((wait - ts.tv_sec) * 1e9);
				nanosleep(&ts, NULL);
			}
			cpu1 = cpu_now(CLOCK_PROCESS_CPUTIME_ID);
			self1 = cpu_now(CLOCK_THREAD_CPUTIME_ID);
			idle_ms[i] = fmax(0.0, (cpu1 - cpu0) - (self1 - self0)) * 1e3;
			cpu0 = cpu1;
			self0 = self1;
		}
	}

	double		flops_all = 0,
				secs_all = 0;

	version = dnnl_version();
	printf("{\"kernels\":\"onednn\",\"onednn\":\"%d.%d.%d\",\"precision\":\"%s\",\"threads\":%d,\"omp_max_threads\":%d,\"tokens\":%d,\"layers\":%d,\"reps\":%d,\"shapes\":[",
		   version->major, version->minor, version->patch, precision_names[prec], threads,
		   omp_get_max_threads(), t, layers, reps);
	for (int s = 0; s < NSHAPES; s++)
	{
		double		flops = 2.0 * t * ns[s] * ks[s] * layers;
		double		med;

		qsort(secs[s], reps, sizeof(double), cmp_double);
		med = secs[s][reps / 2];
		flops_all += flops;
		secs_all += med;
		printf("%s{\"name\":\"%s\",\"m\":%d,\"n\":%d,\"k\":%d,\"gflops\":%.1f,\"impl\":\"%s\",\"max_rel_err\":%.2e}",
			   s ? "," : "", names[s], t, ns[s], ks[s], flops / med / 1e9, shapes[s].impl, errs[s]);
	}
	printf("],\"gflops\":%.1f,\"idle_cpu_ms\":[%.1f,%.1f,%.1f,%.1f]}\n", flops_all / secs_all / 1e9,
		   idle_ms[0], idle_ms[1], idle_ms[2], idle_ms[3]);
	return 0;
}
