/*
 * gemm.h: the matrix products of the forward pass, on our own kernels
 * (gemm.c says how and why).
 *
 *   C[i, j] = post(C[i, j] (if accumulate) + (alpha * sum_k A[i, k] B(k, j) + bias[j]))
 *
 * (post: an activation of activation.h, or none)
 *
 * A is row-major [m, k] with leading dimension lda.  B is either a PyTorch
 * weight, row-major [n, k] (b_is_nk: B(k, j) = b[j * ldb + k]), or
 * row-major [k, n] (B(k, j) = b[k * ldb + j]).  Every C[i, j] is one chain
 * of fused multiply-adds over k = 0, 1, ..., k - 1 from zero, then the
 * epilogue in the order written above, on every kernel path: a result
 * does not depend on the thread count, on m (the images in a run), on
 * where C's rows are, nor on which of the AVX-512, AVX2 or portable
 * kernels ran.
 */
#ifndef OSV5M_GEMM_H
#define OSV5M_GEMM_H

#include "internal.h"

/* The activation applied to each output last (activation.h's functions), if any. */
typedef enum osv_gemm_post
{
	OSV_POST_NONE = 0,
	OSV_POST_GELU,				/* osv_gelu */
	OSV_POST_QUICK_GELU			/* osv_quick_gelu */
} osv_gemm_post;

typedef struct osv_gemm
{
	int			m,
				n,
				k;
	const float *a;
	size_t		lda;
	const float *b;
	size_t		ldb;
	bool		b_is_nk;		/* b is [n, k] (a PyTorch weight) */
	float		alpha;
	const float *bias;			/* [n] or NULL */
	bool		accumulate;		/* C = C + result, else C = result */
	/*
	 * osv_gemm_run only: its packed_a already holds this A, packed by the
	 * previous product run with it (same a, lda, m, k and precision), so it
	 * is not packed again (the key and value projections share one A)
	 */
	bool		a_packed;
	float	   *c;
	size_t		ldc;
	/*
	 * applied to each output after the rest of the epilogue: in registers
	 * where the path has the activation's vector form (the same bits)
	 */
	osv_gemm_post post;
	/*
	 * b (b_is_nk, ldb == k) already packed in panels of b_packed_nr columns
	 * (osv_gemm_pack_weight), or NULL: used when the kernels' panel width is
	 * b_packed_nr, instead of packing each panel on the fly.
	 */
	const float *b_packed;
	int			b_packed_nr;

	/*
	 * bf16: A and B rounded to bfloat16 (osv_bf16_round) and each output's
	 * sum taken as AVX512_BF16's vdpbf16ps takes it: over the pairs of k
	 * (0, 1), (2, 3), ... in order, per pair the odd term first, then the
	 * even one, each added to the float32 sum exactly and rounded to
	 * nearest, a subnormal sum flushed to zero.  That instruction does it
	 * natively; every other path emulates it bit for bit with the float32
	 * kernels (the values already rounded, k swapped within pairs, the
	 * CPU's flush-to-zero set).  The epilogue is float32's.
	 */
	bool		bf16;
	/*
	 * For bf16, b (b_is_nk, ldb == k) already rounded and packed in panels of
	 * b_packed16_nr columns (osv_gemm_pack_weight_bf16), or NULL.
	 */
	const uint16_t *b_packed16;
	int			b_packed16_nr;

	/*
	 * int8: each row of A and each column of B quantized
	 * symmetrically to [-127, 127] with its own scale (largest magnitude /
	 * 127; osv_quantize_int8), A shifted by 128 to unsigned bytes; each
	 * output is the exact integer sum over k (AVX512_VNNI's vpdpbusd
	 * natively, integer C elsewhere: the same integers), less 128 times
	 * its column's sum, converted to float32 and multiplied by the row's
	 * scale, then the column's; then the epilogue (alpha first).
	 */
	bool		int8;
	/* for int8, b (b_is_nk, ldb == k) quantized and packed (osv_gemm_pack_weight_int8), or NULL */
	const uint8_t *b_packed8;
	int			b_packed8_nr;
} osv_gemm;

