/*
 * file.c: open and read the files the core and the tool take from the file
 * system (config.json, model.safetensors, the quadtree CSV, the tool's
 * images), refusing anything that is not a regular file before any call
 * that could block.
 *
 * Why: open(2) of a FIFO for reading sleeps until a writer comes, and a
 * read of a FIFO, a terminal or some devices sleeps until data comes.
 * Inside a PostgreSQL backend that sleep is in the kernel, and the server's
 * signal handlers restart the call (SA_RESTART), so neither
 * statement_timeout nor pg_cancel_backend nor pg_terminate_backend ends it:
 * a FIFO planted in a model directory would hang the backend for good.
 *
 * How: stat(2) first, so that a FIFO or a device is normally never opened
 * at all (opening some devices has effects of its own); then open with
 * O_NONBLOCK (a FIFO opens at once even if it replaced the file since the
 * stat), O_NOCTTY (a terminal never becomes the controlling one) and
 * O_CLOEXEC, and check the open descriptor again with fstat(2): that check
 * has no window in which the name can change.  Only a regular file gets
 * past it; O_NONBLOCK is then cleared, so that reads and mmap see the file
 * as any blocking descriptor would.
 *
 * Files the core writes (osv5m convert's outputs, through a temporary name
 * and a rename) are created afresh with osv_file_create: whatever had the
 * name is removed first, and O_CREAT | O_EXCL | O_NOFOLLOW then refuses
 * anything planted there since, a FIFO (whose open for writing would wait
 * for a reader) or a symbolic link (which would redirect the write).
 *
 * Every message names the file by the caller's label, e.g.
 * `config file "/m/config.json"`, `"/m/model.safetensors"` or just `file`.
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* buf = `what "path"`, or `"path"` when what is NULL. */
void
osv_file_label(char *buf, size_t size, const char *what, const char *path)
{
	if (what == NULL)
		snprintf(buf, size, "\"%s\"", path);
	else
		snprintf(buf, size, "%s \"%s\"", what, path);
}

/* Open a regular file for reading without ever blocking on anything else. */
osv_status
osv_file_open(const char *path, const char *label, int *fd_out, uint64_t *size,
			  bool *missing, osv_error *err)
{
	struct stat sb;
	int			fd;
	int			flags;
	int			e;

	*fd_out = -1;
	*size = 0;
	if (missing)
		*missing = false;

	/* a FIFO or a device is refused here without being opened */
	if (stat(path, &sb) != 0)
	{
		e = errno;
		if (missing && e == ENOENT)
			*missing = true;
		return osv_fail(err, OSV_ERR_IO, "could not open %s: %s", label, strerror(e));
	}
	if (!S_ISREG(sb.st_mode))
		return osv_fail(err, OSV_ERR_IO, "%s is not a regular file", label);

	/* the name may have been replaced since: O_NONBLOCK, then check again */
	do
		fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
	while (fd < 0 && errno == EINTR);
	if (fd < 0)
	{
		e = errno;
		if (missing && e == ENOENT)
			*missing = true;
		return osv_fail(err, OSV_ERR_IO, "could not open %s: %s", label, strerror(e));
	}
	if (fstat(fd, &sb) != 0)
	{
		e = errno;
		close(fd);
		return osv_fail(err, OSV_ERR_IO, "could not stat %s: %s", label, strerror(e));
	}
	if (!S_ISREG(sb.st_mode))
	{
		close(fd);
		return osv_fail(err, OSV_ERR_IO, "%s is not a regular file", label);
	}

	/* regular files ignore O_NONBLOCK today; clear it all the same */
	flags = fcntl(fd, F_GETFL);
	if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0)
	{
		e = errno;
		close(fd);
		return osv_fail(err, OSV_ERR_IO, "could not set the flags of %s: %s", label,
						strerror(e));
	}
	*fd_out = fd;
	*size = (uint64_t) sb.st_size;
	return OSV_OK;
}

/* Read a whole regular file of at most cap bytes, NUL-terminated. */
osv_status
osv_file_read(const char *path, const char *label, size_t cap, uint8_t **out,
			  size_t *len, bool *missing, osv_error *err)
{
	uint8_t    *buf;
	uint64_t	size;
	size_t		got = 0;
	int			fd;
	osv_status	st;

	*out = NULL;
	*len = 0;
	st = osv_file_open(path, label, &fd, &size, missing, err);
	if (st != OSV_OK)
		return st;
	/* checked before allocating: the size is the file's to choose */
	if (size > cap)
	{
		close(fd);
		return osv_fail(err, OSV_ERR_LIMIT, "%s is larger than %zu bytes", label, cap);
	}
	buf = malloc((size_t) size + 1);
	if (buf == NULL)
	{
		close(fd);
		return osv_fail(err, OSV_ERR_NOMEM, "out of memory reading %s", label);
	}
	while (got < (size_t) size)
	{
		ssize_t		n = read(fd, buf + got, (size_t) size - got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
		{
			int			e = errno;

			close(fd);
			free(buf);
			return osv_fail(err, OSV_ERR_IO, "could not read %s: %s", label,
							n == 0 ? "unexpected end of file" : strerror(e));
		}
		got += (size_t) n;
	}
	close(fd);
	buf[got] = '\0';
	*out = buf;
	*len = got;
	return OSV_OK;
}

/* Create path as a new regular file for writing, mode 0644; *fd on success. */
osv_status
osv_file_create(const char *path, const char *label, int *fd_out, osv_error *err)
{
	int			fd;

	*fd_out = -1;
	if (unlink(path) != 0 && errno != ENOENT)
		return osv_fail(err, OSV_ERR_IO, "could not remove %s: %s", label, strerror(errno));
	do
		fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_NOCTTY | O_CLOEXEC,
				  0644);
	while (fd < 0 && errno == EINTR);
	if (fd < 0)
		return osv_fail(err, OSV_ERR_IO, "could not create %s: %s", label, strerror(errno));
	*fd_out = fd;
	return OSV_OK;
}

/* The public form for the tool: messages name the file just "file". */
osv_status
osv_read_file(const char *path, size_t max_bytes, uint8_t **data, size_t *size,
			  osv_error *err)
{
	if (data == NULL || size == NULL)
		return osv_fail(err, OSV_ERR_ARGUMENT, "no output buffer");
	*data = NULL;
	*size = 0;
	if (path == NULL)
		return osv_fail(err, OSV_ERR_ARGUMENT, "no file name");
	return osv_file_read(path, "file", max_bytes, data, size, NULL, err);
}

/*
 * Map every page of a read-only file mapping into this process now, in one
 * call (MADV_POPULATE_READ, Linux 5.14), instead of one page fault per
 * page (or per 16 pages, with the kernel's fault-around) during the first
 * inference: for the 1.3 GB model, 53 ms instead of about 650 ms of faults
 * on a virtual machine, where each fault is a trap to the hypervisor.  The
 * pages are the page cache's, shared by every backend; what this adds to a
 * backend is its page tables, which the first inference would build
 * anyway.  Best effort: on an older kernel, or when a page cannot be read,
 * it only asks for read-ahead and the faults happen as before.
 */
void
osv_map_populate(void *map, size_t size)
{
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
	if (madvise(map, size, MADV_POPULATE_READ) != 0)
		(void) madvise(map, size, MADV_WILLNEED);
}
