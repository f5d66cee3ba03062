/*
 * pool.h: the threads of the forward pass (pool.c says how they work).
 *
 * One pool per process, created on the first run that asks for more than
 * one thread (never at load time, so never in the postmaster) and resized
 * when the thread count changes.  A parallel step is a function called
 * once on each thread with (ith, nth); it splits its work by ith, and
 * returns when every thread is done (a barrier per step, as ggml does per
 * graph node).
 */
#ifndef OSV5M_POOL_H
#define OSV5M_POOL_H

#include "internal.h"

typedef void (*osv_pool_fn) (void *arg, int ith, int nth);

/*
 * Make sure `threads` threads (the caller included) are ready and that each
 * has at least scratch_bytes of 64-byte aligned scratch.  Idempotent; the
 * only place that allocates or starts threads.
 */
osv_status	osv_pool_prepare(int threads, size_t scratch_bytes, osv_error *err);

/* Threads the next osv_pool_run uses (1 before the first prepare). */
int			osv_pool_threads(void);

/* Call fn(arg, ith, nth) on every thread of the pool and wait for all. */
void		osv_pool_run(osv_pool_fn fn, void *arg);

/* The scratch of thread ith (valid inside osv_pool_run, and after prepare). */
void	   *osv_pool_scratch(int ith);

/* Rows [*lo, *hi) of n that thread ith of nth takes: contiguous, balanced. */
static inline void
osv_split(int n, int ith, int nth, int *lo, int *hi)
{
	*lo = (int) ((long) n * ith / nth);
	*hi = (int) ((long) n * (ith + 1) / nth);
}

#endif							/* OSV5M_POOL_H */
