/*
 * test_files.c: files that are not regular files (a FIFO, a FIFO that a
 * writer holds open, a directory, a character device through a symlink)
 * are refused with an error, never waited on: osv_read_file directly (the
 * tool's images) and every file of a model directory in turn (config.json,
 * model.safetensors or pytorch_model.bin, the quadtree CSV, a --quadtree
 * override).  osv_model_convert's outputs are created afresh, never
 * through a FIFO or a symbolic link planted under their temporary names.
 *
 * A blocking open(2) of a FIFO with no writer, or a read(2) of one whose
 * writer sends nothing, would sleep for ever; inside a PostgreSQL backend
 * nothing could end that sleep.  So every case runs under alarm(): a hang
 * prints a failure and exits non-zero instead of hanging the test suite.
 * The models are copies of test/models/tiny-gelu and tiny-gelu-pt in a
 * temporary directory.
 */
#include "internal.h"
#include "check.h"
#include "st_writer.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* seconds one case may take before it counts as a hang */
#define CASE_SECONDS 10

/*
 * The test models copied, and the files tried in each: those it has, and
 * for the PyTorch checkpoint a quadtree CSV it does not need but reads
 * (to cross-check) when one is there.
 */
typedef struct test_model
{
	const char *dir;
	const char *files[4];		/* NULL-terminated */
	int			ncopy;			/* the first ncopy files are copied */
} test_model;

static const test_model test_models[] = {
	{"test/models/tiny-gelu",
	{"config.json", "model.safetensors", "quadtree_10_1000.csv", NULL}, 3},
	{"test/models/tiny-gelu-pt",
	{"config.json", "pytorch_model.bin", "quadtree_10_1000.csv", NULL}, 2},
};

static char tmpdir[64];
static const char *current_case = "";

/* SIGALRM: a case hung; say which (async-signal-safe calls only) and stop. */
static void
on_alarm(int sig)
{
	static const char head[] = "FAIL test_files: hung in case ";
	static const char tail[] = "\ntest_files: 0 passed, 1 failed\n";

	(void) sig;
	(void) !write(STDERR_FILENO, head, sizeof(head) - 1);
	(void) !write(STDERR_FILENO, current_case, strlen(current_case));
	(void) !write(STDERR_FILENO, tail, sizeof(tail) - 1);
	_exit(1);
}

/* tmpdir/name in a static buffer (one at a time). */
static const char *
tmp_path(const char *name)
{
	static char path[256];

	snprintf(path, sizeof(path), "%s/%s", tmpdir, name);
	return path;
}

/* What takes the place of a file. */
typedef enum hostile
{
	H_FIFO,						/* a FIFO nobody writes to */
	H_FIFO_WRITER,				/* a FIFO whose writer is open but silent */
	H_DIRECTORY,
	H_DEVICE_LINK,				/* a symlink to /dev/null */
	H_FIFO_LINK					/* a symlink to a FIFO elsewhere */
} hostile;

static const char *const hostile_names[] = {
	"fifo", "fifo with a silent writer", "directory", "symlink to /dev/null",
	"symlink to a fifo"
};

/*
 * Make path a hostile thing; returns a descriptor to close afterwards (the
 * FIFO's writer end, opened O_RDWR so that it does not block), or -1.
 */
static int
make_hostile(const char *path, hostile kind)
{
	char		target[300];
	int			fd = -1;
	int			rc = 0;

	switch (kind)
	{
		case H_FIFO:
			rc = mkfifo(path, 0600);
			break;
		case H_FIFO_WRITER:
			rc = mkfifo(path, 0600);
			/* O_RDWR on a FIFO never blocks on Linux: we are the writer */
			if (rc == 0 && (fd = open(path, O_RDWR | O_CLOEXEC)) < 0)
				rc = -1;
			break;
		case H_DIRECTORY:
			rc = mkdir(path, 0700);
			break;
		case H_DEVICE_LINK:
			rc = symlink("/dev/null", path);
			break;
		case H_FIFO_LINK:
			snprintf(target, sizeof(target), "%s/elsewhere.fifo", tmpdir);
			unlink(target);
			rc = mkfifo(target, 0600);
			if (rc == 0)
				rc = symlink(target, path);
			break;
	}
	CHECK(rc == 0, "could not make %s a %s: %s", path, hostile_names[kind],
		  strerror(errno));
	return fd;
}

/* Undo make_hostile. */
static void
remove_hostile(const char *path, hostile kind, int fd)
{
	if (fd >= 0)
		close(fd);
	if (kind == H_DIRECTORY)
		rmdir(path);
	else
		unlink(path);
	if (kind == H_FIFO_LINK)
		unlink(tmp_path("elsewhere.fifo"));
}

