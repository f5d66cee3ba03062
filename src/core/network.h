/*
 * network.h: the run state of one caller (struct osv_context) and the
 * forward pass, shared by context.c (allocation, runs, results) and
 * network.c (kernels and the network itself), and only them and the tests.
 *
 * Invariants: every activation buffer is carved out of one 64-byte aligned
 * allocation made by osv_context_new, sized from the model's info, so a run
 * never allocates; the dimensions cached here are validated once there and
 * are all positive with hidden % heads == 0 and mid_hidden[i] % 4 == 0.
 */
#ifndef OSV5M_NETWORK_H
#define OSV5M_NETWORK_H

#include "internal.h"

struct osv_context
{
	const osv_model *model;

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

	/* activations (all inside block) */
	float	   *pixels;			/* [3, S, S] preprocessed input */
	float	   *patches;		/* [T - 1, 3 P P] im2col of pixels */
	float	   *x;				/* [T, D] residual stream */
	float	   *xn;				/* [T, D] layer-normed x */
	float	   *q,
			   *k,
			   *v;				/* [T, D] projections, head h at column h * hd */
	float	   *attn;			/* [T, D] heads concatenated */
	float	   *scores;			/* [T, T] attention of one head */
	float	   *ffn_buf;		/* [T, F] MLP hidden */
	float	   *feature;		/* [D] class token of the last block */
	float	   *mid_a,
			   *mid_b;			/* [max(D, mid1, mid2)] MLP branch scratch */
	float	   *logits;			/* [C] */
	float	   *regression;		/* [2 C], (lat, lon) per cell */
	double	   *probs;			/* [C] softmax of logits */
	int		   *order;			/* [C] cells by decreasing probability */
	void	   *block;			/* the one allocation */

	/* results of the last run */
	bool		has_result;
	int			cell;			/* argmax of logits */
	osv_timings timings;
};

/*
 * Run the backbone, both MLP branches and the hybrid head on ctx->pixels;
 * fills the results and timings.backbone / timings.head.  params is not NULL.
 */
osv_status	osv_network_forward(osv_context *ctx, const osv_params *params,
								osv_error *err);

/* The point regressed inside cell (0 <= cell < C) by the last run, degrees. */
void		osv_network_cell_point(const osv_context *ctx, int cell,
								   double *lat, double *lon);

/* Vectorizable float kernels, exposed for the unit tests. */
void		osv_vec_erf(float *y, const float *x, size_t n);	/* ~1 ulp of erff */
void		osv_vec_exp(float *y, const float *x, size_t n);	/* x <= 0 only */

#endif							/* OSV5M_NETWORK_H */
