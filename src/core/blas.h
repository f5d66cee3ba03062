/*
 * blas.h: OpenBLAS, loaded on first use, as the tests' independent
 * cross-check of the kernels of gemm.c (blas.c says why).  Row-major always.
 */
#ifndef OSV5M_BLAS_H
#define OSV5M_BLAS_H

#include "internal.h"

#include <cblas.h>

/*
 * The OPENBLAS_CORETYPE that osv_blas_load sets when the user did not set
 * one, or NULL (see blas.c).
 */
const char *osv_blas_preferred_core(void);

/* Load OpenBLAS if not yet loaded; idempotent. */
osv_status	osv_blas_load(osv_error *err);

/* C = alpha op(A) op(B) + beta C, row-major; osv_blas_load must have succeeded. */
void		osv_sgemm(CBLAS_TRANSPOSE trans_a, CBLAS_TRANSPOSE trans_b,
					  int m, int n, int k, float alpha, const float *a, int lda,
					  const float *b, int ldb, float beta, float *c, int ldc);

/* y = alpha op(A) x + beta y, row-major. */
void		osv_sgemv(CBLAS_TRANSPOSE trans, int m, int n, float alpha,
					  const float *a, int lda, const float *x, float beta,
					  float *y);

/* OpenBLAS's own threads, and the name of the kernels it chose. */
void		osv_blas_set_threads(int threads);
int			osv_blas_threads(void);
const char *osv_blas_core_name(void);

#endif							/* OSV5M_BLAS_H */
