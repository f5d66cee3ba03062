/*
 * packcache.c: the model's linear weights packed for the kernels, in a
 * file shared by every process through the page cache.
 *
 * Why: the kernels (gemm.c) read a weight in panels of NR columns laid out
 * [k][NR].  Packed on the fly, each product first transposes its panels
 * from the weights file's mapping, which costs about a quarter of a
 * one-image inference; packed once into a file, the products read the
 * panels in place, in order.  A private copy would cost each backend
 * 1.2 GB; the file costs the page cache one copy for all of them.
 *
 * One file per precision.  The file: a 4096-byte header (magic, format
 * version, panel width, precision, the weights file's identity, the number
 * of matrices and the file's size), then the matrices in a fixed order
 * (patch embedding, then q, k, v, out, fc1, fc2 of each layer), each at a
 * 64-byte aligned offset, packed as gemm.h describes: fp32
 * [ceil(n / NR)][k][NR] floats, zero-padded; bf16 in pairs
 * (osv_gemm_pack_weight_bf16); int8 quantized, with each column's scale
 * and sum (osv_gemm_pack_weight_int8).  Its name is osv5m-pack-<first 24
 * hex digits of the SHA-256 of that header>.bin: another model, a replaced
 * or touched weights file, another panel width or precision gives another
 * name, so a stale file is never read (remove old ones by hand; the README
 * says so).
 *
 * Safety: the directory and the file must belong to this process's user
 * and be writable by no one else, and the file must be a regular file of
 * exactly the expected size with the expected header; anything else is
 * refused (a file in the way is replaced).  A new file is written under a
 * temporary name created with O_EXCL, synced, then renamed: a reader sees
 * the old name absent or a complete file, and two processes writing at
 * once each rename a complete file of the same content.  The values are
 * not checked against the weights (that is a SHA-256 of 1.3 GB, seconds
 * per backend): whoever can write the directory can change the results,
 * which is why only the server's user may.
 */
#include "internal.h"

#include "gemm.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define PACK_MAGIC "OSV5MPACK"
#define PACK_VERSION 2
#define HEADER_BYTES 4096

typedef struct pack_header
{
	char		magic[16];
	uint32_t	version;
	uint32_t	nr;
	uint32_t	matrices;
	uint32_t	precision;		/* osv_precision: float32, bf16 pairs or int8 quads */
	/* the weights file's identity */
	uint64_t	dev,
				ino,
				size;
	int64_t		mtime_sec,
				mtime_nsec,
				ctime_sec,
				ctime_nsec;
	uint64_t	file_size;		/* of the pack file */
} pack_header;

/* The matrices of the model in file order: weight, rows n, columns k. */
typedef struct pack_entry
{
	const float *w;
	int			n,
				k;
	size_t		offset;			/* bytes from the file's start */
} pack_entry;

static int
list_matrices(const osv_model *model, pack_entry *e)
{
	const osv_model_info *info = &model->info;
	int			d = info->hidden_size,
				f = info->intermediate_size;
	int			count = 0;

	e[count++] = (pack_entry) {model->patch_embedding, d, 3 * info->patch_size * info->patch_size, 0};
	for (int i = 0; i < info->num_layers; i++)
	{
		const osv_layer *l = &model->layers[i];

		e[count++] = (pack_entry) {l->q_proj_weight, d, d, 0};
		e[count++] = (pack_entry) {l->k_proj_weight, d, d, 0};
		e[count++] = (pack_entry) {l->v_proj_weight, d, d, 0};
		e[count++] = (pack_entry) {l->out_proj_weight, d, d, 0};
		e[count++] = (pack_entry) {l->fc1_weight, f, d, 0};
		e[count++] = (pack_entry) {l->fc2_weight, d, f, 0};
	}
	return count;
}

/*
 * Offsets (in bytes, 64-byte aligned) of the entries for panel width nr
 * and the precision; returns the file's size in bytes.
 */
