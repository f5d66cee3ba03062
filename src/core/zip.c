/*
 * zip.c: index the entries of a zip archive held in memory, as torch.save
 * writes them (PyTorch's zip format, torch >= 1.6; see docs/MODEL.md
 * section 1 and caffe2/serialize/inline_container.cc for the writer).
 *
 * Only what a reader of stored weights needs: the end of central directory
 * record (and its ZIP64 form, for archives or offsets past 4 GiB), the
 * central directory, and each entry's local header, which says where the
 * entry's bytes start.  Only stored entries (method 0) are accepted: the
 * weights are used in place from the read-only mapping, so a compressed
 * entry would have to be inflated into private memory in every backend.
 *
 * The archive is untrusted input.  After osv_zip_parse succeeds:
 *   - every entry is stored, not encrypted, its compressed and
 *     uncompressed sizes agree, and its local header (fixed part, name and
 *     extra field) and data lie inside the buffer, before the central
 *     directory;
 *   - the local header names the same entry as the central directory;
 *   - no two entries' byte ranges (local header to end of data) overlap,
 *     and no name appears twice;
 *   - entries[] is sorted by name (osv_zip_find is a binary search).
 * CRC-32s are not checked: reading 1.3 GB again at each load costs more
 * than it protects against; the sizes and ranges are what keep reads in
 * bounds.
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SIG_LOCAL 0x04034b50u
#define SIG_CENTRAL 0x02014b50u
#define SIG_EOCD 0x06054b50u
#define SIG_ZIP64_EOCD 0x06064b50u
#define SIG_ZIP64_LOCATOR 0x07064b50u

#define EOCD_SIZE 22
#define ZIP64_LOCATOR_SIZE 20
#define ZIP64_EOCD_SIZE 56
#define CENTRAL_SIZE 46
#define LOCAL_SIZE 30
/* a comment may be 65535 bytes: the EOCD is somewhere in the last 64 kB */
#define EOCD_SEARCH (EOCD_SIZE + 65535)
/* the real checkpoint has ~400 entries; this keeps the index small */
#define ZIP_MAX_ENTRIES 1000000

static uint16_t
rd16(const uint8_t *p)
{
	return (uint16_t) (p[0] | (p[1] << 8));
}

static uint32_t
rd32(const uint8_t *p)
{
	return (uint32_t) p[0] | ((uint32_t) p[1] << 8) | ((uint32_t) p[2] << 16) |
		((uint32_t) p[3] << 24);
}

static uint64_t
rd64(const uint8_t *p)
{
	return (uint64_t) rd32(p) | ((uint64_t) rd32(p + 4) << 32);
}

/* Entry name for messages: printable and short. */
static const char *
printable(char *buf, size_t size, const uint8_t *name, size_t len)
{
	size_t		j = 0;

	for (size_t i = 0; i < len && j + 5 < size; i++)
	{
		if (name[i] >= 0x20 && name[i] < 0x7f && name[i] != '"' && name[i] != '\\')
			buf[j++] = (char) name[i];
		else
			j += (size_t) snprintf(buf + j, size - j, "\\x%02x", name[i]);
	}
	buf[j < size ? j : size - 1] = '\0';
	return buf;
}

/*
 * The ZIP64 extended information extra field of a central directory
 * header: replaces the 32-bit fields that are 0xffffffff, in the fixed
 * order uncompressed size, compressed size, local header offset.
 */
static osv_status
read_zip64_extra(const uint8_t *extra, size_t len, uint64_t *usize, uint64_t *csize,
				 uint64_t *offset, const char *name, osv_error *err)
{
	size_t		pos = 0;

	while (pos + 4 <= len)
	{
		uint16_t	id = rd16(extra + pos);
		uint16_t	n = rd16(extra + pos + 2);
		const uint8_t *p = extra + pos + 4;
		size_t		need = 0;

		if (pos + 4 + n > len)
			break;				/* a ragged tail is tolerated, as unzip does */
		if (id == 0x0001)
		{
			need = (*usize == 0xffffffffu ? 8 : 0) + (*csize == 0xffffffffu ? 8 : 0) +
				(*offset == 0xffffffffu ? 8 : 0);
			if (n < need)
				return osv_fail(err, OSV_ERR_MODEL,
								"zip entry \"%s\": ZIP64 extra field of %u bytes is too short",
								name, n);
			if (*usize == 0xffffffffu)
			{
				*usize = rd64(p);
				p += 8;
			}
			if (*csize == 0xffffffffu)
			{
				*csize = rd64(p);
				p += 8;
			}
			if (*offset == 0xffffffffu)
				*offset = rd64(p);
			return OSV_OK;
		}
		pos += 4 + (size_t) n;
	}
	if (*usize == 0xffffffffu || *csize == 0xffffffffu || *offset == 0xffffffffu)
		return osv_fail(err, OSV_ERR_MODEL,
						"zip entry \"%s\": sizes or offset need a ZIP64 extra field, which is missing",
						name);
	return OSV_OK;
}

