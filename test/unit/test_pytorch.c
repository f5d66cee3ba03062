/*
 * test_pytorch.c: the PyTorch checkpoint reader (zip.c, pytorch.c), the
 * published layout of osv5m/baseline (pytorch_model.bin + the nested
 * config.json, no CSV), osv5m convert and the weights fingerprint.
 *
 * Archives and pickles are built here byte by byte (a stored-entry zip
 * writer with 64-byte aligned data as torch.save writes, optionally ZIP64;
 * the pickle opcodes of a state dict), so that every malformed case is
 * exactly the fault it names: each must give OSV_ERR_MODEL with a message
 * containing the expected words, never a crash (this file also runs under
 * ASan + UBSan in make check-asan).  The real files come from
 * test/models/<name>-pt, written by torch.save (test/reference/make_models.py).
 * Run from the repository root.
 */
#include "internal.h"

#include "check.h"
#include "st_writer.h"

#include <dirent.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- a byte buffer ----------------------------------------------------- */

typedef struct buf
{
	uint8_t    *p;
	size_t		len,
				cap;
} buf;

static void
put(buf *b, const void *data, size_t n)
{
	if (b->len + n > b->cap)
	{
		b->cap = (b->len + n) * 2 + 64;
		b->p = realloc(b->p, b->cap);
	}
	memcpy(b->p + b->len, data, n);
	b->len += n;
}

static void
put8(buf *b, unsigned v)
{
	uint8_t		c = (uint8_t) v;

	put(b, &c, 1);
}

static void
putle(buf *b, uint64_t v, int n)
{
	for (int i = 0; i < n; i++)
		put8(b, (unsigned) (v >> (8 * i)) & 0xff);
}

static void
puts_(buf *b, const char *s)
{
	put(b, s, strlen(s));
}

/* ---- zip writer -------------------------------------------------------- */

typedef struct zentry
{
	const char *name;
	const void *data;
	size_t		len;
	unsigned	method;			/* 0 stored */
	unsigned	flags;
} zentry;

/* Write entries as torch.save does (data 64-byte aligned); zip64 forces ZIP64 records. */
static buf
zip_build(const zentry *e, int n, bool zip64)
{
	buf			z = {0},
				cd = {0};
	uint64_t	offsets[64];

	for (int i = 0; i < n; i++)
	{
		size_t		nl = strlen(e[i].name);
		size_t		pad;

		offsets[i] = z.len;
		putle(&z, 0x04034b50, 4);
		putle(&z, 20, 2);
		putle(&z, e[i].flags, 2);
		putle(&z, e[i].method, 2);
		putle(&z, 0, 4);		/* time, date */
		putle(&z, 0, 4);		/* crc: not checked */
		putle(&z, e[i].len, 4);
		putle(&z, e[i].len, 4);
		putle(&z, nl, 2);
		pad = (64 - (z.len + 2 + nl + 4) % 64) % 64;
		putle(&z, 4 + pad, 2);
		puts_(&z, e[i].name);
		putle(&z, 0x4246, 2);	/* "FB" padding field */
		putle(&z, pad, 2);
		for (size_t k = 0; k < pad; k++)
			put8(&z, 'Z');
		put(&z, e[i].data, e[i].len);
	}
	for (int i = 0; i < n; i++)
	{
		size_t		nl = strlen(e[i].name);

		putle(&cd, 0x02014b50, 4);
		putle(&cd, 45, 2);
		putle(&cd, 45, 2);
		putle(&cd, e[i].flags, 2);
		putle(&cd, e[i].method, 2);
		putle(&cd, 0, 4);
		putle(&cd, 0, 4);
		putle(&cd, zip64 ? 0xffffffffu : e[i].len, 4);
		putle(&cd, zip64 ? 0xffffffffu : e[i].len, 4);
		putle(&cd, nl, 2);
		putle(&cd, zip64 ? 28 : 0, 2);
		putle(&cd, 0, 2);		/* comment */
		putle(&cd, 0, 2);		/* disk */
		putle(&cd, 0, 2);
		putle(&cd, 0, 4);
		putle(&cd, zip64 ? 0xffffffffu : offsets[i], 4);
		puts_(&cd, e[i].name);
		if (zip64)
		{
			putle(&cd, 0x0001, 2);
			putle(&cd, 24, 2);
			putle(&cd, e[i].len, 8);
			putle(&cd, e[i].len, 8);
			putle(&cd, offsets[i], 8);
		}
	}
	{
		uint64_t	cd_offset = z.len;

		put(&z, cd.p, cd.len);
		if (zip64)
		{
			uint64_t	z64 = z.len;

			putle(&z, 0x06064b50, 4);
			putle(&z, 44, 8);
			putle(&z, 45, 2);
			putle(&z, 45, 2);
			putle(&z, 0, 4);
			putle(&z, 0, 4);
			putle(&z, (uint64_t) n, 8);
			putle(&z, (uint64_t) n, 8);
			putle(&z, cd.len, 8);
			putle(&z, cd_offset, 8);
			putle(&z, 0x07064b50, 4);
			putle(&z, 0, 4);
			putle(&z, z64, 8);
			putle(&z, 1, 4);
		}
		putle(&z, 0x06054b50, 4);
		putle(&z, 0, 2);
		putle(&z, 0, 2);
		putle(&z, zip64 ? 0xffff : (unsigned) n, 2);
		putle(&z, zip64 ? 0xffff : (unsigned) n, 2);
		putle(&z, zip64 ? 0xffffffffu : cd.len, 4);
		putle(&z, zip64 ? 0xffffffffu : cd_offset, 4);
		putle(&z, 0, 2);
	}
	free(cd.p);
	return z;
}

/* ---- pickle writer ------------------------------------------------------- */

