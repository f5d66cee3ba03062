/*
 * decode.c: JPEG and PNG bytes to an 8-bit RGB image, pixel for pixel as
 * PIL.Image.open(f).convert("RGB") gives it (Pillow 9.4, the reference of
 * the model's test transform).
 *
 * The format is sniffed from the first bytes, never from a name.  JPEG goes
 * through libjpeg-turbo with its default settings (islow IDCT, fancy
 * upsampling), as Pillow does; PNG through libpng with no colour transforms
 * at all, because Pillow unpacks PNG samples itself and its rules (16-bit
 * samples keep only their high byte, 16-bit grey is clipped, missing palette
 * entries are a grey ramp) are not libpng's.
 *
 * Invariants:
 *  - width x height is checked against max_pixels right after the header,
 *    before any allocation that grows with the image;
 *  - both codecs report errors by longjmp: each decoder is created, caught
 *    with setjmp and destroyed in the same function, and every buffer is
 *    freed on every path;
 *  - codec warnings are counted, never printed;
 *  - data that ends before the last pixel row is an error, as in Pillow
 *    without LOAD_TRUNCATED_IMAGES; data that ends after it is accepted.
 */
#include "internal.h"

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>
#include <png.h>

/* Hostile progressive JPEGs can hold thousands of tiny scans, each a full
 * pass over the coefficients: stop long before that burns real CPU time. */
#define OSV_JPEG_MAX_SCANS 1000

static const uint8_t png_signature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};

/* Fill *out with an empty image. */
static void
image_clear(osv_image *out)
{
	out->width = 0;
	out->height = 0;
	out->rgb = NULL;
}

void
osv_image_free(osv_image *image)
{
	if (image == NULL)
		return;
	free(image->rgb);
	image_clear(image);
}

/* Check width x height from a header against the pixel limit. */
static osv_status
check_pixels(const char *what, uint64_t width, uint64_t height,
			 uint64_t max_pixels, osv_error *err)
{
	if (width == 0 || height == 0)
		return osv_fail(err, OSV_ERR_IMAGE_CORRUPT,
						"%s image has zero size (%llux%llu)", what,
						(unsigned long long) width, (unsigned long long) height);
	/* both are below 2^32, so the product cannot overflow 64 bits */
	if (width * height > max_pixels)
		return osv_fail(err, OSV_ERR_LIMIT,
						"image is %llux%llu pixels, more than the limit of %llu",
						(unsigned long long) width, (unsigned long long) height,
						(unsigned long long) max_pixels);
	return OSV_OK;
}

/* malloc width x height x 3 bytes, with overflow checks. */
static uint8_t *
alloc_rgb(int width, int height)
{
	size_t		n;

	if (!osv_mul_size((size_t) width, (size_t) height, &n) ||
		!osv_mul_size(n, 3, &n))
		return NULL;
	return malloc(n);
}

/* ---- JPEG ------------------------------------------------------------- */

typedef struct jpeg_guard
{
	struct jpeg_error_mgr pub;	/* must be first: libjpeg casts to it */
	jmp_buf		jump;
	char		message[JMSG_LENGTH_MAX];
	int			warnings;
	bool		too_many_scans;
} jpeg_guard;

typedef struct jpeg_source
{
	struct jpeg_source_mgr pub; /* must be first */
	bool		rows_done;		/* every scanline has been read */
	bool		truncated;		/* the data ended before the last row */
} jpeg_source;

/* libjpeg's fatal error: keep its text and jump back to the decoder's owner. */
static void
jpeg_guard_error_exit(j_common_ptr cinfo)
{
	jpeg_guard *guard = (jpeg_guard *) cinfo->err;

	(*cinfo->err->format_message) (cinfo, guard->message);
	longjmp(guard->jump, 1);
}

/* Warnings (msg_level -1) are counted; trace messages are dropped. */
static void
jpeg_guard_emit_message(j_common_ptr cinfo, int msg_level)
{
	jpeg_guard *guard = (jpeg_guard *) cinfo->err;

	if (msg_level < 0)
		guard->warnings++;
}

/* Never print: the core does not own stderr. */
static void
jpeg_guard_output_message(j_common_ptr cinfo)
{
	(void) cinfo;
}