/* Locate the central directory: *cd_offset, *cd_size, *count. */
static osv_status
find_central_directory(const uint8_t *buf, size_t size, uint64_t *cd_offset,
					   uint64_t *cd_size, uint64_t *count, uint64_t *cd_end,
					   osv_error *err)
{
	size_t		lowest = size > EOCD_SEARCH ? size - EOCD_SEARCH : 0;
	size_t		eocd = SIZE_MAX;

	if (size < EOCD_SIZE)
		return osv_fail(err, OSV_ERR_MODEL,
						"not a zip archive: %zu bytes, shorter than an end of central directory record",
						size);
	for (size_t pos = size - EOCD_SIZE + 1; pos-- > lowest;)
	{
		/* the comment must run exactly to the end of the file */
		if (rd32(buf + pos) == SIG_EOCD &&
			pos + EOCD_SIZE + rd16(buf + pos + 20) == size)
		{
			eocd = pos;
			break;
		}
	}
	if (eocd == SIZE_MAX)
		return osv_fail(err, OSV_ERR_MODEL,
						"not a zip archive, or a truncated one: no end of central directory record");
	if (rd16(buf + eocd + 4) != 0 || rd16(buf + eocd + 6) != 0)
		return osv_fail(err, OSV_ERR_MODEL, "multi-disk zip archives are not supported");
	*count = rd16(buf + eocd + 10);
	*cd_size = rd32(buf + eocd + 12);
	*cd_offset = rd32(buf + eocd + 16);
	*cd_end = eocd;

	if (eocd >= ZIP64_LOCATOR_SIZE &&
		rd32(buf + eocd - ZIP64_LOCATOR_SIZE) == SIG_ZIP64_LOCATOR)
	{
		const uint8_t *loc = buf + eocd - ZIP64_LOCATOR_SIZE;
		uint64_t	z = rd64(loc + 8);

		if (rd32(loc + 4) != 0 || rd32(loc + 16) > 1)
			return osv_fail(err, OSV_ERR_MODEL, "multi-disk zip archives are not supported");
		if (z > eocd - ZIP64_LOCATOR_SIZE || eocd - ZIP64_LOCATOR_SIZE - z < ZIP64_EOCD_SIZE)
			return osv_fail(err, OSV_ERR_MODEL,
							"zip archive: the ZIP64 end of central directory offset %llu is out of range",
							(unsigned long long) z);
		if (rd32(buf + z) != SIG_ZIP64_EOCD)
			return osv_fail(err, OSV_ERR_MODEL,
							"zip archive: no ZIP64 end of central directory record at offset %llu",
							(unsigned long long) z);
		if (rd32(buf + z + 16) != 0 || rd32(buf + z + 20) != 0)
			return osv_fail(err, OSV_ERR_MODEL, "multi-disk zip archives are not supported");
		*count = rd64(buf + z + 32);
		*cd_size = rd64(buf + z + 40);
		*cd_offset = rd64(buf + z + 48);
		*cd_end = z;
	}
	else if (*count == 0xffff || *cd_size == 0xffffffffu || *cd_offset == 0xffffffffu)
		return osv_fail(err, OSV_ERR_MODEL,
						"zip archive: the end of central directory needs a ZIP64 record, which is missing");

	if (*cd_offset > *cd_end || *cd_size > *cd_end - *cd_offset)
		return osv_fail(err, OSV_ERR_MODEL,
						"zip archive: central directory [%llu, +%llu) runs past its end record at %llu (truncated or corrupt)",
						(unsigned long long) *cd_offset, (unsigned long long) *cd_size,
						(unsigned long long) *cd_end);
	if (*count > ZIP_MAX_ENTRIES)
		return osv_fail(err, OSV_ERR_MODEL,
						"zip archive: %llu entries exceed the limit of %d",
						(unsigned long long) *count, ZIP_MAX_ENTRIES);
	/* each header takes at least 46 bytes: a count the size cannot hold is a lie */
	if (*count > *cd_size / CENTRAL_SIZE)
		return osv_fail(err, OSV_ERR_MODEL,
						"zip archive: %llu entries cannot fit in a central directory of %llu bytes",
						(unsigned long long) *count, (unsigned long long) *cd_size);
	return OSV_OK;
}