static void
p_str(buf *b, const char *s)
{
	put8(b, 'X');
	putle(b, strlen(s), 4);
	puts_(b, s);
}

static void
p_int(buf *b, int64_t v)
{
	if (v >= 0 && v < 256)
	{
		put8(b, 'K');
		put8(b, (unsigned) v);
	}
	else
	{
		put8(b, 0x8a);
		put8(b, 8);
		putle(b, (uint64_t) v, 8);
	}
}

static void
p_global(buf *b, const char *module, const char *name)
{
	put8(b, 'c');
	puts_(b, module);
	put8(b, '\n');
	puts_(b, name);
	put8(b, '\n');
}

/* One state dict entry: name -> _rebuild_tensor_v2(storage, ...). */
typedef struct ptensor
{
	const char *name;
	const char *storage_class;	/* "FloatStorage", ... */
	const char *key;
	int64_t		numel;
	int64_t		offset;
	int			ndim;
	int64_t		size[4];
	int64_t		stride[4];
} ptensor;

static void
p_tensor(buf *b, const ptensor *t)
{
	p_str(b, t->name);
	p_global(b, "torch._utils", "_rebuild_tensor_v2");
	put8(b, '(');
	put8(b, '(');
	p_str(b, "storage");
	p_global(b, "torch", t->storage_class);
	p_str(b, t->key);
	p_str(b, "cpu");
	p_int(b, t->numel);
	put8(b, 't');
	put8(b, 'Q');
	p_int(b, t->offset);
	put8(b, '(');
	for (int i = 0; i < t->ndim; i++)
		p_int(b, t->size[i]);
	put8(b, 't');
	put8(b, '(');
	for (int i = 0; i < t->ndim; i++)
		p_int(b, t->stride[i]);
	put8(b, 't');
	put8(b, 0x89);
	p_global(b, "collections", "OrderedDict");
	put8(b, ')');
	put8(b, 'R');
	put8(b, 't');
	put8(b, 'R');
}

/* PROTO 2, OrderedDict(), SETITEMS of the tensors, STOP. */
static buf
p_state_dict(const ptensor *t, int n)
{
	buf			b = {0};

	put8(&b, 0x80);
	put8(&b, 2);
	p_global(&b, "collections", "OrderedDict");
	put8(&b, 'q');
	put8(&b, 0);
	put8(&b, ')');
	put8(&b, 'R');
	put8(&b, '(');
	for (int i = 0; i < n; i++)
		p_tensor(&b, &t[i]);
	put8(&b, 'u');
	put8(&b, '.');
	return b;
}

/* ---- helpers --------------------------------------------------------------- */

/* A checkpoint of data.pkl pkl plus storages "0" (24 floats) and "1" (3 doubles). */
static buf
checkpoint(const buf *pkl, const char *byteorder, bool zip64)
{
	static float f[24];
	static double d[3] = {1.5, -2.25, 3.0};
	zentry		e[5];
	int			n = 0;

	for (int i = 0; i < 24; i++)
		f[i] = (float) i;
	e[n++] = (zentry) {"archive/data.pkl", pkl->p, pkl->len, 0, 0};
	e[n++] = (zentry) {"archive/data/0", f, sizeof(f), 0, 0};
	e[n++] = (zentry) {"archive/data/1", d, sizeof(d), 0, 0};
	if (byteorder)
		e[n++] = (zentry) {"archive/byteorder", byteorder, strlen(byteorder), 0, 0};
	e[n++] = (zentry) {"archive/version", "3\n", 2, 0, 0};
	return zip_build(e, n, zip64);
}

/* Parse and expect failure with msg in the message (NULL: expect success). */
static void
expect(int line, const buf *b, const char *msg)
{
	osv_pytorch pt;
	osv_error	err;
	osv_status	st;

	memset(&err, 0, sizeof(err));
	st = osv_pytorch_parse(b->p, b->len, &pt, &err);
	if (msg == NULL)
	{
		CHECK(st == OSV_OK, "line %d: %s", line, err.message);
		if (st == OSV_OK)
			osv_pytorch_close(&pt);
		return;
	}
	CHECK(st == OSV_ERR_MODEL && err.status == st && strstr(err.message, msg) != NULL,
		  "line %d: status %d, message \"%s\", expected \"%s\"", line, st, err.message, msg);
}

static const ptensor base_tensor = {"a", "FloatStorage", "0", 24, 0, 2, {4, 6}, {6, 1}};

/* data.pkl with one tensor t (plus the base one) */
static void
expect_tensor(int line, ptensor t, const char *msg)
{
	ptensor		ts[2] = {base_tensor, t};
	buf			pkl = p_state_dict(ts, 2);
	buf			z = checkpoint(&pkl, "little", false);

	expect(line, &z, msg);
	free(pkl.p);
	free(z.p);
}

/* data.pkl given as raw opcodes */
static void
expect_pickle(int line, const uint8_t *ops, size_t n, const char *msg)
{
	buf			pkl = {0};
	buf			z;

	put(&pkl, ops, n);
	z = checkpoint(&pkl, NULL, false);
	expect(line, &z, msg);
	free(pkl.p);
	free(z.p);
}

static uint8_t *
slurp(const char *path, size_t *size)
{
	FILE	   *f = fopen(path, "rb");
	uint8_t    *p;
	long		n;

	if (f == NULL)
		return NULL;
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	fseek(f, 0, SEEK_SET);
	p = malloc((size_t) n + 1);
	if (fread(p, 1, (size_t) n, f) != (size_t) n)
		n = 0;
	fclose(f);
	*size = (size_t) n;
	return p;
}

static char tmpdir[64];

static const char *
tmp(const char *name)
{
	static char path[4][256];
	static int	which;

	which = (which + 1) % 4;
	snprintf(path[which], sizeof(path[which]), "%s/%s", tmpdir, name);
	return path[which];
}

