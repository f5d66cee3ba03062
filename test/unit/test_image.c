/*
 * test_image.c: image decoding and preprocessing against Pillow.
 *
 * Reads test/golden/images/MANIFEST (written by
 * test/reference/image_golden.py from test/data/images) and checks, for
 * every image:
 *   - osv_image_decode equals Image.open(f).convert("RGB") exactly;
 *   - osv_image_resize to torchvision's Resize(224) size equals Pillow's
 *     resize (hash) and, around the center crop, pixel by pixel;
 *   - osv_preprocess gives the center crop of that, normalised;
 *   - extra resizes at other sizes; truncated files decode or fail as in
 *     Pillow.
 * Pixels may be off by one at most (the acceptance bar); the counts of
 * exactly equal pixels are printed.  Then hostile and edge inputs: empty,
 * random bytes, mutated files, huge claimed dimensions, GIF, the pixel
 * limit, too many progressive scans.  Runs from the repository root.
 */
#include "osv5m.h"
#include "check.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MANIFEST "test/golden/images/MANIFEST"
#define SIZE 224

static const float clip_mean[3] = {0.48145466f, 0.4578275f, 0.40821073f};
static const float clip_std[3] = {0.26862954f, 0.26130258f, 0.27577711f};

/* Pixel agreement counters over all comparisons of one kind. */
typedef struct stats
{
	long		total;
	long		equal;
	long		off_by_one;
	long		worse;
	int			max_diff;
} stats;

static stats decode_stats,
			resize_stats,
			crop_stats;
static int	resize_hash_equal,
			resize_hash_total;

/* Read a whole file; NULL if it cannot be read. */
static uint8_t *
read_file(const char *path, size_t *size)
{
	FILE	   *f = fopen(path, "rb");
	uint8_t    *buf;
	long		n;

	if (f == NULL)
		return NULL;
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	fseek(f, 0, SEEK_SET);
	/* one more byte, NUL, so that a PPM header can be sscanf'ed */
	buf = malloc((size_t) n + 1);
	if (buf != NULL && fread(buf, 1, (size_t) n, f) != (size_t) n)
	{
		free(buf);
		buf = NULL;
	}
	if (buf != NULL)
		buf[n] = 0;
	fclose(f);
	*size = (size_t) n;
	return buf;
}

/* A binary PPM (P6, maxval 255) as written by image_golden.py. */
static uint8_t *
read_ppm(const char *path, int *w, int *h)
{
	size_t		size;
	uint8_t    *buf = read_file(path, &size);
	uint8_t    *pixels;
	int			consumed = 0;

	if (buf == NULL)
		return NULL;
	if (size < 3 || sscanf((const char *) buf, "P6 %d %d 255%n", w, h, &consumed) != 2 ||
		consumed == 0 || (size_t) consumed + 1 + (size_t) *w * *h * 3 > size)
	{
		free(buf);
		return NULL;
	}
	pixels = malloc((size_t) *w * *h * 3);
	memcpy(pixels, buf + consumed + 1, (size_t) *w * *h * 3);
	free(buf);
	return pixels;
}