/* qsort order of entries by name. */
static int
cmp_entry_name(const void *a, const void *b)
{
	return strcmp(((const osv_zip_entry *) a)->name, ((const osv_zip_entry *) b)->name);
}

/* qsort order of entries by local header offset. */
static int
cmp_entry_start(const void *a, const void *b)
{
	uint64_t	x = ((const osv_zip_entry *) a)->header_offset;
	uint64_t	y = ((const osv_zip_entry *) b)->header_offset;

	return (x > y) - (x < y);
}

/* Parse one central directory header at *pos into e; checks its local header. */
static osv_status
parse_entry(const uint8_t *buf, uint64_t cd_offset, uint64_t cd_end_pos,
			size_t *pos, osv_zip_entry *e, char *name_out, osv_error *err)
{
	const uint8_t *h = buf + *pos;
	uint16_t	flags,
				method,
				name_len,
				extra_len,
				comment_len;
	uint64_t	usize,
				csize,
				offset,
				data;
	char		shown[200];
	osv_status	st;

	if (cd_end_pos - *pos < CENTRAL_SIZE || rd32(h) != SIG_CENTRAL)
		return osv_fail(err, OSV_ERR_MODEL,
						"zip archive: bad central directory header at offset %zu", *pos);
	flags = rd16(h + 8);
	method = rd16(h + 10);
	csize = rd32(h + 20);
	usize = rd32(h + 24);
	name_len = rd16(h + 28);
	extra_len = rd16(h + 30);
	comment_len = rd16(h + 32);
	offset = rd32(h + 42);
	if (cd_end_pos - *pos - CENTRAL_SIZE < (uint64_t) name_len + extra_len + comment_len)
		return osv_fail(err, OSV_ERR_MODEL,
						"zip archive: central directory header at offset %zu runs past the directory",
						*pos);
	printable(shown, sizeof(shown), h + CENTRAL_SIZE, name_len);
	if (name_len == 0 || memchr(h + CENTRAL_SIZE, '\0', name_len) != NULL)
		return osv_fail(err, OSV_ERR_MODEL, "zip archive: an entry has an empty or invalid name \"%s\"",
						shown);
	memcpy(name_out, h + CENTRAL_SIZE, name_len);
	name_out[name_len] = '\0';
	e->name = name_out;

	if (flags & 0x0001)
		return osv_fail(err, OSV_ERR_MODEL,
						"zip entry \"%s\" is encrypted; weights files are never encrypted", shown);
	if (method != 0)
		return osv_fail(err, OSV_ERR_MODEL,
						"zip entry \"%s\" is compressed (method %u); only stored entries are supported: save it again with torch.save, which stores, or convert it to safetensors",
						shown, method);
	if ((st = read_zip64_extra(h + CENTRAL_SIZE + name_len, extra_len, &usize, &csize,
							   &offset, shown, err)) != OSV_OK)
		return st;
	if (csize != usize)
		return osv_fail(err, OSV_ERR_MODEL,
						"zip entry \"%s\" is stored but its sizes differ (%llu and %llu bytes)",
						shown, (unsigned long long) csize, (unsigned long long) usize);

	/* the local header: fixed part, name and extra, then the data */
	if (offset > cd_offset || cd_offset - offset < LOCAL_SIZE)
		return osv_fail(err, OSV_ERR_MODEL,
						"zip entry \"%s\": local header offset %llu is out of range",
						shown, (unsigned long long) offset);
	h = buf + offset;
	if (rd32(h) != SIG_LOCAL)
		return osv_fail(err, OSV_ERR_MODEL,
						"zip entry \"%s\": no local header at offset %llu",
						shown, (unsigned long long) offset);
	if (rd16(h + 8) != 0 || (rd16(h + 6) & 0x0001))
		return osv_fail(err, OSV_ERR_MODEL,
						"zip entry \"%s\": local header says compressed or encrypted", shown);
	data = offset + LOCAL_SIZE + rd16(h + 26) + rd16(h + 28);
	if (data > cd_offset || rd16(h + 26) != name_len ||
		memcmp(h + LOCAL_SIZE, name_out, name_len) != 0)
		return osv_fail(err, OSV_ERR_MODEL,
						"zip entry \"%s\": local header does not match the central directory",
						shown);
	if (usize > cd_offset - data)
		return osv_fail(err, OSV_ERR_MODEL,
						"zip entry \"%s\": %llu bytes at offset %llu run past the data area (truncated or corrupt archive)",
						shown, (unsigned long long) usize, (unsigned long long) data);
	e->header_offset = offset;
	e->data = buf + data;
	e->data_offset = data;
	e->size = usize;
	*pos += CENTRAL_SIZE + (size_t) name_len + extra_len + comment_len;
	return OSV_OK;
}