/* Cap the number of scans of multi-scan (progressive) files. */
static void
jpeg_guard_progress(j_common_ptr cinfo)
{
	j_decompress_ptr dinfo = (j_decompress_ptr) cinfo;
	jpeg_guard *guard = (jpeg_guard *) cinfo->err;

	if (dinfo->input_scan_number > OSV_JPEG_MAX_SCANS)
	{
		guard->too_many_scans = true;
		snprintf(guard->message, sizeof(guard->message),
				 "scan %d of a progressive image", dinfo->input_scan_number);
		longjmp(guard->jump, 1);
	}
}

static void
jpeg_source_init(j_decompress_ptr cinfo)
{
	(void) cinfo;
}

/*
 * The whole file is in the buffer from the start, so being asked for more
 * means the data ended early.  Before the last row that is a truncated image
 * (Pillow raises "image file is truncated"); after it, libjpeg is only
 * looking for EOI, and a fake EOI lets it finish as Pillow does.
 */
static boolean
jpeg_source_fill(j_decompress_ptr cinfo)
{
	static const JOCTET eoi[2] = {0xFF, JPEG_EOI};
	jpeg_source *src = (jpeg_source *) cinfo->src;

	if (!src->rows_done)
	{
		src->truncated = true;
		ERREXIT(cinfo, JERR_INPUT_EOF);
	}
	src->pub.next_input_byte = eoi;
	src->pub.bytes_in_buffer = 2;
	return TRUE;
}

/* Skip marker data; skipping past the end is the same as running out. */
static void
jpeg_source_skip(j_decompress_ptr cinfo, long num_bytes)
{
	jpeg_source *src = (jpeg_source *) cinfo->src;

	if (num_bytes <= 0)
		return;
	while ((size_t) num_bytes > src->pub.bytes_in_buffer)
	{
		num_bytes -= (long) src->pub.bytes_in_buffer;
		(void) jpeg_source_fill(cinfo);
	}
	src->pub.next_input_byte += num_bytes;
	src->pub.bytes_in_buffer -= num_bytes;
}

static void
jpeg_source_term(j_decompress_ptr cinfo)
{
	(void) cinfo;
}

/*
 * Pillow's CMYK to RGB.  Pillow reads 4-component JPEGs with the "CMYK;I"
 * raw mode (Adobe's inverted CMYK, assumed for every file), so the values
 * it converts are 255 - v; its convert() then computes, for each of C, M, Y,
 * nk - round(c * nk / 255) with nk = 255 - K and Pillow's MULDIV255 rounding.
 */
static void
cmyk_row_to_rgb(const uint8_t *in, uint8_t *out, int width)
{
	for (int x = 0; x < width; x++, in += 4, out += 3)
	{
		int			nk = in[3];		/* 255 - (255 - k) */

		for (int c = 0; c < 3; c++)
		{
			int			t = (255 - in[c]) * nk + 128;

			int			v = nk - (((t >> 8) + t) >> 8);

			out[c] = (uint8_t) (v < 0 ? 0 : v); /* Pillow's CLIP8 */
		}
	}
}

