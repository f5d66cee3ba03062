/*
 * populate.c: what it costs to bring a file's pages into a process's page
 * tables, one page fault at a time (touching one byte per 4 KB page, as a
 * first inference does) against one madvise(MADV_POPULATE_READ) call (what
 * the core does at model open, src/core/file.c), each on a fresh mapping,
 * alternated RUNS times.  The file should be in the page cache already
 * (run it twice); no disk read is then timed.
 *
 * Usage: populate FILE [RUNS]      e.g. populate models/full-random/model.safetensors 3
 * Build: cc -std=gnu11 -O2 -o build/populate test/bench/populate.c
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

static double
now_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

/* Milliseconds to map every page of fd's size bytes, by faults or in one call. */
static double
map_pages(int fd, size_t size, int populate)
{
	const volatile char *map = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
	double		t0 = now_ms();
	char		sum = 0;

	if (map == MAP_FAILED)
	{
		perror("mmap");
		exit(1);
	}
	if (populate)
	{
		if (madvise((void *) map, size, MADV_POPULATE_READ) != 0)
			perror("madvise(MADV_POPULATE_READ)");
	}
	else
		for (size_t i = 0; i < size; i += 4096)
			sum += map[i];
	t0 = now_ms() - t0;
	munmap((void *) map, size);
	(void) sum;
	return t0;
}

int
main(int argc, char **argv)
{
	int			runs = argc > 2 ? atoi(argv[2]) : 3;
	struct stat st;
	int			fd;

	if (argc < 2 || (fd = open(argv[1], O_RDONLY)) < 0 || fstat(fd, &st) != 0)
	{
		fprintf(stderr, "usage: populate FILE [RUNS]\n");
		return 2;
	}
	map_pages(fd, (size_t) st.st_size, 1);	/* into the page cache */
	for (int r = 0; r < runs; r++)
		printf("{\"bytes\":%lld,\"page_faults_ms\":%.1f,\"populate_ms\":%.1f}\n",
			   (long long) st.st_size, map_pages(fd, (size_t) st.st_size, 0),
			   map_pages(fd, (size_t) st.st_size, 1));
	close(fd);
	return 0;
}
