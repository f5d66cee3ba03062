/*
 * pool.c: the process's compute threads.
 *
 * Every parallel step of the forward pass (a matrix product, the layer
 * norms, attention) calls osv_pool_run: the caller publishes the step by
 * bumping a generation counter, does its own share as thread 0, then waits
 * until the other threads have done theirs.  Between steps a worker spins
 * for a few microseconds on the counter (the next step usually follows at
 * once), then sleeps on a futex: between calls the threads use no CPU,
 * which matters on a database server whose cores run other work.
 *
 * Why our own pool rather than OpenMP or OpenBLAS's: the threads start in
 * the process that computes, on its first run, never in the postmaster;
 * their count follows osv5m.threads; they block every signal, so that
 * PostgreSQL's handlers only ever run on the backend's own thread; and the
 * steps are split by us, in a fixed way (see gemm.c for why that matters).
 *
 * Invariants: only one thread (the one that called osv_pool_prepare) calls
 * osv_pool_run, and never from inside a step; workers never call back into
 * the caller's code outside a step; the sleeper counts make sure that a
 * wake-up is never lost: a worker announces that it will sleep before it
 * checks the counter one last time inside futex_wait.
 */
#include "pool.h"

#include <limits.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void) 0)
#endif

/* Polls of the counter before sleeping: about 20-50 microseconds. */
#define SPIN_POLLS 20000

/* No more threads than this, whatever is asked (the GUC's maximum too). */
#define MAX_THREADS 256

typedef struct worker
{
	pthread_t	tid;
	int			ith;
	unsigned	seen;			/* the generation when it was created */
} worker;

static struct
{
	int			threads;		/* caller included; 1 = no worker */
	worker	   *workers;		/* threads - 1 of them */
	void	  **scratch;		/* one per thread, scratch_bytes each */
	size_t		scratch_bytes;

	osv_pool_fn fn;				/* the current step */
	void	   *arg;
	atomic_uint generation;		/* bumped for every step (and for stop) */
	atomic_int	pending;		/* workers still in the current step */
	atomic_int	sleeping_workers;
	atomic_int	caller_sleeping;
	atomic_bool stop;
}			pool = {.threads = 1};

static long
futex(atomic_uint *addr, int op, unsigned val)
{
	return syscall(SYS_futex, (unsigned *) addr, op, val, NULL, NULL, 0);
}

/* Wait until *addr != val: spin first, then sleep on the futex. */
static unsigned
wait_change(atomic_uint *addr, unsigned val, atomic_int *sleepers)
{
	unsigned	now;

	for (int i = 0; i < SPIN_POLLS; i++)
	{
		now = atomic_load(addr);
		if (now != val)
			return now;
		cpu_relax();
	}
	for (;;)
	{
		atomic_fetch_add(sleepers, 1);
		/* returns at once if *addr no longer holds val */
		futex(addr, FUTEX_WAIT_PRIVATE, val);
		atomic_fetch_sub(sleepers, 1);
		now = atomic_load(addr);
		if (now != val)
			return now;
	}
}

static void *
worker_main(void *p)
{
	worker	   *self = p;
	/* not the counter's value now: a step may already have been published */
	unsigned	seen = self->seen;

	for (;;)
	{
		seen = wait_change(&pool.generation, seen, &pool.sleeping_workers);
		if (atomic_load(&pool.stop))
			return NULL;
		pool.fn(pool.arg, self->ith, pool.threads);
		if (atomic_fetch_sub(&pool.pending, 1) == 1 && atomic_load(&pool.caller_sleeping))
			futex((atomic_uint *) &pool.pending, FUTEX_WAKE_PRIVATE, 1);
	}
}

/* Publish the current step (or the stop) to the workers. */
static void
publish(void)
{
	atomic_store(&pool.pending, pool.threads - 1);
	atomic_fetch_add(&pool.generation, 1);
	if (atomic_load(&pool.sleeping_workers) > 0)
		futex(&pool.generation, FUTEX_WAKE_PRIVATE, INT_MAX);
}