static void
copy_file(const char *from, const char *to)
{
	size_t		n;
	uint8_t    *p = slurp(from, &n);

	CHECK(p != NULL && st_write_file(to, p, n) == 0, "copy %s", from);
	free(p);
}

static void
clear_tmp(void)
{
	DIR		   *d = opendir(tmpdir);
	struct dirent *e;

	while (d != NULL && (e = readdir(d)) != NULL)
		if (e->d_name[0] != '.' || strlen(e->d_name) > 2)
			if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
				unlink(tmp(e->d_name));
	if (d)
		closedir(d);
}

/* ---- the tests --------------------------------------------------------------- */

/* A valid checkpoint: dtypes, shared storages, strided views, ZIP64. */
static void
test_valid(void)
{
	ptensor		ts[] = {
		base_tensor,
		{"alias.a", "FloatStorage", "0", 24, 0, 2, {4, 6}, {6, 1}},
		/* the transpose of a: a view with strides (1, 6) */
		{"a_t", "FloatStorage", "0", 24, 0, 2, {6, 4}, {1, 6}},
		{"row2", "FloatStorage", "0", 24, 12, 1, {6}, {1}},
		{"d", "DoubleStorage", "1", 3, 0, 1, {3}, {1}},
		{"scalar", "DoubleStorage", "1", 3, 2, 0, {0}, {0}},
		{"empty", "FloatStorage", "0", 24, 0, 2, {0, 5}, {5, 1}},
	};
	buf			pkl = p_state_dict(ts, 7);

	for (int z64 = 0; z64 < 2; z64++)
	{
		buf			z = checkpoint(&pkl, "little", z64);
		osv_pytorch pt;
		osv_error	err;

		CHECK(osv_pytorch_parse(z.p, z.len, &pt, &err) == OSV_OK, "valid (zip64 %d): %s",
			  z64, err.message);
		if (pt.num_tensors == 7)
		{
			const osv_tensor *a = osv_tensor_find(pt.tensors, 7, "a");
			const osv_tensor *al = osv_tensor_find(pt.tensors, 7, "alias.a");
			const osv_tensor *at = osv_tensor_find(pt.tensors, 7, "a_t");
			const osv_tensor *r2 = osv_tensor_find(pt.tensors, 7, "row2");
			const osv_tensor *d = osv_tensor_find(pt.tensors, 7, "d");
			const osv_tensor *s = osv_tensor_find(pt.tensors, 7, "scalar");
			float		out[24];

			CHECK(a && al && at && r2 && d && s, "all found");
			if (a && al && at && r2 && d && s)
			{
				CHECK(a->data == al->data && a->dtype == OSV_DTYPE_F32 && a->contiguous,
					  "shared storage");
				CHECK(((uintptr_t) a->data - (uintptr_t) z.p) % 64 == 0, "64-byte aligned");
				CHECK(!at->contiguous && at->num_elements == 24, "transposed view");
				osv_tensor_to_f32(at, out);
				CHECK(out[0] == 0 && out[1] == 6 && out[4] == 1 && out[23] == 23,
					  "gathered transpose %g %g %g %g", out[0], out[1], out[4], out[23]);
				CHECK(r2->contiguous && osv_tensor_get(r2, 0) == 12.0, "offset view");
				CHECK(d->dtype == OSV_DTYPE_F64 && osv_tensor_get(d, 1) == -2.25, "F64");
				CHECK(s->ndim == 0 && s->num_elements == 1 && osv_tensor_get(s, 0) == 3.0,
					  "0-d tensor");
			}
			osv_pytorch_close(&pt);
		}
		else
			CHECK(false, "7 tensors, got %d", pt.num_tensors);
		free(z.p);
	}
	free(pkl.p);
}