/* osv_read_file: regular files are read, everything else refused at once. */
static void
test_read_file(void)
{
	uint8_t    *data;
	size_t		size;
	osv_error	err;
	char		path[256];

	current_case = "read_file regular";
	alarm(CASE_SECONDS);
	CHECK(st_write_file(tmp_path("plain.bin"), "abc\0def", 7) == 0, "write plain.bin");
	CHECK(osv_read_file(tmp_path("plain.bin"), 100, &data, &size, &err) == OSV_OK &&
		  size == 7 && memcmp(data, "abc\0def", 7) == 0 && data[7] == '\0',
		  "regular file: %s", err.message);
	free(data);
	CHECK(osv_read_file(tmp_path("plain.bin"), 6, &data, &size, &err) == OSV_ERR_LIMIT &&
		  data == NULL && strstr(err.message, "larger than 6 bytes") != NULL,
		  "over the cap: %s", err.message);
	unlink(tmp_path("plain.bin"));
	CHECK(st_write_file(tmp_path("empty.bin"), "", 0) == 0, "write empty.bin");
	CHECK(osv_read_file(tmp_path("empty.bin"), 100, &data, &size, &err) == OSV_OK &&
		  size == 0 && data != NULL && data[0] == '\0', "empty file: %s", err.message);
	free(data);
	unlink(tmp_path("empty.bin"));
	CHECK(osv_read_file(tmp_path("none.bin"), 100, &data, &size, &err) == OSV_ERR_IO &&
		  strcmp(err.message, "could not open file: No such file or directory") == 0,
		  "missing file: %s", err.message);

	for (hostile kind = H_FIFO; kind <= H_FIFO_LINK; kind++)
	{
		int			fd;

		current_case = hostile_names[kind];
		alarm(CASE_SECONDS);
		snprintf(path, sizeof(path), "%s", tmp_path("image.jpg"));
		fd = make_hostile(path, kind);
		CHECK(osv_read_file(path, 100, &data, &size, &err) == OSV_ERR_IO &&
			  data == NULL && strcmp(err.message, "file is not a regular file") == 0,
			  "image as %s: %s", hostile_names[kind], err.message);
		remove_hostile(path, kind, fd);
	}
	current_case = "/dev/zero";
	alarm(CASE_SECONDS);
	CHECK(osv_read_file("/dev/zero", 100, &data, &size, &err) == OSV_ERR_IO,
		  "/dev/zero: %s", err.message);
	alarm(0);
}

/* Copy the first ncopy files of tm into tmpdir; false when they are not there. */
static bool
copy_model(const test_model *tm)
{
	for (int i = 0; i < tm->ncopy; i++)
	{
		char		src[256];
		uint8_t    *data;
		size_t		size;
		osv_error	err;

		snprintf(src, sizeof(src), "%s/%s", tm->dir, tm->files[i]);
		if (osv_read_file(src, (size_t) 1 << 30, &data, &size, &err) != OSV_OK)
		{
			CHECK(false, "%s: %s (run from the repository root)", src, err.message);
			return false;
		}
		CHECK(st_write_file(tmp_path(tm->files[i]), data, size) == 0, "copy %s", src);
		free(data);
	}
	return true;
}