static uint64_t
fnv1a64(const uint8_t *p, size_t n)
{
	uint64_t	h = 0xcbf29ce484222325ULL;

	for (size_t i = 0; i < n; i++)
	{
		h ^= p[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

/* Count how pixels of got differ from want (n bytes); returns the max diff. */
static int
tally(stats *s, const uint8_t *got, const uint8_t *want, size_t n)
{
	int			max = 0;

	for (size_t i = 0; i < n; i++)
	{
		int			d = abs((int) got[i] - (int) want[i]);

		s->total++;
		if (d == 0)
			s->equal++;
		else if (d == 1)
			s->off_by_one++;
		else
			s->worse++;
		if (d > max)
			max = d;
	}
	if (max > s->max_diff)
		s->max_diff = max;
	return max;
}

/*
 * Compare w x h RGB pixels with a manifest reference: a PPM (pixel diffs
 * tallied, at most tolerance allowed) or fnv:HEX (exact).
 */
static void
check_ref(const char *what, const char *ref, const uint8_t *rgb, int w, int h,
		  int tolerance, stats *s)
{
	if (strncmp(ref, "fnv:", 4) == 0)
	{
		unsigned long long want = strtoull(ref + 4, NULL, 16);
		unsigned long long got = fnv1a64(rgb, (size_t) w * h * 3);

		CHECK(got == want, "%s: hash %016llx, Pillow %016llx", what, got, want);
		if (s != NULL)
		{
			/* equal hashes: every byte equal */
			s->total += (long) w * h * 3;
			s->equal += got == want ? (long) w * h * 3 : 0;
			s->worse += got == want ? 0 : 1;
		}
	}
	else
	{
		int			pw,
					ph;
		uint8_t    *want = read_ppm(ref, &pw, &ph);
		int			max;

		CHECK(want != NULL, "%s: cannot read %s", what, ref);
		if (want == NULL)
			return;
		CHECK(pw == w && ph == h, "%s: %dx%d, Pillow %dx%d", what, w, h, pw, ph);
		if (pw == w && ph == h)
		{
			max = tally(s, rgb, want, (size_t) w * h * 3);
			CHECK(max <= tolerance, "%s: max abs diff %d from Pillow", what, max);
		}
		free(want);
	}
}

/* Error messages are lower case, one line, without a final period. */
static void
check_message(const osv_error *err)
{
	size_t		n = strlen(err->message);

	CHECK(n > 0 && !(err->message[0] >= 'A' && err->message[0] <= 'Z') &&
		  err->message[n - 1] != '.' && strchr(err->message, '\n') == NULL,
		  "badly formed message \"%s\"", err->message);
}

/* Decode path; returns the status, fills img. */
static osv_status
decode_file(const char *path, osv_image *img, osv_error *err)
{
	size_t		size;
	uint8_t    *data = read_file(path, &size);
	osv_status	st;

	if (data == NULL)
	{
		CHECK(data != NULL, "cannot read %s", path);
		memset(img, 0, sizeof(*img));
		return OSV_ERR_IO;
	}
	st = osv_image_decode(data, size, 0, img, err);
	free(data);
	return st;
}

static void
run_decode(const char *file, int w, int h, const char *ref)
{
	osv_image	img;
	osv_error	err;
	osv_status	st = decode_file(file, &img, &err);

	CHECK(st == OSV_OK, "decode %s: %s (%s)", file, err.message, err.detail);
	if (st != OSV_OK)
		return;
	CHECK(img.width == w && img.height == h, "decode %s: %dx%d, Pillow %dx%d",
		  file, img.width, img.height, w, h);
	if (img.width == w && img.height == h)
		check_ref(file, ref, img.rgb, w, h, 0, &decode_stats);
	osv_image_free(&img);
}

static void
run_preprocess(const char *file, int rw, int rh, int left, int top,
			   const char *resized_ref, const char *crop_ref)
{
	osv_image	img,
				resized;
	osv_error	err;
	float	   *pixels;
	uint8_t    *crop;
	size_t		plane = (size_t) SIZE * SIZE;
	osv_status	st = decode_file(file, &img, &err);

	if (st != OSV_OK)
		return;					/* already reported by run_decode */

	/* the full resize, where Pillow could afford one */
	if (strcmp(resized_ref, "-") != 0)
	{
		st = osv_image_resize(&img, rw, rh, &resized, &err);
		CHECK(st == OSV_OK, "resize %s: %s", file, err.message);
		if (st == OSV_OK)
		{
			unsigned long long want = strtoull(resized_ref + 4, NULL, 16);

			resize_hash_total++;
			resize_hash_equal += fnv1a64(resized.rgb, (size_t) rw * rh * 3) == want;

			/* its center crop against Pillow's, pixel by pixel */
			crop = malloc(plane * 3);
			for (int y = 0; y < SIZE; y++)
				memcpy(crop + (size_t) y * SIZE * 3,
					   resized.rgb + ((size_t) (top + y) * rw + left) * 3, SIZE * 3);
			check_ref(file, crop_ref, crop, SIZE, SIZE, 1, &resize_stats);
			free(crop);
			osv_image_free(&resized);
		}
	}

	/* the test transform, computed on the crop window only */
	pixels = malloc(plane * 3 * sizeof(float));
	st = osv_preprocess(&img, SIZE, clip_mean, clip_std, pixels, &err);
	CHECK(st == OSV_OK, "preprocess %s: %s", file, err.message);
	if (st == OSV_OK)
	{
		bool		exact = true;

		/* undo the normalisation to get the 8-bit value back */
		crop = malloc(plane * 3);
		for (int c = 0; c < 3; c++)
			for (size_t i = 0; i < plane; i++)
			{
				float		v = pixels[c * plane + i];
				long		q = lrintf((v * clip_std[c] + clip_mean[c]) * 255.0f);

				crop[3 * i + c] = (uint8_t) (q < 0 ? 0 : q > 255 ? 255 : q);
				exact &= v == ((float) crop[3 * i + c] / 255.0f - clip_mean[c]) / clip_std[c];
			}
		CHECK(exact, "preprocess %s: values are not (x / 255 - mean) / std", file);
		if (strcmp(crop_ref, "-") != 0)
			check_ref(file, crop_ref, crop, SIZE, SIZE, 1, &crop_stats);
		free(crop);
	}
	free(pixels);
	osv_image_free(&img);
}

static void
run_resize(const char *file, int w, int h, const char *ref)
{
	osv_image	img,
				out;
	osv_error	err;
	osv_status	st = decode_file(file, &img, &err);

	if (st != OSV_OK)
		return;
	st = osv_image_resize(&img, w, h, &out, &err);
	CHECK(st == OSV_OK, "resize %s to %dx%d: %s", file, w, h, err.message);
	if (st == OSV_OK)
	{
		char		what[600];

		snprintf(what, sizeof(what), "resize %s to %dx%d", file, w, h);
		check_ref(what, ref, out.rgb, w, h, 1, &resize_stats);
		osv_image_free(&out);
	}
	osv_image_free(&img);
}

static void
run_cut(const char *file, size_t n, const char *verdict, const char *ref)
{
	size_t		size;
	uint8_t    *data = read_file(file, &size);
	uint8_t    *cut;
	osv_image	img;
	osv_error	err;
	osv_status	st;

	if (data == NULL || n > size)
	{
		CHECK(0, "cannot cut %s at %zu", file, n);
		free(data);
		return;
	}
	/* a buffer of exactly n bytes, so ASan sees any read past the cut */
	cut = malloc(n);
	memcpy(cut, data, n);
	st = osv_image_decode(cut, n, 0, &img, &err);
	if (strcmp(verdict, "ok") == 0)
	{
		CHECK(st == OSV_OK, "%s cut at %zu: Pillow decodes it, we fail: %s (%s)",
			  file, n, err.message, err.detail);
		if (st == OSV_OK)
			check_ref(file, ref, img.rgb, img.width, img.height, 0, NULL);
	}
	else
	{
		CHECK(st == OSV_ERR_IMAGE_CORRUPT || st == OSV_ERR_IMAGE_UNSUPPORTED,
			  "%s cut at %zu: Pillow fails, we return %s", file, n,
			  osv_status_name(st));
		if (st != OSV_OK)
			check_message(&err);
	}
	osv_image_free(&img);
	free(cut);
	free(data);
}

/* Run every line of the manifest. */
static void
run_manifest(void)
{
	FILE	   *f = fopen(MANIFEST, "r");
	char		line[2048];
	int			lines = 0;

	CHECK(f != NULL, "cannot open %s (run from the repository root)", MANIFEST);
	if (f == NULL)
		return;
	while (fgets(line, sizeof(line), f) != NULL)
	{
		char		kind[32],
					file[512],
					a[512],
					b[512];
		int			w,
					h,
					l,
					t;
		size_t		n;

		if (line[0] == '#' || line[0] == '\n')
			continue;
		lines++;
		if (sscanf(line, "%31s", kind) != 1)
			continue;
		if (strcmp(kind, "decode") == 0 &&
			sscanf(line, "%*s %511s %d %d %511s", file, &w, &h, a) == 4)
			run_decode(file, w, h, a);
		else if (strcmp(kind, "preprocess") == 0 &&
				 sscanf(line, "%*s %511s %d %d %d %d %511s %511s", file, &w, &h,
						&l, &t, a, b) == 7)
			run_preprocess(file, w, h, l, t, a, b);
		else if (strcmp(kind, "resize") == 0 &&
				 sscanf(line, "%*s %511s %d %d %511s", file, &w, &h, a) == 4)
			run_resize(file, w, h, a);
		else if (strcmp(kind, "cut") == 0 &&
				 sscanf(line, "%*s %511s %zu %511s", file, &n, a) == 3)
		{
			b[0] = '\0';
			sscanf(line, "%*s %*s %*s %*s %511s", b);
			run_cut(file, n, a, b);
		}
		else
			CHECK(0, "bad manifest line: %s", line);
	}
	fclose(f);
	CHECK(lines > 100, "manifest has only %d checks", lines);
}

/* ---- hostile and edge inputs -------------------------------------------- */

/* Decode bytes; check the status and a well-formed message. */
static void
expect_status(const char *what, const uint8_t *data, size_t size,
			  uint64_t max_pixels, osv_status want, const char *needle)
{
	osv_image	img;
	osv_error	err;
	osv_status	st;

	memset(&err, 0, sizeof(err));
	st = osv_image_decode(data, size, max_pixels, &img, &err);
	CHECK(st == want, "%s: %s (%s), want %s", what, osv_status_name(st),
		  err.message, osv_status_name(want));
	if (st != OSV_OK)
	{
		check_message(&err);
		CHECK(img.rgb == NULL && img.width == 0, "%s: output not empty on error", what);
		if (needle != NULL)
			CHECK(strstr(err.message, needle) != NULL,
				  "%s: message \"%s\" lacks \"%s\"", what, err.message, needle);
	}
	osv_image_free(&img);
}

static uint32_t rng_state = 12345;

/* A small fixed-seed generator (xorshift32). */
static uint32_t
rng(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 17;
	rng_state ^= rng_state << 5;
	return rng_state;
}

/* CRC-32 of PNG chunks, to forge IHDRs. */
static uint32_t
crc32_png(const uint8_t *p, size_t n)
{
	uint32_t	c = 0xffffffffu;

	for (size_t i = 0; i < n; i++)
	{
		c ^= p[i];
		for (int k = 0; k < 8; k++)
			c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1)));
	}
	return c ^ 0xffffffffu;
}