/* Faults of the zip container. */
static void
test_zip_faults(void)
{
	ptensor		ts[] = {base_tensor};
	buf			pkl = p_state_dict(ts, 1);
	buf			good = checkpoint(&pkl, "little", false);
	buf			b;
	float		f[24] = {0};

	expect(__LINE__, &good, NULL);

	/* truncated at every byte of the tail and at many points before */
	for (size_t cut = 0; cut < good.len; cut += (cut + 200 > good.len ? 1 : 7))
	{
		buf			t = {good.p, cut, cut};
		osv_pytorch pt;
		osv_error	err;
		osv_status	st = osv_pytorch_parse(good.p, cut, &pt, &err);

		(void) t;
		CHECK(st == OSV_ERR_MODEL && err.message[0] != '\0',
			  "truncated at %zu: status %d", cut, st);
	}

	/* a bad central directory: its first signature broken */
	b = (buf) {malloc(good.len), good.len, good.len};
	memcpy(b.p, good.p, good.len);
	for (size_t i = good.len - 22; i-- > 0;)
		if (memcmp(b.p + i, "PK\001\002", 4) == 0)
		{
			/* the first central header is the lowest one; keep searching down */
			size_t		j = i;

			while (j >= 4 && memcmp(b.p + j - 4, "PK\001\002", 4) != 0 && j > i - 200)
				j--;
			b.p[i + 2] = 9;
			break;
		}
	expect(__LINE__, &b, "bad central directory header");
	free(b.p);

	/* the end record's directory offset past the end */
	b = (buf) {malloc(good.len), good.len, good.len};
	memcpy(b.p, good.p, good.len);
	b.p[good.len - 6] = 0xff;
	b.p[good.len - 5] = 0xff;
	expect(__LINE__, &b, "central directory");
	/* an entry count the directory cannot hold */
	memcpy(b.p, good.p, good.len);
	b.p[good.len - 12] = 0xff;
	b.p[good.len - 11] = 0x7f;
	b.p[good.len - 14] = 0xff;
	b.p[good.len - 13] = 0x7f;
	expect(__LINE__, &b, "cannot fit");
	free(b.p);

	/* compressed, encrypted, duplicate, overlapping, no data.pkl */
	{
		zentry		e[3] = {
			{"archive/data.pkl", pkl.p, pkl.len, 0, 0},
			{"archive/data/0", f, sizeof(f), 8, 0},
		};

		b = zip_build(e, 2, false);
		expect(__LINE__, &b, "is compressed (method 8)");
		free(b.p);
		e[1].method = 0;
		e[1].flags = 1;
		b = zip_build(e, 2, false);
		expect(__LINE__, &b, "is encrypted");
		free(b.p);
		e[1].flags = 0;
		e[1].name = "archive/data.pkl";
		b = zip_build(e, 2, false);
		expect(__LINE__, &b, "appears twice");
		free(b.p);
		e[0].name = "archive/other.pkl";
		e[1].name = "archive/data/0";
		b = zip_build(e, 2, false);
		expect(__LINE__, &b, "no <folder>/data.pkl");
		free(b.p);
		e[0].name = "archive/data.pkl";
		e[2] = (zentry) {"other/data.pkl", pkl.p, pkl.len, 0, 0};
		b = zip_build(e, 3, false);
		expect(__LINE__, &b, "more than one data.pkl");
		free(b.p);

		/* entry 0's size grown in both headers: its data runs into entry 1 */
		b = zip_build(e, 2, false);
		{
			uint32_t	grown = (uint32_t) pkl.len + 40;

			/* local header: sizes at 18 and 22 */
			memcpy(b.p + 18, &grown, 4);
			memcpy(b.p + 22, &grown, 4);
			for (size_t i = 0; i + 4 <= b.len; i++)
				if (memcmp(b.p + i, "PK\001\002", 4) == 0)
				{
					memcpy(b.p + i + 20, &grown, 4);
					memcpy(b.p + i + 24, &grown, 4);
					break;
				}
		}
		expect(__LINE__, &b, "overlap");
		free(b.p);
	}

	/* a local header offset out of range */
	b = (buf) {malloc(good.len), good.len, good.len};
	memcpy(b.p, good.p, good.len);
	for (size_t i = 0; i + 4 <= b.len; i++)
		if (memcmp(b.p + i, "PK\001\002", 4) == 0)
		{
			b.p[i + 45] = 0x7f;
			break;
		}
	expect(__LINE__, &b, "out of range");
	free(b.p);

	/* not a zip at all, gzip, legacy */
	{
		static const uint8_t legacy[] = {0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46,
		0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e};
		static const uint8_t gz[] = {0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3, 4,
		5, 6, 7, 8, 9, 10, 11, 12, 13};
		static const char text[] = "this is plain text, not a checkpoint at all";

		b = (buf) {(uint8_t *) legacy, sizeof(legacy), 0};
		expect(__LINE__, &b, "legacy format of torch before 1.6");
		b = (buf) {(uint8_t *) gz, sizeof(gz), 0};
		expect(__LINE__, &b, "gzip");
		b = (buf) {(uint8_t *) text, sizeof(text), 0};
		expect(__LINE__, &b, "does not start like a zip");
		b = (buf) {(uint8_t *) text, 0, 0};
		expect(__LINE__, &b, "does not start like a zip");
	}

	/* byteorder */
	b = checkpoint(&pkl, "big", false);
	expect(__LINE__, &b, "big-endian machine");
	free(b.p);
	b = checkpoint(&pkl, "middle", false);
	expect(__LINE__, &b, "neither little nor big");
	free(b.p);
	b = checkpoint(&pkl, NULL, false);
	expect(__LINE__, &b, NULL);
	free(b.p);

	free(good.p);
	free(pkl.p);
}

/* Faults of tensors and storages. */
static void
test_tensor_faults(void)
{
	/* storage shorter than its tensor, in elements and in bytes */
	expect_tensor(__LINE__, (ptensor) {"b", "FloatStorage", "0", 24, 20, 1, {10}, {1}},
				  "reaches element 29 of a storage of 24");
	expect_tensor(__LINE__, (ptensor) {"b", "FloatStorage", "0", 100, 0, 1, {10}, {1}},
				  "holds 96 bytes");
	expect_tensor(__LINE__, (ptensor) {"b", "DoubleStorage", "1", 3, 0, 1, {4}, {1}},
				  "reaches element 3");
	/* strides reaching out of the storage */
	expect_tensor(__LINE__, (ptensor) {"b", "FloatStorage", "0", 24, 0, 2, {4, 6}, {6, 2}},
				  "reaches element 28");
	expect_tensor(__LINE__, (ptensor) {"b", "FloatStorage", "0", 24, 0, 2,
	{2, 2}, {INT64_MAX / 2, 1}}, "reaches element");
	expect_tensor(__LINE__, (ptensor) {"b", "FloatStorage", "0", 24, 0, 2,
	{1 << 20, 1 << 20}, {1, 0}}, "reaches element");
	expect_tensor(__LINE__, (ptensor) {"b", "FloatStorage", "0", 24, 0, 3,
	{INT64_MAX, INT64_MAX, 4}, {0, 0, 0}}, "overflows");
	/* negative numbers */
	expect_tensor(__LINE__, (ptensor) {"b", "FloatStorage", "0", 24, -1, 1, {2}, {1}},
				  "negative storage offset");
	expect_tensor(__LINE__, (ptensor) {"b", "FloatStorage", "0", 24, 0, 1, {-2}, {1}},
				  "negative entry");
	expect_tensor(__LINE__, (ptensor) {"b", "FloatStorage", "0", -5, 0, 1, {2}, {1}},
				  "storage numel -5 is out of range");
	/* a storage with no entry, a storage class that is not allowed */
	expect_tensor(__LINE__, (ptensor) {"b", "FloatStorage", "7", 24, 0, 1, {2}, {1}},
				  "\"archive/data/7\" has no entry");
	expect_tensor(__LINE__, (ptensor) {"b", "ComplexFloatStorage", "0", 2, 0, 1, {2}, {1}},
				  "\"torch.ComplexFloatStorage\", which is not allowed");
	/* a name twice */
	expect_tensor(__LINE__, base_tensor, "tensor a appears twice");
	/* more dimensions than the core holds */
	expect_tensor(__LINE__, (ptensor) {"b", "FloatStorage", "0", 24, 0, 4, {1, 1, 1, 1},
	{1, 1, 1, 1}}, NULL);
}

