/*
 * check.h: the assertion macros of the core's C tests.
 *
 * Every CHECK is one counted assertion; a failing one prints where and why
 * and the test goes on.  check_summary() prints "N passed, N failed" and
 * returns the exit status.  Tests link only the core (never PostgreSQL).
 */
#ifndef OSV_CHECK_H
#define OSV_CHECK_H

#include <stdio.h>

static int	check_passed;
static int	check_failed;

#define CHECK(cond, ...) \
	do { \
		if (cond) \
			check_passed++; \
		else \
		{ \
			check_failed++; \
			fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
			fprintf(stderr, __VA_ARGS__); \
			fputc('\n', stderr); \
		} \
	} while (0)

static inline int
check_summary(const char *name)
{
	printf("%s: %d passed, %d failed\n", name, check_passed, check_failed);
	return check_failed == 0 ? 0 : 1;
}

#endif