/* Decode a JPEG held in data[0..size) into *out. */
static osv_status
decode_jpeg(const uint8_t *data, size_t size, uint64_t max_pixels,
			osv_image *out, osv_error *err)
{
	struct jpeg_decompress_struct cinfo;
	jpeg_guard	guard;
	jpeg_source src;
	struct jpeg_progress_mgr progress;

	/*
	 * volatile: these change between setjmp and a possible longjmp, and the
	 * handler reads them to free what was allocated.  Without it their values
	 * after the jump would be indeterminate (C11 7.13.2.1).
	 */
	uint8_t    *volatile rgb = NULL;
	uint8_t    *volatile row = NULL;
	volatile bool header_done = false;

	/* zeroed, so that the handler can destroy it even if creation failed */
	memset(&cinfo, 0, sizeof(cinfo));
	memset(&guard, 0, sizeof(guard));
	memset(&src, 0, sizeof(src));
	cinfo.err = jpeg_std_error(&guard.pub);
	guard.pub.error_exit = jpeg_guard_error_exit;
	guard.pub.emit_message = jpeg_guard_emit_message;
	guard.pub.output_message = jpeg_guard_output_message;

	if (setjmp(guard.jump))
	{
		/* longjmp from libjpeg, the source manager or the progress monitor */
		jpeg_destroy_decompress(&cinfo);
		free(rgb);
		free(row);
		if (guard.too_many_scans)
			return osv_fail(err, OSV_ERR_LIMIT,
							"progressive jpeg image has more than %d scans",
							OSV_JPEG_MAX_SCANS);
		if (src.truncated)
			osv_fail(err, OSV_ERR_IMAGE_CORRUPT, "jpeg image is truncated");
		else if (!header_done)
			osv_fail(err, OSV_ERR_IMAGE_CORRUPT, "invalid jpeg header");
		else
			osv_fail(err, OSV_ERR_IMAGE_CORRUPT, "invalid jpeg image data");
		osv_fail_detail(err, "%s", guard.message);
		return OSV_ERR_IMAGE_CORRUPT;
	}

	jpeg_create_decompress(&cinfo);
	src.pub.init_source = jpeg_source_init;
	src.pub.fill_input_buffer = jpeg_source_fill;
	src.pub.skip_input_data = jpeg_source_skip;
	src.pub.resync_to_restart = jpeg_resync_to_restart;
	src.pub.term_source = jpeg_source_term;
	src.pub.next_input_byte = data;
	src.pub.bytes_in_buffer = size;
	cinfo.src = &src.pub;
	memset(&progress, 0, sizeof(progress));
	progress.progress_monitor = jpeg_guard_progress;
	cinfo.progress = &progress;

	(void) jpeg_read_header(&cinfo, TRUE);
	header_done = true;

	/* the pixel limit, before libjpeg allocates anything image-sized */
	{
		osv_status	status = check_pixels("jpeg", cinfo.image_width,
										  cinfo.image_height, max_pixels, err);

		if (status != OSV_OK)
		{
			jpeg_destroy_decompress(&cinfo);
			return status;
		}
	}
	if (cinfo.data_precision != 8)
	{
		jpeg_destroy_decompress(&cinfo);
		return osv_fail(err, OSV_ERR_IMAGE_UNSUPPORTED,
						"%d-bit jpeg images are not supported",
						cinfo.data_precision);
	}

	/* Pillow's modes by component count: L, RGB, CMYK ("CMYK;I" raw mode) */
	switch (cinfo.num_components)
	{
		case 1:
			cinfo.out_color_space = JCS_GRAYSCALE;
			break;
		case 3:
			cinfo.out_color_space = JCS_RGB;
			break;
		case 4:
			cinfo.out_color_space = JCS_CMYK;
			break;
		default:
			jpeg_destroy_decompress(&cinfo);
			return osv_fail(err, OSV_ERR_IMAGE_UNSUPPORTED,
							"jpeg images with %d color components are not supported",
							cinfo.num_components);
	}

	(void) jpeg_start_decompress(&cinfo);

	{
		int			width = (int) cinfo.output_width;
		int			height = (int) cinfo.output_height;
		int			comps = cinfo.output_components;
		size_t		row_bytes;

		rgb = alloc_rgb(width, height);
		if (comps != 3 && osv_mul_size((size_t) width, 4, &row_bytes))
			row = malloc(row_bytes);
		if (rgb == NULL || (comps != 3 && row == NULL))
		{
			jpeg_destroy_decompress(&cinfo);
			free(rgb);
			free(row);
			return osv_fail(err, OSV_ERR_NOMEM,
							"out of memory decoding a %dx%d jpeg image",
							width, height);
		}

		while (cinfo.output_scanline < cinfo.output_height)
		{
			int			y = (int) cinfo.output_scanline;
			uint8_t    *dst = rgb + (size_t) y * width * 3;
			JSAMPROW	line = comps == 3 ? dst : row;

			(void) jpeg_read_scanlines(&cinfo, &line, 1);
			if (comps == 1)
			{
				for (int x = 0; x < width; x++)
					dst[3 * x] = dst[3 * x + 1] = dst[3 * x + 2] = row[x];
			}
			else if (comps == 4)
				cmyk_row_to_rgb(row, dst, width);
		}
		src.rows_done = true;

		/* errors in trailing data still fail, as they do in Pillow */
		(void) jpeg_finish_decompress(&cinfo);
		jpeg_destroy_decompress(&cinfo);
		free(row);
		out->width = width;
		out->height = height;
		out->rgb = rgb;
	}
	return OSV_OK;
}

/* ---- PNG -------------------------------------------------------------- */