/* Faults of the pickle itself. */
static void
test_pickle_faults(void)
{
#define OPS(...) ((const uint8_t[]) {__VA_ARGS__}), sizeof((const uint8_t[]) {__VA_ARGS__})
	uint8_t    *deep;
	size_t		n;

	/* forbidden globals, by GLOBAL and by STACK_GLOBAL, refused by name */
	expect_pickle(__LINE__, OPS(0x80, 2, 'c', 'o', 's', '\n', 's', 'y', 's', 't', 'e', 'm',
								'\n', 'X', 2, 0, 0, 0, 'l', 's', 0x85, 'R', '.'),
				  "names \"os.system\", which is not allowed");
	expect_pickle(__LINE__, OPS(0x80, 4, 0x8c, 8, 'b', 'u', 'i', 'l', 't', 'i', 'n', 's',
								0x8c, 4, 'e', 'v', 'a', 'l', 0x93, '.'),
				  "names \"builtins.eval\"");
	expect_pickle(__LINE__, OPS(0x80, 2, 'c', 's', 'u', 'b', 'p', 'r', 'o', 'c', 'e', 's',
								's', '\n', 'P', 'o', 'p', 'e', 'n', '\n', '.'),
				  "\"subprocess.Popen\"");
	expect_pickle(__LINE__, OPS(0x80, 2, 'c', 'x', '\n', 'y'), "unterminated");
	/* opcodes a state dict never needs */
	expect_pickle(__LINE__, OPS(0x80, 2, 'i', 'o', 's', '\n', 's', '\n', '.'),
				  "opcode 0x69 is not allowed");
	expect_pickle(__LINE__, OPS(0x80, 2, 0x81, '.'), "opcode 0x81 is not allowed");
	expect_pickle(__LINE__, OPS(0x80, 9, '.'), "protocol 9");
	/* memo out of range */
	expect_pickle(__LINE__, OPS(0x80, 2, 'h', 7, '.'), "memo index 7 was never stored");
	expect_pickle(__LINE__, OPS(0x80, 2, 'j', 0xff, 0xff, 0xff, 0x7f, '.'),
				  "memo index 2147483647 was never stored");
	expect_pickle(__LINE__, OPS(0x80, 2, '}', 'r', 0xff, 0xff, 0xff, 0xff, '.'),
				  "exceeds the limit");
	expect_pickle(__LINE__, OPS(0x80, 2, 'q', 0, '.'), "memo put with an empty stack");
	/* stack and marks */
	expect_pickle(__LINE__, OPS(0x80, 2, '0', '.'), "stack underflow");
	expect_pickle(__LINE__, OPS(0x80, 2, 't', '.'), "no MARK");
	expect_pickle(__LINE__, OPS(0x80, 2, '}', '}', '.'), "STOP with 2 values");
	expect_pickle(__LINE__, OPS(0x80, 2, ']', '.'), "holds a list, not a state dict");
	expect_pickle(__LINE__, OPS(0x80, 2, '}', '.'), "holds no tensors");
	expect_pickle(__LINE__, OPS(0x80, 2, ']', 'K', 1, 'K', 2, 's', '.'), "SETITEM(S) on a list");
	expect_pickle(__LINE__, OPS(0x80, 2, 'K', 1, 'K', 2, 'R', '.'), "REDUCE on a int");
	expect_pickle(__LINE__, OPS(0x80, 2, 'K', 1, 'Q', '.'), "persistent id is not");
	expect_pickle(__LINE__, OPS(0x80, 2, 'K', 1, ')', 'b', '.'),
				  "BUILD is only allowed on an OrderedDict");
	expect_pickle(__LINE__, OPS(0x80, 2, 'c', 't', 'o', 'r', 'c', 'h', '\n', 'F', 'l', 'o',
								'a', 't', 'S', 't', 'o', 'r', 'a', 'g', 'e', '\n', ')', 'R',
								'.'), "only allowed in a persistent id");
	expect_pickle(__LINE__, OPS(0x80, 2, 'c', 't', 'o', 'r', 'c', 'h', '.', '_', 'u', 't',
								'i', 'l', 's', '\n', '_', 'r', 'e', 'b', 'u', 'i', 'l', 'd',
								'_', 't', 'e', 'n', 's', 'o', 'r', '_', 'v', '2', '\n', 'K',
								1, 'K', 2, 0x86, 'R', '.'), "called with 2 arguments");
	/* truncations of the pickle: strings, ints, no STOP */
	expect_pickle(__LINE__, OPS(0x80, 2, 'X', 0xff, 0xff, 0xff, 0x0f, 'a'), "runs past the end");
	expect_pickle(__LINE__, OPS(0x80, 2, 'J', 1), "truncated");
	expect_pickle(__LINE__, OPS(0x80, 2, '}'), "no STOP opcode");
	expect_pickle(__LINE__, OPS(0x80, 2, 0x8a, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9, '.'),
				  "integer of 9 bytes");
	expect_pickle(__LINE__, OPS(0), "opcode 0x00");
#undef OPS

	/* deeply nested: marks, stack, and lists nested 50 000 deep */
	n = 3000;
	deep = malloc(n + 3);
	deep[0] = 0x80;
	deep[1] = 2;
	memset(deep + 2, '(', n);
	deep[n + 2] = '.';
	expect_pickle(__LINE__, deep, n + 3, "nested MARKs");
	free(deep);
	n = 200000;
	deep = malloc(n + 3);
	deep[0] = 0x80;
	deep[1] = 2;
	memset(deep + 2, ']', n);
	deep[n + 2] = '.';
	expect_pickle(__LINE__, deep, n + 3, "stack deeper than");
	free(deep);
	n = 50000;
	deep = malloc(2 * n + 3);
	deep[0] = 0x80;
	deep[1] = 2;
	memset(deep + 2, ']', n);
	memset(deep + 2 + n, 'a', n - 1);
	deep[2 * n + 1] = '.';
	expect_pickle(__LINE__, deep, 2 * n + 2, "holds a list, not a state dict");
	free(deep);
}