static size_t
lay_out(pack_entry *e, int count, int nr, osv_precision precision)
{
	size_t		at = HEADER_BYTES;

	for (int i = 0; i < count; i++)
	{
		size_t		bytes = precision == OSV_PRECISION_BF16 ?
			osv_gemm_packed_weight_halves(e[i].n, e[i].k, nr) * sizeof(uint16_t) :
			precision == OSV_PRECISION_INT8 ?
			osv_gemm_packed_weight_int8_bytes(e[i].n, e[i].k, nr) :
			osv_gemm_packed_weight_floats(e[i].n, e[i].k, nr) * sizeof(float);

		e[i].offset = at;
		at += (bytes + 63) / 64 * 64;
	}
	return at;
}

/* A directory or file this process may trust: ours, and writable by no one else. */
static bool
trusted(const struct stat *st)
{
	return st->st_uid == geteuid() && (st->st_mode & (S_IWGRP | S_IWOTH)) == 0;
}

/* Map path read-only if it is the expected file; NULL (and errno-free) otherwise. */
static void *
map_existing(const char *path, const pack_header *want)
{
	int			fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
	struct stat st;
	void	   *map;

	if (fd < 0)
		return NULL;
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || !trusted(&st) ||
		(uint64_t) st.st_size != want->file_size)
	{
		close(fd);
		return NULL;
	}
	map = mmap(NULL, (size_t) st.st_size, PROT_READ, MAP_SHARED, fd, 0);
	close(fd);
	if (map == MAP_FAILED)
		return NULL;
	if (memcmp(map, want, sizeof(*want)) != 0)
	{
		munmap(map, (size_t) st.st_size);
		return NULL;
	}
	osv_map_populate(map, (size_t) st.st_size);
	return map;
}