typedef struct png_guard
{
	const uint8_t *data;
	size_t		size;
	size_t		pos;
	bool		truncated;
	bool		trickle;		/* retrying a truncated file: see decode_png */
	bool		over_limit;		/* libpng rejected a side as over the user limit */
	int			warnings;
	char		message[256];
	/* Pillow's palette; here because the longjmp handler reads it */
	uint8_t		palette[256 * 3];
} png_guard;

/* libpng's fatal error: keep its text and jump back (via png_jmpbuf). */
static void
png_guard_error(png_structp png, png_const_charp msg)
{
	png_guard  *guard = png_get_error_ptr(png);

	snprintf(guard->message, sizeof(guard->message), "%s", msg);
	png_longjmp(png, 1);
}

/* Warnings are counted, never printed. */
static void
png_guard_warning(png_structp png, png_const_charp msg)
{
	png_guard  *guard = png_get_error_ptr(png);

	/* png_check_IHDR warns about each bad field, then fails "Invalid IHDR" */
	if (strstr(msg, "exceeds user limit") != NULL)
		guard->over_limit = true;
	guard->warnings++;
}

/* Read from the in-memory buffer; running out is a truncated file. */
static void
png_guard_read(png_structp png, png_bytep dst, size_t n)
{
	png_guard  *guard = png_get_io_ptr(png);

	if (n > guard->size - guard->pos)
	{
		guard->truncated = true;
		png_error(png, "unexpected end of data");
	}
	memcpy(dst, guard->data + guard->pos, n);
	guard->pos += n;
}

/* Bytes left in the file under which a retry reads IDAT byte by byte. */
#define PNG_TRICKLE_TAIL (1024 * 1024)

/* After each row: near the end of a truncated file, inflate byte by byte. */
static void
png_guard_row_done(png_structp png, png_uint_32 row, int pass)
{
	png_guard  *guard = png_get_io_ptr(png);

	(void) row;
	(void) pass;
	if (guard->trickle && guard->size - guard->pos < PNG_TRICKLE_TAIL)
		png_set_compression_buffer_size(png, 1);
}

/*
 * Convert one row of raw PNG samples (bit depths below 8 already unpacked to
 * one byte per sample) to RGB with Pillow's rules for each PNG type.
 */
static void
png_row_to_rgb(const uint8_t *in, uint8_t *out, int width, int color_type,
			   int bit_depth, const uint8_t *palette)
{
	int			b = bit_depth == 16 ? 2 : 1;	/* bytes per sample */

	for (int x = 0; x < width; x++, out += 3)
	{
		switch (color_type)
		{
			case PNG_COLOR_TYPE_GRAY:
			case PNG_COLOR_TYPE_GRAY_ALPHA:
				{
					int			v;

					if (bit_depth == 16 && color_type == PNG_COLOR_TYPE_GRAY)
					{
						/* mode "I", clipped to 0..255 by Pillow's convert */
						v = (in[0] << 8) | in[1];
						if (v > 255)
							v = 255;
					}
					else if (bit_depth == 16)
						v = in[0];	/* "LA;16B": high byte */
					else if (bit_depth == 1)
						v = in[0] ? 255 : 0;	/* mode "1" */
					else if (bit_depth == 2)
						v = in[0] * 0x55;
					else if (bit_depth == 4)
						v = in[0] * 0x11;
					else
						v = in[0];
					out[0] = out[1] = out[2] = (uint8_t) v;
					in += color_type == PNG_COLOR_TYPE_GRAY ? b : 2 * b;
					break;
				}
			case PNG_COLOR_TYPE_PALETTE:
				memcpy(out, palette + 3 * in[0], 3);
				in += 1;
				break;
			case PNG_COLOR_TYPE_RGB:
			case PNG_COLOR_TYPE_RGB_ALPHA:
				/* 16-bit samples keep their high (first) byte; alpha is dropped */
				out[0] = in[0];
				out[1] = in[b];
				out[2] = in[2 * b];
				in += (color_type == PNG_COLOR_TYPE_RGB ? 3 : 4) * b;
				break;
		}
	}
}

/* Convert n raw rows (rows[0..n)) into rows first.. of the RGB image. */
static void
png_rows_to_rgb(png_bytep *rows, int first, int n, uint8_t *rgb, int width,
				int color_type, int bit_depth, const uint8_t *palette)
{
	for (int i = 0; i < n; i++)
		png_row_to_rgb(rows[i], rgb + (size_t) (first + i) * width * 3, width,
					   color_type, bit_depth, palette);
}

