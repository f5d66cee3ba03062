/*
 * replay.c: a main() for the fuzz harnesses without libFuzzer, so that the
 * corpus and the saved crashers can be replayed by gcc builds under ASan,
 * UBSan or valgrind:  replay FILE|DIR...
 * Each file is read whole and passed once to LLVMFuzzerTestOneInput.
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int			LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));

static int	replayed;

/* Read path whole and run it; false when it cannot be read. */
static int
replay_file(const char *path)
{
	FILE	   *f = fopen(path, "rb");
	uint8_t    *buf;
	long		len;

	if (f == NULL || fseek(f, 0, SEEK_END) != 0 || (len = ftell(f)) < 0 ||
		fseek(f, 0, SEEK_SET) != 0)
	{
		perror(path);
		if (f)
			fclose(f);
		return 0;
	}
	/* +1: malloc(0) may return NULL; the harness never reads past len */
	buf = malloc((size_t) len + 1);
	if (buf == NULL || fread(buf, 1, (size_t) len, f) != (size_t) len)
	{
		perror(path);
		free(buf);
		fclose(f);
		return 0;
	}
	fclose(f);
	LLVMFuzzerTestOneInput(buf, (size_t) len);
	free(buf);
	replayed++;
	return 1;
}

/* Replay a file, or every regular file of a directory (not recursive). */
static int
replay_path(const char *path)
{
	struct stat st;
	DIR		   *d;
	struct dirent *e;
	char		sub[4096];
	int			ok = 1;

	if (stat(path, &st) != 0)
	{
		perror(path);
		return 0;
	}
	if (!S_ISDIR(st.st_mode))
		return replay_file(path);
	if ((d = opendir(path)) == NULL)
	{
		perror(path);
		return 0;
	}
	while ((e = readdir(d)) != NULL)
	{
		if (e->d_name[0] == '.')
			continue;
		snprintf(sub, sizeof(sub), "%s/%s", path, e->d_name);
		if (stat(sub, &st) == 0 && S_ISREG(st.st_mode))
			ok &= replay_file(sub);
	}
	closedir(d);
	return ok;
}

int
main(int argc, char **argv)
{
	int			ok = 1;

	if (LLVMFuzzerInitialize)
		LLVMFuzzerInitialize(&argc, &argv);
	for (int i = 1; i < argc; i++)
		ok &= replay_path(argv[i]);
	printf("%s: replayed %d inputs\n", argv[0], replayed);
	return ok ? 0 : 1;
}