/* The real files: every -pt model, truncated at many points too. */
static void
test_real_files(void)
{
	static const char *const names[] = {"tiny-gelu-pt", "tiny-quickgelu-pt", "tiny-bf16-pt",
	"tiny-f16-pt"};

	for (size_t m = 0; m < sizeof(names) / sizeof(names[0]); m++)
	{
		char		path[256];
		size_t		size;
		uint8_t    *p;
		osv_pytorch pt;
		osv_error	err;
		osv_status	st;

		snprintf(path, sizeof(path), "test/models/%s/pytorch_model.bin", names[m]);
		p = slurp(path, &size);
		CHECK(p != NULL, "read %s", path);
		if (p == NULL)
			continue;
		st = osv_pytorch_parse(p, size, &pt, &err);
		CHECK(st == OSV_OK, "%s: %s", path, err.message);
		if (st == OSV_OK)
		{
			const osv_tensor *a = osv_tensor_find(pt.tensors, pt.num_tensors,
												  "model.mid.classif.7.weight");
			const osv_tensor *b = osv_tensor_find(pt.tensors, pt.num_tensors,
												  "mid.classif.7.weight");
			const osv_tensor *ids = osv_tensor_find(pt.tensors, pt.num_tensors,
													"backbone.clip.vision_model.embeddings.position_ids");
			const osv_tensor *cc = osv_tensor_find(pt.tensors, pt.num_tensors,
												   "model.head.cell_center");

			CHECK(a && b && a->data == b->data, "%s: aliases share storage", names[m]);
			CHECK(ids && ids->dtype == OSV_DTYPE_I64, "%s: position_ids I64", names[m]);
			CHECK(cc && cc->dtype == OSV_DTYPE_F64 && cc->ndim == 2, "%s: F64 cells", names[m]);
			for (int i = 0; i < pt.num_tensors; i++)
				CHECK(((uintptr_t) pt.tensors[i].data - (uintptr_t) p) % 64 == 0 ||
					  pt.tensors[i].nbytes == 0 ||
					  strstr(pt.tensors[i].name, "row") != NULL,
					  "%s: %s aligned", names[m], pt.tensors[i].name);
			osv_pytorch_close(&pt);
		}
		/* truncated: every cut fails cleanly */
		for (size_t cut = 0; cut < size; cut += (size - cut < 4096 ? 13 : 997))
		{
			st = osv_pytorch_parse(p, cut, &pt, &err);
			CHECK(st == OSV_ERR_MODEL && err.message[0], "%s cut at %zu", names[m], cut);
		}
		/* one flipped byte at many places: an error or a table, never a crash */
		for (size_t at = 0; at < size; at += 389)
		{
			uint8_t		old = p[at];

			p[at] ^= 0x5a;
			if (osv_pytorch_parse(p, size, &pt, &err) == OSV_OK)
				osv_pytorch_close(&pt);
			else
				CHECK(err.message[0] != '\0', "flip at %zu has a message", at);
			p[at] = old;
		}
		free(p);
	}
}

/* Run one image through two models: bitwise the same outputs? */
static bool
same_predictions(osv_model *a, osv_model *b, const char *image)
{
	osv_context *ca = NULL,
			   *cb = NULL;
	osv_error	err;
	size_t		size;
	uint8_t    *bytes = slurp(image, &size);
	bool		same = false;

	if (bytes && osv_context_new(a, &ca, &err) == OSV_OK &&
		osv_context_new(b, &cb, &err) == OSV_OK &&
		osv_run_image(ca, bytes, size, NULL, &err) == OSV_OK &&
		osv_run_image(cb, bytes, size, NULL, &err) == OSV_OK)
	{
		const osv_model_info *ia = osv_model_get_info(a);
		osv_prediction pa[5],
					pb[5];
		int			na = osv_context_topk(ca, 5, pa),
					nb = osv_context_topk(cb, 5, pb);

		same = ia->num_cells == osv_model_get_info(b)->num_cells && na == nb &&
			memcmp(osv_context_feature(ca), osv_context_feature(cb),
				   sizeof(float) * ia->hidden_size) == 0 &&
			memcmp(osv_context_logits(ca), osv_context_logits(cb),
				   sizeof(float) * ia->num_cells) == 0 &&
			memcmp(osv_context_regression(ca), osv_context_regression(cb),
				   sizeof(float) * 2 * ia->num_cells) == 0 &&
			true;
		/* field by field: the struct has padding */
		for (int i = 0; same && i < na; i++)
			same = pa[i].cell == pb[i].cell && pa[i].probability == pb[i].probability &&
				memcmp(&pa[i].lat, &pb[i].lat, sizeof(double)) == 0 &&
				memcmp(&pa[i].lon, &pb[i].lon, sizeof(double)) == 0;
	}
	osv_context_free(ca);
	osv_context_free(cb);
	free(bytes);
	return same;
}