/* The big-endian 32-bit value at p. */
static uint32_t
be32(const uint8_t *p)
{
	return ((uint32_t) p[0] << 24) | ((uint32_t) p[1] << 16) |
		((uint32_t) p[2] << 8) | p[3];
}

/*
 * Decode a PNG held in data[0..size) into *out.
 *
 * trickle: near the end of the data, feed IDAT to zlib one byte at a time.
 * libpng normally reads IDAT in blocks of 8 KB, so a file cut short fails on
 * the block even when every row is inside the bytes that are there; Pillow
 * inflates what it has and succeeds.  The caller retries with trickle set
 * when *cut_in_data says the data ended after the header.  Byte by byte is
 * slow (about 50 ns a byte), hence only in the last PNG_TRICKLE_TAIL bytes;
 * a single row of more compressed data than that could still fail where
 * Pillow succeeds.
 */
static osv_status
decode_png(const uint8_t *data, size_t size, uint64_t max_pixels, bool trickle,
		   bool *cut_in_data, osv_image *out, osv_error *err)
{
	/* ancillary chunks Pillow does not need for pixels: never decompress them */
	static const png_byte ignored_chunks[] =
		"iCCP\0iTXt\0tEXt\0zTXt\0sPLT\0eXIf\0hIST\0pCAL\0sCAL\0sTER\0tIME\0";
	png_guard	guard;
	png_structp png;
	png_infop	info;

	/*
	 * volatile: assigned after setjmp and read by the handler after a
	 * longjmp, so they must not live in registers (C11 7.13.2.1).
	 */
	uint8_t    *volatile rgb = NULL;
	uint8_t    *volatile raw = NULL;
	png_bytep  *volatile rows = NULL;
	volatile bool header_done = false;
	volatile bool interlaced = false;
	volatile int height_v = 0;

	memset(&guard, 0, sizeof(guard));
	guard.data = data;
	guard.size = size;
	guard.trickle = trickle;
	*cut_in_data = false;

	png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &guard,
								 png_guard_error, png_guard_warning);
	if (png == NULL)
		return osv_fail(err, OSV_ERR_NOMEM, "out of memory creating a png decoder");
	info = png_create_info_struct(png);
	if (info == NULL)
	{
		png_destroy_read_struct(&png, NULL, NULL);
		return osv_fail(err, OSV_ERR_NOMEM, "out of memory creating a png decoder");
	}

	if (setjmp(png_jmpbuf(png)))
	{
		/*
		 * Pillow stops once every row is decoded, so an error after that (the
		 * zlib checksum, a truncated IEND) does not spoil the image.  libpng
		 * copies a row out before it finishes the row (and then the IDAT
		 * stream), so the pass and row counters tell whether all rows are in.
		 */
		bool		all_rows;

		if (interlaced)
			all_rows = png_get_current_pass_number(png) >= 7;
		else
			all_rows = png_get_current_row_number(png) >= (png_uint_32) height_v;
		if (rgb != NULL && height_v > 0 && all_rows)
		{
			int			width = (int) png_get_image_width(png, info);
			int			color_type = png_get_color_type(png, info);
			int			bit_depth = png_get_bit_depth(png, info);

			if (interlaced)
				png_rows_to_rgb(rows, 0, height_v, rgb, width, color_type,
								bit_depth, guard.palette);
			else
			{
				/* only the last row is still waiting in raw */
				png_bytep	last = raw;

				png_rows_to_rgb(&last, height_v - 1, 1, rgb, width, color_type,
								bit_depth, guard.palette);
			}
			out->width = width;
			out->height = height_v;
			out->rgb = rgb;
			png_destroy_read_struct(&png, &info, NULL);
			free(raw);
			free(rows);
			return OSV_OK;
		}
		png_destroy_read_struct(&png, &info, NULL);
		free(rgb);
		free(raw);
		free(rows);
		if (guard.over_limit && size >= 24 && memcmp(data + 12, "IHDR", 4) == 0)
			return osv_fail(err, OSV_ERR_LIMIT,
							"image is %lux%lu pixels, more than the limit of %llu",
							(unsigned long) be32(data + 16),
							(unsigned long) be32(data + 20),
							(unsigned long long) max_pixels);
		if (guard.truncated)
		{
			*cut_in_data = header_done;
			osv_fail(err, OSV_ERR_IMAGE_CORRUPT, "png image is truncated");
		}
		else if (!header_done)
			osv_fail(err, OSV_ERR_IMAGE_CORRUPT, "invalid png header");
		else
			osv_fail(err, OSV_ERR_IMAGE_CORRUPT, "invalid png image data");
		osv_fail_detail(err, "%s", guard.message);
		return OSV_ERR_IMAGE_CORRUPT;
	}

	png_set_read_fn(png, &guard, png_guard_read);
	/* each side alone may not exceed the pixel cap (PNG allows 2^31 - 1) */
	{
		uint64_t	cap = max_pixels < 0x7fffffff ? max_pixels : 0x7fffffff;

		png_set_user_limits(png, (png_uint_32) cap, (png_uint_32) cap);
	}
	png_set_keep_unknown_chunks(png, PNG_HANDLE_CHUNK_NEVER, ignored_chunks,
								(int) (sizeof(ignored_chunks) / 5));
	if (trickle)
	{
		png_set_read_status_fn(png, png_guard_row_done);
		if (size < PNG_TRICKLE_TAIL)
			png_set_compression_buffer_size(png, 1);
	}
	png_read_info(png, info);
	header_done = true;

	{
		png_uint_32 width = png_get_image_width(png, info);
		png_uint_32 height = png_get_image_height(png, info);
		int			bit_depth = png_get_bit_depth(png, info);
		int			color_type = png_get_color_type(png, info);
		int			passes = 1;
		size_t		rowbytes;
		size_t		expected;
		int			channels;

		osv_status	status = check_pixels("png", width, height, max_pixels, err);

		if (status != OSV_OK)
		{
			png_destroy_read_struct(&png, &info, NULL);
			return status;
		}

		/* Pillow's palette: PLTE, then a grey ramp for entries it lacks */
		for (int i = 0; i < 256; i++)
			guard.palette[3 * i] = guard.palette[3 * i + 1] =
				guard.palette[3 * i + 2] = (uint8_t) i;
		if (color_type == PNG_COLOR_TYPE_PALETTE)
		{
			png_colorp plte = NULL;
			int			num = 0;

			if (png_get_PLTE(png, info, &plte, &num) == 0)
				png_error(png, "palette image without PLTE chunk");
			for (int i = 0; i < num && i < 256; i++)
			{
				guard.palette[3 * i] = plte[i].red;
				guard.palette[3 * i + 1] = plte[i].green;
				guard.palette[3 * i + 2] = plte[i].blue;
			}
		}

		/* no colour transforms: only one byte per sample below 8 bits */
		if (bit_depth < 8)
			png_set_packing(png);
		if (png_get_interlace_type(png, info) != PNG_INTERLACE_NONE)
		{
			passes = png_set_interlace_handling(png);
			interlaced = true;
		}
		png_read_update_info(png, info);

		channels = png_get_channels(png, info);
		rowbytes = png_get_rowbytes(png, info);
		if (!osv_mul_size(width, (size_t) channels * (bit_depth == 16 ? 2 : 1),
						  &expected) || rowbytes != expected)
			png_error(png, "unexpected row layout");

		rgb = alloc_rgb((int) width, (int) height);
		if (rgb == NULL)
			goto nomem;
		height_v = (int) height;

		if (!interlaced)
		{
			raw = malloc(rowbytes);
			if (raw == NULL)
				goto nomem;
			for (png_uint_32 y = 0; y < height; y++)
			{
				png_bytep	one = raw;

				png_read_row(png, raw, NULL);
				png_rows_to_rgb(&one, (int) y, 1, rgb, (int) width, color_type,
								bit_depth, guard.palette);
			}
		}
		else
		{
			size_t		total;

			/* Adam7 fills rows over seven passes: keep the whole raw image */
			if (!osv_mul_size(rowbytes, height, &total))
				goto nomem;
			raw = malloc(total);
			rows = malloc(sizeof(png_bytep) * height);
			if (raw == NULL || rows == NULL)
				goto nomem;
			for (png_uint_32 y = 0; y < height; y++)
				rows[y] = raw + (size_t) y * rowbytes;
			for (int pass = 0; pass < passes; pass++)
				for (png_uint_32 y = 0; y < height; y++)
					png_read_row(png, rows[y], NULL);
			png_rows_to_rgb(rows, 0, (int) height, rgb, (int) width, color_type,
							bit_depth, guard.palette);
		}

		/* no png_read_end: Pillow ignores what follows the image data */
		png_destroy_read_struct(&png, &info, NULL);
		free(raw);
		free(rows);
		out->width = (int) width;
		out->height = (int) height;
		out->rgb = rgb;
		return OSV_OK;
	}

