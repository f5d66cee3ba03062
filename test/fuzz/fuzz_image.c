/*
 * fuzz_image.c: libFuzzer harness over the image path of the core, the
 * bytes a user passes to geolocate(): osv_image_decode (JPEG/PNG sniffing,
 * libjpeg and libpng under setjmp, conversion to RGB) and then
 * osv_preprocess (bicubic resize, center crop, normalisation) to 224.
 *
 * Invariants checked on every input, beyond what ASan and UBSan catch:
 * a failure leaves a non-empty, NUL-terminated message, a status that is
 * not OSV_OK and an empty image; a success gives an image within the pixel
 * cap whose every byte is readable, and a preprocessed tensor of finite
 * values within the range the normalisation allows.
 *
 * The pixel cap is small (4 megapixels) so that a header claiming a huge
 * size is rejected before the allocation and each input stays fast.
 */
#include "osv5m.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define FUZZ_MAX_PIXELS ((uint64_t) 4 * 1000 * 1000)
#define FUZZ_SIZE 224

static const float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f};
static const float std_[3] = {0.26862954f, 0.26130258f, 0.27577711f};

/* Trap (a crash libFuzzer reports) when a harness invariant breaks. */
#define FUZZ_ASSERT(cond) do { if (!(cond)) __builtin_trap(); } while (0)

/* The error must say something: a status and a terminated message. */
static void
check_error(osv_status status, const osv_error *err)
{
	FUZZ_ASSERT(status != OSV_OK);
	FUZZ_ASSERT(err->status == status);
	FUZZ_ASSERT(memchr(err->message, '\0', sizeof(err->message)) != NULL);
	FUZZ_ASSERT(err->message[0] != '\0');
	FUZZ_ASSERT(memchr(err->detail, '\0', sizeof(err->detail)) != NULL);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	osv_image	image;
	osv_error	err;
	osv_status	status;
	float	   *pixels;
	unsigned	sum = 0;

	memset(&image, 0x5a, sizeof(image));	/* the decoder must reset it */
	memset(&err, 0, sizeof(err));
	status = osv_image_decode(data, size, FUZZ_MAX_PIXELS, &image, &err);
	if (status != OSV_OK)
	{
		check_error(status, &err);
		FUZZ_ASSERT(image.rgb == NULL);
		return 0;
	}

	FUZZ_ASSERT(image.width > 0 && image.height > 0 && image.rgb != NULL);
	FUZZ_ASSERT((uint64_t) image.width * (uint64_t) image.height <= FUZZ_MAX_PIXELS);
	/* read every byte, so that ASan flags a buffer shorter than w x h x 3 */
	for (size_t i = 0; i < (size_t) image.width * image.height * 3; i++)
		sum += image.rgb[i];
	(void) sum;

	pixels = malloc(sizeof(float) * 3 * FUZZ_SIZE * FUZZ_SIZE);
	if (pixels == NULL)
	{
		osv_image_free(&image);
		return 0;
	}
	memset(&err, 0, sizeof(err));
	status = osv_preprocess(&image, FUZZ_SIZE, mean, std_, pixels, &err);
	if (status != OSV_OK)
		check_error(status, &err);
	else
	{
		/* (0 - 0.49) / 0.26 > -1.9 and (1 - 0.40) / 0.26 < 2.2 */
		for (size_t i = 0; i < 3 * FUZZ_SIZE * FUZZ_SIZE; i++)
			FUZZ_ASSERT(isfinite(pixels[i]) && pixels[i] > -2.0f && pixels[i] < 2.5f);
	}
	free(pixels);
	osv_image_free(&image);
	return 0;
}
