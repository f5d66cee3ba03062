/*
 * blas.c: OpenBLAS, loaded with dlopen on first use instead of linked: the
 * independent cross-check of our own kernels (gemm.c) in the tests
 * (test_gemm).  The forward pass never calls it.
 *
 * Why dlopen: OpenBLAS starts its worker threads in a library constructor;
 * linked into osv5m.so, those threads would start in the postmaster as soon
 * as the library is preloaded.  Loaded here, only a test that asks for it
 * ever has them.
 *
 * The kernel family: OpenBLAS 0.3.21 falls back to its AVX2 ("Haswell")
 * kernels on AVX-512 CPUs it does not know; when OPENBLAS_CORETYPE is unset
 * and the CPU has AVX-512 we ask for its SkylakeX kernels.
 *
 * Invariant: the function pointers are set all together or not at all; a
 * caller runs osv_blas_load() before its first osv_sgemm.
 */
#include "blas.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef void (*sgemm_fn) (const enum CBLAS_ORDER, const enum CBLAS_TRANSPOSE,
						  const enum CBLAS_TRANSPOSE, const blasint, const blasint,
						  const blasint, const float, const float *, const blasint,
						  const float *, const blasint, const float, float *,
						  const blasint);
typedef void (*sgemv_fn) (const enum CBLAS_ORDER, const enum CBLAS_TRANSPOSE,
						  const blasint, const blasint, const float, const float *,
						  const blasint, const float *, const blasint, const float,
						  float *, const blasint);
typedef void (*set_threads_fn) (int);
typedef int (*get_threads_fn) (void);
typedef char *(*corename_fn) (void);

static void *blas_handle;
static sgemm_fn blas_sgemm;
static sgemv_fn blas_sgemv;
static set_threads_fn blas_set_threads;
static get_threads_fn blas_get_threads;
static corename_fn blas_corename;

/* Threads asked for before the library was loaded; 0 = not asked. */
static int	pending_threads;

/* Debian installs the selected OpenBLAS variant under these names. */
static const char *const blas_names[] = {
	"libopenblas.so.0",
	"libopenblas.so",
};

const char *
osv_blas_preferred_core(void)
{
#if defined(__x86_64__)
	/* __builtin_cpu_supports also checks that the OS saves AVX-512 state */
	__builtin_cpu_init();
	if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
		__builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
		return "SkylakeX";
#endif
	return NULL;
}

osv_status
osv_blas_load(osv_error *err)
{
	void	   *handle = NULL;
	const char *why = "not found";
	char		threads[16];

	if (blas_handle != NULL)
		return OSV_OK;

	/*
	 * The constructor reads OPENBLAS_NUM_THREADS: set it so that the library
	 * starts exactly the threads we want (one thread starts none).
	 */
	snprintf(threads, sizeof(threads), "%d", pending_threads > 0 ? pending_threads : 1);
	setenv("OPENBLAS_NUM_THREADS", threads, 1);
	if (getenv("OPENBLAS_CORETYPE") == NULL && osv_blas_preferred_core() != NULL)
		setenv("OPENBLAS_CORETYPE", osv_blas_preferred_core(), 0);

	for (size_t i = 0; i < sizeof(blas_names) / sizeof(blas_names[0]) && handle == NULL; i++)
	{
		handle = dlopen(blas_names[i], RTLD_NOW | RTLD_LOCAL);
		if (handle == NULL)
			why = dlerror();
	}
	if (handle == NULL)
		return osv_fail(err, OSV_ERR_IO, "could not load OpenBLAS: %s", why);

	blas_sgemm = (sgemm_fn) dlsym(handle, "cblas_sgemm");
	blas_sgemv = (sgemv_fn) dlsym(handle, "cblas_sgemv");
	blas_set_threads = (set_threads_fn) dlsym(handle, "openblas_set_num_threads");
	blas_get_threads = (get_threads_fn) dlsym(handle, "openblas_get_num_threads");
	blas_corename = (corename_fn) dlsym(handle, "openblas_get_corename");
	if (!blas_sgemm || !blas_sgemv || !blas_set_threads || !blas_get_threads || !blas_corename)
	{
		blas_sgemm = NULL;
		blas_sgemv = NULL;
		blas_set_threads = NULL;
		blas_get_threads = NULL;
		blas_corename = NULL;
		dlclose(handle);
		return osv_fail(err, OSV_ERR_IO,
						"the BLAS library found is not OpenBLAS (cblas_sgemm or openblas_get_corename missing)");
	}
	blas_handle = handle;
	if (pending_threads > 0)
		blas_set_threads(pending_threads);
	return OSV_OK;
}

void
osv_sgemm(CBLAS_TRANSPOSE trans_a, CBLAS_TRANSPOSE trans_b, int m, int n, int k,
		  float alpha, const float *a, int lda, const float *b, int ldb,
		  float beta, float *c, int ldc)
{
	blas_sgemm(CblasRowMajor, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb,
			   beta, c, ldc);
}

void
osv_sgemv(CBLAS_TRANSPOSE trans, int m, int n, float alpha, const float *a,
		  int lda, const float *x, float beta, float *y)
{
	blas_sgemv(CblasRowMajor, trans, m, n, alpha, a, lda, x, 1, beta, y, 1);
}

void
osv_blas_set_threads(int threads)
{
	if (threads < 1)
		return;
	pending_threads = threads;
	if (blas_set_threads != NULL && blas_get_threads() != threads)
		blas_set_threads(threads);
}

int
osv_blas_threads(void)
{
	if (blas_get_threads != NULL)
		return blas_get_threads();
	return pending_threads > 0 ? pending_threads : 1;
}

const char *
osv_blas_core_name(void)
{
	if (blas_corename != NULL)
		return blas_corename();
	return "not loaded";
}