/* The published layout as a model directory, CSV cross-check, convert. */
static void
test_model_dirs(void)
{
	static const char *const models[] = {"tiny-gelu", "tiny-gelu-pt", "tiny-quickgelu",
		"tiny-quickgelu-pt", "tiny-bf16", "tiny-bf16-pt", "tiny-f16", "tiny-f16-pt"};
	static const char *const images[] = {"test/data/images/jpeg_420_640x480.jpg",
		"test/data/images/png_rgba8_211x317.png",
	"test/data/images/jpeg_tiny_1x1.jpg"};
	osv_model  *m = NULL,
			   *ref = NULL;
	osv_error	err;
	const osv_model_info *info;
	size_t		n;
	char	   *csv;

	/* only the two published files */
	clear_tmp();
	copy_file("test/models/tiny-gelu-pt/pytorch_model.bin", tmp("pytorch_model.bin"));
	copy_file("test/models/tiny-gelu-pt/config.json", tmp("config.json"));
	CHECK(osv_model_open(tmpdir, NULL, &m, &err) == OSV_OK, "published layout: %s",
		  err.message);
	if (m)
	{
		info = osv_model_get_info(m);
		CHECK(strcmp(info->weights_format, "pytorch") == 0 &&
			  strcmp(info->cells_source, "checkpoint") == 0 &&
			  info->quadtree_path[0] == '\0' && info->num_heads == 2 &&
			  info->hidden_act == OSV_ACT_GELU && info->image_size == 224,
			  "info %s %s \"%s\" %d", info->weights_format, info->cells_source,
			  info->quadtree_path, info->num_heads);
		CHECK(strlen(osv_model_fingerprint(m)) == 64, "fingerprint");
		CHECK(osv_model_open("test/models/tiny-gelu", NULL, &ref, &err) == OSV_OK, "ref");
		if (ref)
		{
			const osv_cell *a = osv_model_cells(m, NULL),
					   *b = osv_model_cells(ref, NULL);
			double		worst = 0;

			for (int c = 0; c < info->num_cells; c++)
			{
				double		d[6] = {a[c].min_lat - b[c].min_lat, a[c].min_lon - b[c].min_lon,
					a[c].max_lat - b[c].max_lat, a[c].max_lon - b[c].max_lon,
				a[c].mean_lat - b[c].mean_lat, a[c].mean_lon - b[c].mean_lon};

				for (int i = 0; i < 6; i++)
					worst = d[i] > worst ? d[i] : -d[i] > worst ? -d[i] : worst;
			}
			CHECK(worst < 1e-9, "cells in degrees from the buffers: max diff %g", worst);
			osv_model_close(ref);
			ref = NULL;
		}
		osv_model_close(m);
		m = NULL;
	}

	/* plus the matching CSV: read and checked; a changed cell is named */
	copy_file("test/models/tiny-gelu/quadtree_10_1000.csv", tmp("quadtree_10_1000.csv"));
	CHECK(osv_model_open(tmpdir, NULL, &m, &err) == OSV_OK, "with CSV: %s", err.message);
	if (m)
	{
		CHECK(strstr(osv_model_get_info(m)->quadtree_path, "quadtree_10_1000.csv") != NULL,
			  "CSV read");
		osv_model_close(m);
		m = NULL;
	}
	csv = (char *) slurp(tmp("quadtree_10_1000.csv"), &n);
	if (csv)
	{
		char	   *line = csv;

		for (int i = 0; i < 8; i++)
			line = strchr(line, '\n') + 1;	/* header + 7 rows: cell 7 */
		line = strchr(line, ',') + 1;	/* min_lat */
		line[0] = line[0] == '1' ? '2' : '1';
		st_write_file(tmp("quadtree_10_1000.csv"), csv, n);
		free(csv);
		CHECK(osv_model_open(tmpdir, NULL, &m, &err) == OSV_ERR_MODEL &&
			  strstr(err.message, "disagree on cell 7: min_lat") != NULL,
			  "changed CSV: %s", err.message);
		osv_model_close(m);
		m = NULL;
	}
	unlink(tmp("quadtree_10_1000.csv"));

	/* both weights files: model.safetensors wins (it has no cell buffers: the CSV) */
	copy_file("test/models/tiny-gelu/model.safetensors", tmp("model.safetensors"));
	copy_file("test/models/tiny-gelu/quadtree_10_1000.csv", tmp("quadtree_10_1000.csv"));
	CHECK(osv_model_open(tmpdir, NULL, &m, &err) == OSV_OK &&
		  strcmp(osv_model_get_info(m)->weights_format, "safetensors") == 0,
		  "both files: %s", err.message);
	osv_model_close(m);
	m = NULL;
	unlink(tmp("model.safetensors"));
	unlink(tmp("quadtree_10_1000.csv"));

	/* configs: an unknown backbone without heads, the known one at the wrong width */
	st_write_file(tmp("config.json"),
				  "{\"model\": {\"backbone\": {\"instance\": {\"path\": \"someone/vit\"}}}}", 62);
	CHECK(osv_model_open(tmpdir, NULL, &m, &err) == OSV_ERR_MODEL &&
		  strstr(err.message, "\"someone/vit\" is not one osv5m knows") != NULL &&
		  strstr(err.message, "add \"num_attention_heads\"") != NULL,
		  "unknown backbone: %s", err.message);
	{
		const char *cfg = "{\"model\": {\"backbone\": {\"instance\": {\"path\": "
			"\"laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K\"}}}}";

		st_write_file(tmp("config.json"), cfg, strlen(cfg));
		CHECK(osv_model_open(tmpdir, NULL, &m, &err) == OSV_ERR_MODEL &&
			  strstr(err.message, "has hidden size 1024 but the weights have 64") != NULL,
			  "known backbone, other width: %s", err.message);
		cfg = "{\"num_attention_heads\": 2, \"model\": {\"head\": {\"instance\": "
			"{\"final_dim\": 99}}}}";
		st_write_file(tmp("config.json"), cfg, strlen(cfg));
		CHECK(osv_model_open(tmpdir, NULL, &m, &err) == OSV_ERR_MODEL &&
			  strstr(err.message, "model.head.instance.final_dim is 99 but the weights have 100") != NULL,
			  "cell count: %s", err.message);
		cfg = "{\"num_attention_heads\": 2, \"model\": {\"mid\": {\"instance\": "
			"{\"hidden_dim\": [64, 16]}}}}";
		st_write_file(tmp("config.json"), cfg, strlen(cfg));
		CHECK(osv_model_open(tmpdir, NULL, &m, &err) == OSV_ERR_MODEL &&
			  strstr(err.message, "hidden_dim[1] is 16 but the weights have 32") != NULL,
			  "mid sizes: %s", err.message);
	}

	/* no weights file at all */
	clear_tmp();
	CHECK(osv_model_open(tmpdir, NULL, &m, &err) == OSV_ERR_IO &&
		  strstr(err.message, "model.safetensors") != NULL &&
		  strstr(err.detail, "neither model.safetensors nor pytorch_model.bin") != NULL,
		  "no weights: %s / %s", err.message, err.detail);

	/* convert: every test model, bit-identical predictions */
	for (size_t k = 0; k < sizeof(models) / sizeof(models[0]); k++)
	{
		char		dir[256];
		osv_model  *conv = NULL;

		snprintf(dir, sizeof(dir), "test/models/%s", models[k]);
		clear_tmp();
		CHECK(osv_model_open(dir, NULL, &m, &err) == OSV_OK, "%s: %s", dir, err.message);
		if (m == NULL)
			continue;
		CHECK(osv_model_convert(m, tmpdir, &err) == OSV_OK, "convert %s: %s", dir,
			  err.message);
		CHECK(osv_model_open(tmpdir, NULL, &conv, &err) == OSV_OK, "converted %s: %s", dir,
			  err.message);
		if (conv)
		{
			CHECK(strcmp(osv_model_get_info(conv)->weights_format, "safetensors") == 0 &&
				  osv_model_get_info(conv)->dtype == OSV_DTYPE_F32 &&
				  osv_model_get_info(conv)->quadtree_path[0] != '\0',
				  "converted %s: F32 safetensors with its CSV", dir);
			for (size_t i = 0; i < sizeof(images) / sizeof(images[0]); i++)
				CHECK(same_predictions(m, conv, images[i]), "%s converted: %s differs", dir,
					  images[i]);
			osv_model_close(conv);
		}
		osv_model_close(m);
		m = NULL;
	}
	CHECK(osv_model_convert(NULL, tmpdir, &err) == OSV_ERR_ARGUMENT, "no model");
	clear_tmp();
}