nomem:
	{
		int			w = (int) png_get_image_width(png, info);

		png_destroy_read_struct(&png, &info, NULL);
		free(rgb);
		free(raw);
		free(rows);
		return osv_fail(err, OSV_ERR_NOMEM,
						"out of memory decoding a %dx%d png image", w, height_v);
	}
}

/* ---- sniffing and the entry point ------------------------------------- */

/* A name for bytes that are neither JPEG nor PNG, or NULL. */
static const char *
sniff_other(const uint8_t *d, size_t n)
{
	if (n >= 6 && (memcmp(d, "GIF87a", 6) == 0 || memcmp(d, "GIF89a", 6) == 0))
		return "GIF";
	if (n >= 12 && memcmp(d, "RIFF", 4) == 0 && memcmp(d + 8, "WEBP", 4) == 0)
		return "WebP";
	if (n >= 4 && (memcmp(d, "II*\0", 4) == 0 || memcmp(d, "MM\0*", 4) == 0))
		return "TIFF";
	if (n >= 12 && memcmp(d + 4, "ftyp", 4) == 0)
	{
		if (memcmp(d + 8, "avif", 4) == 0 || memcmp(d + 8, "avis", 4) == 0)
			return "AVIF";
		if (memcmp(d + 8, "hei", 3) == 0 || memcmp(d + 8, "mif1", 4) == 0 ||
			memcmp(d + 8, "msf1", 4) == 0 || memcmp(d + 8, "hev", 3) == 0)
			return "HEIF";
		return "an ISO media file";
	}
	if (n >= 2 && d[0] == 'B' && d[1] == 'M')
		return "BMP";
	if (n >= 12 && memcmp(d, "\0\0\0\x0cjP  \r\n\x87\n", 12) == 0)
		return "JPEG 2000";
	if ((n >= 2 && d[0] == 0xFF && d[1] == 0x0A) ||
		(n >= 12 && memcmp(d, "\0\0\0\x0cJXL \r\n\x87\n", 12) == 0))
		return "JPEG XL";
	if (n >= 5 && memcmp(d, "%PDF-", 5) == 0)
		return "PDF";
	return NULL;
}