/* The kernel paths, fastest first; OSV_KERNELS_AUTO picks from the CPU. */
typedef enum osv_kernels
{
	OSV_KERNELS_AUTO,
	OSV_KERNELS_AVX512_BF16_VNNI,	/* the AVX-512 path, bf16 and int8 products native */
	OSV_KERNELS_AVX512_BF16,	/* the AVX-512 path, bf16 products native */
	OSV_KERNELS_AVX512_VNNI,	/* the AVX-512 path, int8 products native */
	OSV_KERNELS_AVX512,
	OSV_KERNELS_AVX2,
	OSV_KERNELS_PORTABLE
} osv_kernels;

/*
 * The path the products take now: "avx512_bf16_vnni", "avx512_bf16",
 * "avx512_vnni", "avx512", "avx2" or "portable".
 */
const char *osv_gemm_kernels_name(void);

/*
 * Use path `which` from now on (tests and benchmarks); false, leaving the
 * path unchanged, when this CPU cannot run it.
 */
bool		osv_gemm_use_kernels(osv_kernels which);

/*
 * true when the path in use is one of the AVX-512 ones: the network's
 * elementwise steps then take their AVX-512 forms too (the same bits).
 */
bool		osv_gemm_avx512(void);

/* The panel width of the kernels in use: what a packed weight must be packed for. */
int			osv_gemm_nr(void);

/* Floats of a weight [n, k] packed in panels of nr columns (zero-padded). */
size_t		osv_gemm_packed_weight_floats(int n, int k, int nr);

/* Pack a weight [n, k] (row-major, PyTorch's layout) in panels of nr columns. */
void		osv_gemm_pack_weight(const float *w, int n, int k, int nr, float *dst);

/*
 * x rounded to bfloat16, as vcvtneps2bf16 does: to nearest, ties to even;
 * a subnormal becomes a zero of its sign; a NaN stays a (quiet) NaN.
 */
uint16_t	osv_bf16_round(float x);

/* The float32 value of a bfloat16. */
static inline float
osv_bf16_to_float(uint16_t h)
{
	union
	{
		uint32_t	u;
		float		f;
	}			v = {(uint32_t) h << 16};

	return v.f;
}

/* uint16 values of a weight [n, k] packed in bf16 pairs in panels of nr columns. */
size_t		osv_gemm_packed_weight_halves(int n, int k, int nr);

/*
 * Pack a weight [n, k] in bf16 for panels of nr columns: panel by panel,
 * [ceil(k / 2)][nr][2] (the pair of k values of each column side by side,
 * zero-padded), as vdpbf16ps reads them.
 */
void		osv_gemm_pack_weight_bf16(const float *w, int n, int k, int nr, uint16_t *dst);

/*
 * The int8 quantization of n values x (a row of A, or a column of B): the
 * scale (largest magnitude / 127, 0 for all zeros) and, in q,
 * nearbyint(x * (127 / largest magnitude)) clamped to [-127, 127].
 */
float		osv_quantize_int8(const float *x, size_t stride, int n, int8_t *q);

/*
 * Bytes of a weight [n, k] quantized and packed for int8 in panels of nr
 * columns: panel by panel [ceil(k / 4)][nr][4] int8 values (zero-padded),
 * then (64-byte aligned) a float scale and an int32 sum of the values of
 * each column, for all the panels' columns.
 */
size_t		osv_gemm_packed_weight_int8_bytes(int n, int k, int nr);
void		osv_gemm_pack_weight_int8(const float *w, int n, int k, int nr, uint8_t *dst);

/* Floats of scratch one thread needs for products with k <= max_k and m <= max_m (serial use). */
size_t		osv_gemm_scratch_floats(int max_m, int max_k);

/* Floats of the shared A buffer of osv_gemm_run for m rows of k values. */
size_t		osv_gemm_packed_a_floats(int m, int k);

/*
 * The product on every thread of the pool: rows of A are packed once into
 * packed_a (osv_gemm_packed_a_floats of it), then the threads split
 * the columns of C.  Each thread's scratch must hold osv_gemm_scratch_floats(0, k).
 */
void		osv_gemm_run(const osv_gemm *g, float *packed_a);

/* The whole product on the calling thread, with scratch of osv_gemm_scratch_floats(m, k). */
void		osv_gemm_serial(const osv_gemm *g, float *scratch);

#endif							/* OSV5M_GEMM_H */