/* Index the stored entries of the zip archive buf[0..size). */
osv_status
osv_zip_parse(const uint8_t *buf, size_t size, osv_zip *out, osv_error *err)
{
	uint64_t	cd_offset = 0,
				cd_size = 0,
				count = 0,
				cd_end = 0;
	size_t		pos;
	size_t		names_size = 0;
	osv_status	st;

	memset(out, 0, sizeof(*out));
	if ((st = find_central_directory(buf, size, &cd_offset, &cd_size, &count, &cd_end,
									 err)) != OSV_OK)
		return st;
	if (count == 0)
		return osv_fail(err, OSV_ERR_MODEL, "zip archive has no entries");

	/* names are at most cd_size bytes in all, plus a NUL each */
	names_size = (size_t) cd_size + (size_t) count;
	out->entries = calloc((size_t) count, sizeof(osv_zip_entry));
	out->names = malloc(names_size);
	if (out->entries == NULL || out->names == NULL)
	{
		osv_zip_free(out);
		return osv_fail(err, OSV_ERR_NOMEM, "out of memory indexing %llu zip entries",
						(unsigned long long) count);
	}
	pos = (size_t) cd_offset;
	{
		char	   *next = out->names;

		for (uint64_t i = 0; i < count; i++)
		{
			osv_zip_entry *e = &out->entries[i];

			st = parse_entry(buf, cd_offset, cd_offset + cd_size, &pos, e, next, err);
			if (st != OSV_OK)
			{
				osv_zip_free(out);
				return st;
			}
			next += strlen(next) + 1;
			out->num_entries++;
		}
	}

	/* ranges: local header to end of data, in file order, must not overlap */
	qsort(out->entries, (size_t) out->num_entries, sizeof(osv_zip_entry), cmp_entry_start);
	for (int i = 1; i < out->num_entries; i++)
	{
		const osv_zip_entry *a = &out->entries[i - 1];
		const osv_zip_entry *b = &out->entries[i];

		if (a->data_offset + a->size > b->header_offset)
		{
			char		x[200],
						y[200];

			osv_fail(err, OSV_ERR_MODEL, "zip entries \"%s\" and \"%s\" overlap",
					 printable(x, sizeof(x), (const uint8_t *) a->name, strlen(a->name)),
					 printable(y, sizeof(y), (const uint8_t *) b->name, strlen(b->name)));
			osv_zip_free(out);
			return OSV_ERR_MODEL;
		}
	}
	qsort(out->entries, (size_t) out->num_entries, sizeof(osv_zip_entry), cmp_entry_name);
	for (int i = 1; i < out->num_entries; i++)
	{
		if (strcmp(out->entries[i - 1].name, out->entries[i].name) == 0)
		{
			char		x[200];

			osv_fail(err, OSV_ERR_MODEL, "zip entry \"%s\" appears twice",
					 printable(x, sizeof(x), (const uint8_t *) out->entries[i].name,
							   strlen(out->entries[i].name)));
			osv_zip_free(out);
			return OSV_ERR_MODEL;
		}
	}
	return OSV_OK;
}

void
osv_zip_free(osv_zip *zip)
{
	if (zip == NULL)
		return;
	free(zip->entries);
	free(zip->names);
	memset(zip, 0, sizeof(*zip));
}

/* Binary search of the name-sorted entries. */
const osv_zip_entry *
osv_zip_find(const osv_zip *zip, const char *name)
{
	int			lo = 0,
				hi = zip->num_entries - 1;

	while (lo <= hi)
	{
		int			mid = lo + (hi - lo) / 2;
		int			c = strcmp(name, zip->entries[mid].name);

		if (c == 0)
			return &zip->entries[mid];
		if (c < 0)
			hi = mid - 1;
		else
			lo = mid + 1;
	}
	return NULL;
}