/* Each file of a model in turn, made each hostile kind: an error naming it. */
static void
test_model_files(const test_model *tm)
{
	osv_model  *m = NULL;
	osv_error	err;
	char		path[256];
	char		aside[300];

	if (!copy_model(tm))
		return;
	current_case = "model as copied";
	alarm(CASE_SECONDS);
	CHECK(osv_model_open(tmpdir, NULL, &m, &err) == OSV_OK, "copy of %s: %s", tm->dir,
		  err.message);
	osv_model_close(m);

	for (int i = 0; tm->files[i] != NULL; i++)
	{
		bool		copied = i < tm->ncopy;

		snprintf(path, sizeof(path), "%s", tmp_path(tm->files[i]));
		snprintf(aside, sizeof(aside), "%s.aside", path);
		if (copied)
			CHECK(rename(path, aside) == 0, "move %s aside", path);
		for (hostile kind = H_FIFO; kind <= H_FIFO_LINK; kind++)
		{
			char		name[256];
			int			fd;

			snprintf(name, sizeof(name), "%s: %s as %s", tm->dir, tm->files[i],
					 hostile_names[kind]);
			current_case = name;
			alarm(CASE_SECONDS);
			fd = make_hostile(path, kind);
			m = NULL;
			CHECK(osv_model_open(tmpdir, NULL, &m, &err) == OSV_ERR_IO && m == NULL &&
				  strstr(err.message, "is not a regular file") != NULL &&
				  strstr(err.message, tm->files[i]) != NULL,
				  "%s: %s", name, err.message);
			osv_model_close(m);
			remove_hostile(path, kind, fd);
		}
		if (copied)
			CHECK(rename(aside, path) == 0, "move %s back", path);
	}

	/* the --quadtree override is opened the same way */
	snprintf(path, sizeof(path), "%s", tmp_path("override.csv"));
	for (hostile kind = H_FIFO; kind <= H_FIFO_LINK; kind++)
	{
		int			fd;

		current_case = "quadtree override";
		alarm(CASE_SECONDS);
		fd = make_hostile(path, kind);
		m = NULL;
		CHECK(osv_model_open(tmpdir, path, &m, &err) == OSV_ERR_IO && m == NULL &&
			  strstr(err.message, "quadtree file") != NULL &&
			  strstr(err.message, "is not a regular file") != NULL,
			  "%s: quadtree override as %s: %s", tm->dir, hostile_names[kind],
			  err.message);
		osv_model_close(m);
		remove_hostile(path, kind, fd);
	}

	/* and everything is back as it was */
	current_case = "model restored";
	alarm(CASE_SECONDS);
	m = NULL;
	CHECK(osv_model_open(tmpdir, NULL, &m, &err) == OSV_OK, "%s restored: %s", tm->dir,
		  err.message);
	osv_model_close(m);
	alarm(0);
	for (int i = 0; i < tm->ncopy; i++)
		unlink(tmp_path(tm->files[i]));
}

/*
 * osv_model_convert writes through dir/.NAME.tmp: a FIFO or a symbolic
 * link planted under that name is removed, never waited on or written
 * through, and the output is written all the same.
 */
static void
test_convert_outputs(void)
{
	static const char *const names[] = {"config.json", "quadtree_10_1000.csv",
	"model.safetensors"};
	osv_model  *m = NULL;
	osv_model  *back = NULL;
	osv_error	err;
	char		out[128];
	char		tmp[256];
	char		victim[256];
	struct stat sb;

	current_case = "convert";
	alarm(CASE_SECONDS);
	if (osv_model_open("test/models/tiny-gelu", NULL, &m, &err) != OSV_OK)
	{
		CHECK(false, "tiny-gelu: %s", err.message);
		return;
	}
	snprintf(out, sizeof(out), "%s/out", tmpdir);
	snprintf(victim, sizeof(victim), "%s/victim", tmpdir);
	CHECK(mkdir(out, 0700) == 0, "mkdir %s", out);
	CHECK(st_write_file(victim, "keep", 4) == 0, "write victim");
	for (int i = 0; i < 3; i++)
	{
		snprintf(tmp, sizeof(tmp), "%s/.%s.tmp", out, names[i]);
		/* a FIFO for two of them, a link to the victim for the third */
		if (i == 1)
			CHECK(symlink(victim, tmp) == 0, "symlink %s", tmp);
		else
			CHECK(mkfifo(tmp, 0600) == 0, "mkfifo %s", tmp);
	}
	CHECK(osv_model_convert(m, out, &err) == OSV_OK, "convert over planted names: %s",
		  err.message);
	CHECK(stat(victim, &sb) == 0 && sb.st_size == 4, "the link's target was not written");
	CHECK(osv_model_open(out, NULL, &back, &err) == OSV_OK, "converted model opens: %s",
		  err.message);
	osv_model_close(back);
	osv_model_close(m);
	alarm(0);
	for (int i = 0; i < 3; i++)
	{
		snprintf(tmp, sizeof(tmp), "%s/%s", out, names[i]);
		unlink(tmp);
		snprintf(tmp, sizeof(tmp), "%s/.%s.tmp", out, names[i]);
		unlink(tmp);
	}
	rmdir(out);
	unlink(victim);
}

int
main(void)
{
	signal(SIGALRM, on_alarm);
	snprintf(tmpdir, sizeof(tmpdir), "/tmp/osv5m-test-files-XXXXXX");
	if (mkdtemp(tmpdir) == NULL)
	{
		perror("mkdtemp");
		return 1;
	}
	test_read_file();
	for (size_t i = 0; i < sizeof(test_models) / sizeof(test_models[0]); i++)
		test_model_files(&test_models[i]);
	test_convert_outputs();
	if (rmdir(tmpdir) != 0)
		CHECK(false, "%s left non-empty: %s", tmpdir, strerror(errno));
	return check_summary("test_files");
}