/* Write the pack file at path through a temporary file and a rename. */
static osv_status
write_pack(const char *path, const pack_header *h, const pack_entry *e, int count,
		   osv_error *err)
{
	char		tmp[1100];
	int			fd;
	void	   *map;
	int			e_no;

	snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", path, (long) getpid());
	(void) unlink(tmp);
	fd = open(tmp, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0)
		return osv_fail(err, OSV_ERR_IO, "could not create \"%s\": %s", tmp, strerror(errno));
	if (ftruncate(fd, (off_t) h->file_size) != 0 ||
		(map = mmap(NULL, h->file_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED)
	{
		e_no = errno;
		close(fd);
		unlink(tmp);
		return osv_fail(err, OSV_ERR_IO, "could not size \"%s\": %s", tmp, strerror(e_no));
	}
	for (int i = 0; i < count; i++)
	{
		char	   *at = (char *) map + e[i].offset;

		if (h->precision == OSV_PRECISION_BF16)
			osv_gemm_pack_weight_bf16(e[i].w, e[i].n, e[i].k, (int) h->nr, (uint16_t *) at);
		else if (h->precision == OSV_PRECISION_INT8)
			osv_gemm_pack_weight_int8(e[i].w, e[i].n, e[i].k, (int) h->nr, (uint8_t *) at);
		else
			osv_gemm_pack_weight(e[i].w, e[i].n, e[i].k, (int) h->nr, (float *) at);
	}
	/* the header last: a file that has it is complete */
	memcpy(map, h, sizeof(*h));
	if (msync(map, h->file_size, MS_SYNC) != 0 || fsync(fd) != 0)
	{
		e_no = errno;
		munmap(map, h->file_size);
		close(fd);
		unlink(tmp);
		return osv_fail(err, OSV_ERR_IO, "could not write \"%s\": %s", tmp, strerror(e_no));
	}
	munmap(map, h->file_size);
	close(fd);
	if (rename(tmp, path) != 0)
	{
		e_no = errno;
		unlink(tmp);
		return osv_fail(err, OSV_ERR_IO, "could not rename \"%s\": %s", tmp, strerror(e_no));
	}
	return OSV_OK;
}

osv_status
osv_model_use_pack_cache(osv_model *model, const char *dir, osv_precision precision,
						 osv_error *err)
{
	int			count = 1 + 6 * model->info.num_layers;
	pack_entry *e;
	const void **packed;
	osv_pack_cache *pack;
	char	   *info_path;
	pack_header h;
	struct stat st;
	char		path[sizeof(model->info.pack_cache_path)];
	char		digest[65];
	void	   *map;
	osv_status	status;

	if ((int) precision < 0 || (int) precision >= OSV_NUM_PRECISIONS)
		return osv_fail(err, OSV_ERR_ARGUMENT, "unknown precision %d", (int) precision);
	pack = &model->packs[precision];
	info_path = precision == OSV_PRECISION_BF16 ? model->info.pack_cache_path_bf16 :
		precision == OSV_PRECISION_INT8 ? model->info.pack_cache_path_int8 :
		model->info.pack_cache_path;
	if (pack->matrices != NULL)
		return OSV_OK;
	if (dir == NULL || dir[0] != '/')
		return osv_fail(err, OSV_ERR_ARGUMENT, "the pack cache directory must be an absolute path");
	if (strlen(dir) > sizeof(path) - 64)
		return osv_fail(err, OSV_ERR_ARGUMENT, "the pack cache directory's path is too long");
	if (stat(dir, &st) != 0)
		return osv_fail(err, OSV_ERR_IO, "pack cache directory \"%s\": %s", dir, strerror(errno));
	if (!S_ISDIR(st.st_mode) || !trusted(&st))
		return osv_fail(err, OSV_ERR_ARGUMENT,
						"pack cache directory \"%s\" must be a directory owned by the server's user and writable by no one else",
						dir);

	memset(&h, 0, sizeof(h));
	memcpy(h.magic, PACK_MAGIC, sizeof(PACK_MAGIC));
	h.version = PACK_VERSION;
	h.nr = (uint32_t) osv_gemm_nr();
	h.matrices = (uint32_t) count;
	h.precision = (uint32_t) precision;
	if (stat(model->info.weights_path, &st) != 0)
		return osv_fail(err, OSV_ERR_IO, "\"%s\": %s", model->info.weights_path, strerror(errno));
	h.dev = st.st_dev;
	h.ino = st.st_ino;
	h.size = (uint64_t) st.st_size;
	h.mtime_sec = st.st_mtim.tv_sec;
	h.mtime_nsec = st.st_mtim.tv_nsec;
	h.ctime_sec = st.st_ctim.tv_sec;
	h.ctime_nsec = st.st_ctim.tv_nsec;

	e = calloc((size_t) count, sizeof(*e));
	packed = calloc((size_t) count, sizeof(*packed));
	if (e == NULL || packed == NULL)
	{
		free(e);
		free(packed);
		return osv_fail(err, OSV_ERR_NOMEM, "out of memory for the pack cache's table");
	}
	list_matrices(model, e);
	h.file_size = lay_out(e, count, (int) h.nr, precision);
	osv_sha256_hex((const uint8_t *) &h, sizeof(h), digest);
	snprintf(path, sizeof(path), "%s/osv5m-pack-%.24s.bin", dir, digest);

	map = map_existing(path, &h);
	if (map == NULL)
	{
		status = write_pack(path, &h, e, count, err);
		if (status == OSV_OK && (map = map_existing(path, &h)) == NULL)
			status = osv_fail(err, OSV_ERR_IO, "pack cache file \"%s\" is not what was written", path);
		if (status != OSV_OK)
		{
			free(e);
			free(packed);
			return status;
		}
	}
	for (int i = 0; i < count; i++)
		packed[i] = (const char *) map + e[i].offset;
	free(e);
	pack->matrices = packed;
	pack->map = map;
	pack->size = h.file_size;
	pack->nr = (int) h.nr;
	snprintf(info_path, sizeof(model->info.pack_cache_path), "%s", path);
	return OSV_OK;
}

/* Unmap the pack caches of a model being closed. */
void
osv_model_drop_pack_cache(osv_model *model)
{
	for (int p = 0; p < OSV_NUM_PRECISIONS; p++)
	{
		osv_pack_cache *pack = &model->packs[p];

		if (pack->map != NULL)
			munmap(pack->map, pack->size);
		free(pack->matrices);
		memset(pack, 0, sizeof(*pack));
	}
}
