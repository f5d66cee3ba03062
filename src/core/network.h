/*
 * network.h: the run state of one caller (struct osv_context) and the
 * forward pass, shared by context.c (allocation, runs, results) and
 * network.c (kernels and the network itself), and only them and the tests.
 *
 * Invariants: every activation buffer is carved out of one 64-byte aligned
 * allocation made by osv_context_new_batch, sized from the model's info and
 * the batch capacity, so a run never allocates; the dimensions cached here are validated once there and
 * are all positive with hidden % heads == 0 and mid_hidden[i] % 4 == 0.
 */
#ifndef OSV5M_NETWORK_H
#define OSV5M_NETWORK_H

#include "internal.h"

struct osv_context
{
	const osv_model *model;
	int			max_images;		/* B: images one run can hold */
	osv_precision precision;	/* of the products with weights, in the current run */

	/* dimensions, copied from model->info */
	int			hidden;			/* D */
	int			tokens;			/* T = grid^2 + 1 */
	int			grid;			/* S / P patches per side */
	int			patch_dim;		/* 3 P P values per patch */
	int			ffn;			/* F, intermediate size */
	int			heads;
	int			head_dim;		/* D / heads */
	int			mid1,
				mid2;			/* MLPCentroid hidden dims */
	int			cells;			/* C */

	/*
	 * activations (all inside block); a run holds `images` images in slots
	 * 0 .. images - 1, and the rows of slot b start at row b * T
	 */
	float	   *pixels;			/* [B, 3, S, S] preprocessed inputs */
	float	   *patches;		/* [T - 1, 3 P P] im2col of one image */
	float	   *x;				/* [B T, D] residual stream */
	float	   *xn;				/* [B T, D] layer-normed x */
	float	   *q,
			   *k,
			   *v;				/* [B T, D] projections, head h at column h * hd */
	float	   *attn;			/* [B T, D] heads concatenated */
	float	   *packed_a;		/* the A operand of a product, packed (gemm.c) */
	float	   *ffn_buf;		/* [B T, F] MLP hidden */
	float	   *feature;		/* [B, D] class token of the last block */
	float	   *mid_a,
			   *mid_b;			/* [max(D, mid1, mid2)] MLP branch scratch */
	float	   *logits;			/* [B, C] */
	float	   *regression;		/* [B, 2 C], (lat, lon) per cell */
	double	   *probs;			/* [B, C] softmax of logits */
	int		   *order;			/* [B, C] cells by decreasing probability */
	int		   *cell;			/* [B] argmax of logits */
	int		   *slot;			/* [B] slot of input i of the last run, -1: none */
	void	   *block;			/* the one allocation */

	/* results of the last run */
	bool		has_result;
	int			inputs;			/* images given to the last run */
	osv_timings timings;
};

/*
 * Run the backbone, both MLP branches and the hybrid head on the first
 * `images` slots of ctx->pixels together (1 <= images <= max_images); fills
 * the results of those slots and timings.backbone / timings.head.  params
 * is not NULL.
 */
osv_status	osv_network_forward(osv_context *ctx, int images,
								const osv_params *params, osv_error *err);

/* The point regressed inside cell (0 <= cell < C) for slot b of the last run, degrees. */
void		osv_network_cell_point(const osv_context *ctx, int b, int cell,
								   double *lat, double *lon);

/* Vectorizable float kernels, exposed for the unit tests. */
void		osv_vec_erf(float *y, const float *x, size_t n);	/* ~1 ulp of erff */
void		osv_vec_exp(float *y, const float *x, size_t n);	/* x <= 0 only */

/*
 * Function fn (0 exp for x <= 0, 1 erf, 2 GELU, 3 quick_gelu) of n values:
 * the scalar definitions, and their AVX-512 forms (n a multiple of 16;
 * false where the CPU has no AVX-512).
 */
void		osv_vec_scalar(int fn, float *y, const float *x, size_t n);
bool		osv_vec_avx512(int fn, float *y, const float *x, size_t n);

#endif							/* OSV5M_NETWORK_H */