/* Wait until every worker has finished the current step. */
static void
wait_workers(void)
{
	int			left;

	for (int i = 0; i < SPIN_POLLS; i++)
	{
		if (atomic_load(&pool.pending) == 0)
			return;
		cpu_relax();
	}
	atomic_store(&pool.caller_sleeping, 1);
	while ((left = atomic_load(&pool.pending)) != 0)
		futex((atomic_uint *) &pool.pending, FUTEX_WAIT_PRIVATE, (unsigned) left);
	atomic_store(&pool.caller_sleeping, 0);
}

static void
stop_workers(void)
{
	if (pool.threads > 1)
	{
		atomic_store(&pool.stop, true);
		publish();
		for (int i = 0; i < pool.threads - 1; i++)
			pthread_join(pool.workers[i].tid, NULL);
		atomic_store(&pool.stop, false);
	}
	free(pool.workers);
	pool.workers = NULL;
	pool.threads = 1;
}

static void
free_scratch(void)
{
	if (pool.scratch != NULL)
		for (int i = 0; i < MAX_THREADS; i++)
			free(pool.scratch[i]);
	free(pool.scratch);
	pool.scratch = NULL;
	pool.scratch_bytes = 0;
}

osv_status
osv_pool_prepare(int threads, size_t scratch_bytes, osv_error *err)
{
	sigset_t	all,
				old;
	int			started = 0;
	int			rc = 0;

	if (threads < 1)
		threads = 1;
	if (threads > MAX_THREADS)
		threads = MAX_THREADS;

	/* scratch for every possible thread, so that a resize never reallocates it */
	if (scratch_bytes > pool.scratch_bytes || pool.scratch == NULL)
	{
		size_t		bytes = (scratch_bytes + 63) & ~(size_t) 63;

		free_scratch();
		pool.scratch = calloc(MAX_THREADS, sizeof(void *));
		if (pool.scratch == NULL)
			return osv_fail(err, OSV_ERR_NOMEM, "out of memory for the thread scratch");
		pool.scratch_bytes = bytes;
	}
	for (int i = 0; i < threads; i++)
		if (pool.scratch[i] == NULL && pool.scratch_bytes > 0)
		{
			pool.scratch[i] = aligned_alloc(64, pool.scratch_bytes);
			if (pool.scratch[i] == NULL)
				return osv_fail(err, OSV_ERR_NOMEM,
								"out of memory for the scratch of %d threads (%zu bytes each)",
								threads, pool.scratch_bytes);
		}

	if (threads == pool.threads)
		return OSV_OK;
	stop_workers();
	if (threads == 1)
		return OSV_OK;

	pool.workers = calloc((size_t) threads - 1, sizeof(worker));
	if (pool.workers == NULL)
		return osv_fail(err, OSV_ERR_NOMEM, "out of memory for %d threads", threads);

	/* the workers inherit a mask that blocks every signal */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	pool.threads = threads;
	for (; started < threads - 1; started++)
	{
		pool.workers[started].ith = started + 1;
		pool.workers[started].seen = atomic_load(&pool.generation);
		rc = pthread_create(&pool.workers[started].tid, NULL, worker_main,
							&pool.workers[started]);
		if (rc != 0)
			break;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (started < threads - 1)
	{
		pool.threads = started + 1;
		stop_workers();
		return osv_fail(err, OSV_ERR_NOMEM, "could not start %d threads: %s",
						threads, strerror(rc));
	}
	return OSV_OK;
}

int
osv_pool_threads(void)
{
	return pool.threads;
}

void
osv_pool_run(osv_pool_fn fn, void *arg)
{
	if (pool.threads == 1)
	{
		fn(arg, 0, 1);
		return;
	}
	pool.fn = fn;
	pool.arg = arg;
	publish();
	fn(arg, 0, pool.threads);
	wait_workers();
}

void *
osv_pool_scratch(int ith)
{
	return pool.scratch != NULL ? pool.scratch[ith] : NULL;
}

/* ---- the thread setting ---------------------------------------------------- */

static int	wanted_threads = 1;

void
osv_set_threads(int threads)
{
	wanted_threads = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
}

int
osv_threads(void)
{
	return wanted_threads;
}