osv_status
osv_image_decode(const uint8_t *data, size_t size, uint64_t max_pixels,
				 osv_image *out, osv_error *err)
{
	const char *other;

	if (out == NULL || (data == NULL && size > 0))
		return osv_fail(err, OSV_ERR_ARGUMENT, "osv_image_decode: null argument");
	image_clear(out);
	/* 0 means "no setting": the default cap, never "unlimited" */
	if (max_pixels == 0)
		max_pixels = OSV_DEFAULT_MAX_PIXELS;

	if (size == 0)
		return osv_fail(err, OSV_ERR_IMAGE_UNSUPPORTED, "image data is empty");
	if (size >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF)
		return decode_jpeg(data, size, max_pixels, out, err);
	if (size >= sizeof(png_signature) &&
		memcmp(data, png_signature, sizeof(png_signature)) == 0)
	{
		bool		cut_in_data;
		osv_status	status = decode_png(data, size, max_pixels, false,
										&cut_in_data, out, err);

		/* only a file cut inside its image data is worth the slow retry */
		if (status == OSV_ERR_IMAGE_CORRUPT && cut_in_data)
			status = decode_png(data, size, max_pixels, true, &cut_in_data,
								out, err);
		return status;
	}

	other = sniff_other(data, size);
	if (other != NULL)
		return osv_fail(err, OSV_ERR_IMAGE_UNSUPPORTED,
						"image format not recognized: %s is not supported, only JPEG and PNG",
						other);
	if (size < 8)
		return osv_fail(err, OSV_ERR_IMAGE_UNSUPPORTED,
						"image format not recognized: %zu bytes are too few for a JPEG or PNG",
						size);
	return osv_fail(err, OSV_ERR_IMAGE_UNSUPPORTED,
					"image format not recognized: not a JPEG or PNG");
}