/*
 * SHA-256 against FIPS 180-4's examples (one block, two blocks, empty), on
 * the portable path and, where the CPU has the SHA extensions, on the
 * hardware path; then both paths on pseudo-random buffers of every length
 * up to 300 bytes and on 1 MB, which must agree.
 */
static void
test_sha256(void)
{
	static const struct
	{
		const char *text;
		const char *digest;
	}			fips[] = {
		{"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
		{"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
		{"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
		"248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"},
	};
	bool		hw = osv_sha256_hardware();
	char		hex[65],
				other[65];
	size_t		big = 1 << 20;
	uint8_t    *buf = malloc(big);
	uint32_t	x = 12345;

	for (int path = 0; path < (hw ? 2 : 1); path++)
		for (size_t i = 0; i < sizeof(fips) / sizeof(fips[0]); i++)
		{
			osv_sha256_hex_with((const uint8_t *) fips[i].text, strlen(fips[i].text), hex, path == 1);
			CHECK(strcmp(hex, fips[i].digest) == 0, "%s path, \"%s\": %s",
				  path ? "hardware" : "portable", fips[i].text, hex);
		}
	osv_sha256_hex((const uint8_t *) "abc", 3, hex);
	CHECK(strcmp(hex, fips[0].digest) == 0, "default path: %s", hex);
	printf("# sha256: %s path by default\n", hw ? "hardware (SHA extensions)" : "portable");
	if (!hw || buf == NULL)
	{
		free(buf);
		return;
	}
	for (size_t i = 0; i < big; i++)
	{
		x = x * 1103515245u + 12345u;
		buf[i] = (uint8_t) (x >> 16);
	}
	for (size_t n = 0; n <= 300; n++)
	{
		osv_sha256_hex_with(buf, n, hex, false);
		osv_sha256_hex_with(buf, n, other, true);
		CHECK(strcmp(hex, other) == 0, "%zu bytes: portable %s, hardware %s", n, hex, other);
	}
	osv_sha256_hex_with(buf, big, hex, false);
	osv_sha256_hex_with(buf, big, other, true);
	CHECK(strcmp(hex, other) == 0, "1 MB: portable %s, hardware %s", hex, other);
	free(buf);
}

int
main(void)
{
	snprintf(tmpdir, sizeof(tmpdir), "/tmp/osv5m-test-pytorch-XXXXXX");
	if (mkdtemp(tmpdir) == NULL)
	{
		perror("mkdtemp");
		return 1;
	}
	test_valid();
	test_zip_faults();
	test_tensor_faults();
	test_pickle_faults();
	test_real_files();
	test_model_dirs();
	test_sha256();
	clear_tmp();
	rmdir(tmpdir);
	return check_summary("test_pytorch");
}