/* A copy of a PNG with its IHDR claiming width x height. */
static uint8_t *
png_with_size(const uint8_t *png, size_t size, uint32_t width, uint32_t height)
{
	uint8_t    *p = malloc(size);
	uint32_t	crc;

	memcpy(p, png, size);
	/* signature (8), length (4), "IHDR" at 12, data at 16 */
	for (int i = 0; i < 4; i++)
	{
		p[16 + i] = (uint8_t) (width >> (24 - 8 * i));
		p[20 + i] = (uint8_t) (height >> (24 - 8 * i));
	}
	crc = crc32_png(p + 12, 4 + 13);
	for (int i = 0; i < 4; i++)
		p[29 + i] = (uint8_t) (crc >> (24 - 8 * i));
	return p;
}

/* Offset of the first SOFn marker of a JPEG, or 0. */
static size_t
find_sof(const uint8_t *d, size_t n)
{
	for (size_t i = 2; i + 9 < n; i++)
		if (d[i] == 0xFF && (d[i + 1] == 0xC0 || d[i + 1] == 0xC1 || d[i + 1] == 0xC2))
			return i;
	return 0;
}

static void
test_hostile(void)
{
	static const uint8_t gif[] = "GIF89a\x01\x00\x01\x00\x80\x00\x00";
	static const uint8_t webp[] = "RIFF\x10\x00\x00\x00WEBPVP8 ";
	uint8_t		junk[4096];
	size_t		jsize,
				psize;
	uint8_t    *jpeg = read_file("test/data/images/jpeg_small_50x37.jpg", &jsize);
	uint8_t    *png = read_file("test/data/images/png_small_37x50.png", &psize);
	uint8_t    *buf;
	osv_image	img;
	osv_error	err;

	CHECK(jpeg != NULL && png != NULL, "cannot read the small test images");
	if (jpeg == NULL || png == NULL)
	{
		free(jpeg);
		free(png);
		return;
	}

	/* nothing, or not an image */
	expect_status("empty", (const uint8_t *) "", 0, 0, OSV_ERR_IMAGE_UNSUPPORTED, "empty");
	expect_status("null data", NULL, 0, 0, OSV_ERR_IMAGE_UNSUPPORTED, NULL);
	CHECK(osv_image_decode(jpeg, jsize, 0, NULL, &err) == OSV_ERR_ARGUMENT,
		  "null output accepted");
	expect_status("gif", gif, sizeof(gif) - 1, 0, OSV_ERR_IMAGE_UNSUPPORTED, "GIF");
	expect_status("webp", webp, sizeof(webp) - 1, 0, OSV_ERR_IMAGE_UNSUPPORTED, "WebP");
	for (size_t i = 0; i < sizeof(junk); i++)
		junk[i] = (uint8_t) rng();
	junk[0] = 'x';
	expect_status("random bytes", junk, sizeof(junk), 0, OSV_ERR_IMAGE_UNSUPPORTED, NULL);
	expect_status("two bytes", junk, 2, 0, OSV_ERR_IMAGE_UNSUPPORTED, NULL);
	junk[0] = 0xFF;
	junk[1] = 0xD8;
	junk[2] = 0xFF;
	expect_status("jpeg signature then noise", junk, sizeof(junk), 0,
				  OSV_ERR_IMAGE_CORRUPT, NULL);
	expect_status("jpeg signature only", junk, 3, 0, OSV_ERR_IMAGE_CORRUPT, NULL);
	memcpy(junk, png, 8);
	expect_status("png signature then noise", junk, sizeof(junk), 0,
				  OSV_ERR_IMAGE_CORRUPT, NULL);
	expect_status("png signature only", junk, 8, 0, OSV_ERR_IMAGE_CORRUPT, NULL);

	/* cut at every 1/50 of the file: a clean error or an image, never a crash */
	for (int k = 0; k < 50; k++)
	{
		size_t		nj = jsize * k / 50,
					np = psize * k / 50;
		uint8_t    *c;

		c = malloc(nj + 1);
		memcpy(c, jpeg, nj);
		if (osv_image_decode(c, nj, 0, &img, &err) != OSV_OK)
			check_message(&err);
		CHECK(nj < 3 || img.rgb == NULL || img.width == 50, "cut jpeg decoded to %dx%d",
			  img.width, img.height);
		osv_image_free(&img);
		free(c);
		c = malloc(np + 1);
		memcpy(c, png, np);
		CHECK(osv_image_decode(c, np, 0, &img, &err) != OSV_OK,
			  "png cut at %zu of %zu decoded", np, psize);
		osv_image_free(&img);
		free(c);
	}

	/* a JPEG whose frame header claims 65000 x 65000 */
	{
		size_t		sof = find_sof(jpeg, jsize);

		CHECK(sof > 0, "no SOF in the small jpeg");
		buf = malloc(jsize);
		memcpy(buf, jpeg, jsize);
		/* FF Cn, length (2), precision (1), height (2), width (2) */
		buf[sof + 5] = 65000 >> 8;
		buf[sof + 6] = 65000 & 0xFF;
		buf[sof + 7] = 65000 >> 8;
		buf[sof + 8] = 65000 & 0xFF;
		expect_status("jpeg 65000x65000", buf, jsize, 0, OSV_ERR_LIMIT, "65000x65000");
		free(buf);
	}

	/* PNGs whose IHDR claims huge sizes */
	buf = png_with_size(png, psize, 100000, 100000);
	expect_status("png 100000x100000", buf, psize, 0, OSV_ERR_LIMIT, NULL);
	free(buf);
	buf = png_with_size(png, psize, 0x7fffffff, 1);
	expect_status("png 2147483647x1", buf, psize, 0, OSV_ERR_LIMIT, NULL);
	free(buf);
	buf = png_with_size(png, psize, 0, 10);
	expect_status("png 0x10", buf, psize, 0, OSV_ERR_IMAGE_CORRUPT, NULL);
	free(buf);

	/* the pixel limit is inclusive */
	expect_status("limit equal", jpeg, jsize, 50 * 37, OSV_OK, NULL);
	expect_status("limit below", jpeg, jsize, 50 * 37 - 1, OSV_ERR_LIMIT,
				  "more than the limit of 1849");
	expect_status("png limit equal", png, psize, 37 * 50, OSV_OK, NULL);
	expect_status("png limit below", png, psize, 37 * 50 - 1, OSV_ERR_LIMIT, NULL);

	/* mutated files: any status, never a crash or a leak */
	{
		const uint8_t *src[2] = {jpeg, png};
		size_t		sizes[2] = {jsize, psize};
		int			ok = 0,
					failed = 0;

		for (int f = 0; f < 2; f++)
			for (int trial = 0; trial < 150; trial++)
			{
				buf = malloc(sizes[f]);
				memcpy(buf, src[f], sizes[f]);
				for (int m = 0; m < 1 + trial % 8; m++)
				{
					size_t		at = 2 + rng() % (sizes[f] - 2);

					buf[at] ^= (uint8_t) (1u << (rng() % 8));
				}
				if (osv_image_decode(buf, sizes[f], 0, &img, &err) == OSV_OK)
				{
					ok++;
					osv_image_free(&img);
				}
				else
				{
					failed++;
					check_message(&err);
				}
				free(buf);
			}
		printf("mutated files: %d decoded, %d rejected\n", ok, failed);
	}

	/* a progressive JPEG with its last scan repeated past the scan cap */
	{
		size_t		size,
					last = 0;
		uint8_t    *prog = read_file("test/data/images/jpeg_gray_progressive_250x410.jpg", &size);

		CHECK(prog != NULL, "cannot read the progressive jpeg");
		if (prog != NULL)
		{
			size_t		scan,
						total,
						at;

			for (size_t i = 2; i + 1 < size; i++)
				if (prog[i] == 0xFF && prog[i + 1] == 0xDA)
					last = i;
			scan = size - 2 - last;
			total = last + scan * 1100 + 2;
			buf = malloc(total);
			memcpy(buf, prog, last);
			at = last;
			for (int r = 0; r < 1100; r++, at += scan)
				memcpy(buf + at, prog + last, scan);
			buf[at] = 0xFF;
			buf[at + 1] = 0xD9;
			expect_status("1100 scans", buf, total, 0, OSV_ERR_LIMIT, "scans");
			free(buf);
			free(prog);
		}
	}

	/* preprocess argument checks */
	CHECK(osv_preprocess(NULL, SIZE, clip_mean, clip_std, NULL, &err) == OSV_ERR_ARGUMENT,
		  "preprocess of nothing accepted");
	CHECK(osv_image_resize(NULL, 10, 10, &img, &err) == OSV_ERR_ARGUMENT,
		  "resize of nothing accepted");

	free(jpeg);
	free(png);
}

static void
print_stats(const char *name, const stats *s)
{
	printf("%s: %ld values, %ld equal (%.4f%%), %ld off by one, %ld worse, max diff %d\n",
		   name, s->total, s->equal, s->total ? 100.0 * s->equal / s->total : 0.0,
		   s->off_by_one, s->worse, s->max_diff);
}

int
main(void)
{
	run_manifest();
	test_hostile();
	print_stats("decode vs Pillow", &decode_stats);
	print_stats("resize vs Pillow", &resize_stats);
	print_stats("preprocess crop vs Pillow", &crop_stats);
	printf("full 224 resizes with Pillow's exact hash: %d of %d\n",
		   resize_hash_equal, resize_hash_total);
	return check_summary("test_image");
}
