/*
 * osv5m.c: the osv5m command-line tool over the inference core.
 *
 *   osv5m geolocate --model DIR [--quadtree CSV] [--top K] [--threads N]
 *                   [--max-pixels N] [--batch N] [--precision P] [--feature]
 *                   FILE...
 *       one JSON object per line and file:
 *       {"file":F,"lat":D,"lon":D,"cell":I,"probability":D[,"top":[
 *        {"cell":I,"probability":D,"lat":D,"lon":D},...]][,"feature":[F32,...]]}
 *       ("top" only with --top K, K >= 1; the default 0 omits it; "feature",
 *       the hidden_size image feature, only with --feature), or for
 *       a file that fails
 *       {"file":F,"error":MESSAGE,"status":STATUS[,"detail":TEXT]}
 *       where STATUS is osv_status_name(), e.g. "corrupt image".
 *   osv5m embed --model DIR [...] FILE...
 *       {"file":F,"embedding":[F32,...]} (the hidden_size feature)
 *   osv5m info --model DIR [--quadtree CSV] [--threads N] [--no-fingerprint]
 *              [--pack-cache DIR [--precision P]]
 *       one JSON object: the model's shapes, dtype, cells, file size,
 *       parameters, GFLOP per image, paths, the weights file's format and
 *       SHA-256 ("fingerprint", what sha256sum prints), where the cells
 *       came from, kernels and threads, which precisions this CPU runs
 *       natively ("precisions_native":{"fp32":true,"bf16":B,"int8":B}) and
 *       the pack cache files in use ("pack_cache_path",
 *       "pack_cache_path_bf16", "pack_cache_path_int8"; "" when none:
 *       --pack-cache opens the one of --precision)
 *   osv5m convert --model DIR [--quadtree CSV] --out DIR2
 *       writes the model as DIR2/model.safetensors (F32), config.json and
 *       quadtree_10_1000.csv; DIR2 gives bit-identical predictions
 *   osv5m bench --model DIR [--iters N] [--warmup N] [--threads N]
 *               [--batch N] [--precision P] [--json] FILE...
 *       runs every file N times (after W unmeasured warm-up runs, default 1)
 *       and prints the median seconds per image of each stage and the
 *       GFLOP/s reached.  With --batch B the files go through the network B
 *       at a time (osv_run_images) and each run's sample is its seconds
 *       divided by its images.  With --json, one object:
 *       {"model":DIR,"kernels":S,"precision":S,"native":B,"threads":I,
 *        "batch":I,"iters":I,"files":I,"runs":I,
 *        "gflop_per_image":D,
 *        "median_s":{"decode":D,"preprocess":D,"backbone":D,"head":D,"total":D},
 *        "min_s":{...same keys...},
 *        "gflops":D,          gflop_per_image / median total
 *        "backbone_gflops":D} backbone GFLOP (all but the MLP branches) /
 *                             median backbone
 *       Both rates use the model's nominal FLOPs; the last transformer block
 *       computes only the class token past its keys and values, about 3.5 %
 *       fewer FLOPs on ViT-L/14, so the rates overstate by that much.
 *
 * Doubles are printed with %.17g, floats with %.9g (both round-trip); NaN
 * and infinities as null.  File names are JSON-escaped (invalid UTF-8 bytes
 * become U+FFFD).  --batch B (default 1) runs the network on B images at
 * once: faster per image, and the same results bit for bit (see
 * src/core/gemm.c).  --precision P (geolocate, embed, bench; default
 * fp32) is the arithmetic of the products with weights, osv_precision:
 * "bf16" and "int8" change the results (see osv5m.h).  Exit
 * status: 0, 1 when any file failed, 2 on a usage or
 * model error (with a message on stderr).  --threads defaults to the
 * number of online CPUs.
 */
#include "osv5m.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define EXIT_FILE_FAILED 1
#define EXIT_USAGE 2

/*
 * Refuse image files larger than this before reading them (1 GiB).  Image
 * files are read with osv_read_file, which refuses FIFOs and devices without
 * blocking on them, as the model's files are.
 */
#define MAX_FILE_BYTES ((size_t) 1 << 30)

typedef struct options
{
	const char *model_dir;
	const char *quadtree;
	int			top;
	int			threads;
	uint64_t	max_pixels;
	int			iters;
	int			warmup;
	int			batch;			/* images per run of the network */
	bool		json;
	bool		no_fingerprint;
	bool		feature;		/* geolocate: print each file's feature too */
	osv_precision precision;	/* of the products with weights */
	const char *out_dir;		/* convert */
	const char *pack_cache;		/* directory of the pack cache, or NULL */
} options;

static const char *const usage_text =
"usage: osv5m COMMAND --model DIR [OPTIONS] [FILE...]\n"
"\n"
"Geolocate photos with the OSV-5M baseline model.\n"
"\n"
"commands:\n"
"  geolocate   print the predicted latitude and longitude of each FILE (JSON lines)\n"
"  embed       print the image feature of each FILE (JSON lines)\n"
"  info        print the model's shapes, settings and fingerprint (JSON)\n"
"  convert     write the model as model.safetensors + config.json + quadtree CSV\n"
"  bench       time the stages over FILE...\n"
"\n"
"Run 'osv5m COMMAND --help' for the options of a command.\n";

/* Print the help of command (NULL: the general one) to out. */
static void
print_usage(FILE *out, const char *command)
{
	if (command == NULL)
	{
		fputs(usage_text, out);
		return;
	}
	if (strcmp(command, "geolocate") == 0)
		fputs("usage: osv5m geolocate --model DIR [--quadtree CSV] [--top K] [--threads N]\n"
			  "                       [--max-pixels N] [--batch N] [--pack-cache DIR]\n"
			  "                       [--precision fp32|bf16|int8] [--feature] FILE...\n"
			  "\n"
			  "Prints one JSON object per file: file, lat, lon (degrees), cell, probability,\n"
			  "with --top K the K most likely cells with their own regressed points, and\n"
			  "with --feature the image feature (as embed prints it).\n"
			  "A file that cannot be read or decoded prints file, error and status; the\n"
			  "exit status is then 1.\n"
			  "\n"
			  "  --model DIR       model directory (model.safetensors, config.json, quadtree)\n"
			  "  --quadtree CSV    quadtree file, instead of the one in DIR\n"
			  "  --top K           also print the K most likely cells (default 0: none)\n"
			  "  --threads N       threads (default: all CPUs)\n"
			  "  --max-pixels N    refuse images of more than N pixels (default 50000000)\n"
			  "  --batch N         run the network on N images at a time (default 1)\n"
			  "  --pack-cache DIR  read the weights packed for the kernels from DIR (a\n"
			  "                    directory of this user, writable by no one else),\n"
			  "                    writing them there first when missing\n"
			  "  --precision P     fp32 (default); bf16: the weights and the inputs of the\n"
			  "                    patch embedding and the blocks' linear layers rounded to\n"
			  "                    bfloat16, sums in float32; int8: those of the blocks'\n"
			  "                    linear layers quantized to 8 bits per row, sums in\n"
			  "                    integers.  Both change the results, and run natively\n"
			  "                    where the CPU has AVX512_BF16 or AVX512_VNNI (osv5m\n"
			  "                    info: precisions_native), else emulated, same bits\n"
			  "  --feature         also print the feature (needs --batch 1)\n",
			  out);
	else if (strcmp(command, "embed") == 0)
		fputs("usage: osv5m embed --model DIR [--quadtree CSV] [--threads N] [--max-pixels N]\n"
			  "                   [--pack-cache DIR] [--precision fp32|bf16|int8] FILE...\n"
			  "\n"
			  "Prints one JSON object per file: file and embedding, the image feature (the\n"
			  "class token of the last transformer block).  --precision as for geolocate.\n", out);
	else if (strcmp(command, "info") == 0)
		fputs("usage: osv5m info --model DIR [--quadtree CSV] [--threads N] [--no-fingerprint]\n"
			  "                  [--pack-cache DIR [--precision fp32|bf16|int8]]\n"
			  "\n"
			  "Prints the model's shapes, dtype, cells, size, cost and paths as JSON, with\n"
			  "the weights file's format and its SHA-256 (\"fingerprint\", as sha256sum\n"
			  "prints it; a few seconds for 1.3 GB; --no-fingerprint leaves it out), the\n"
			  "precisions this CPU runs natively (\"precisions_native\"; the others are\n"
			  "emulated, with the same results) and the pack cache files in use: with\n"
			  "--pack-cache DIR, the one of --precision (default fp32) is opened, and\n"
			  "written first when missing.\n", out);
	else if (strcmp(command, "convert") == 0)
		fputs("usage: osv5m convert --model DIR [--quadtree CSV] --out DIR2\n"
			  "\n"
			  "Writes the model of DIR (model.safetensors or pytorch_model.bin) into the\n"
			  "existing directory DIR2 as model.safetensors (F32), config.json and\n"
			  "quadtree_10_1000.csv: a plain copy that gives bit-identical predictions.\n", out);
	else if (strcmp(command, "bench") == 0)
		fputs("usage: osv5m bench --model DIR [--quadtree CSV] [--iters N] [--warmup N]\n"
			  "                   [--threads N] [--max-pixels N] [--batch N] [--json]\n"
			  "                   [--pack-cache DIR] [--precision fp32|bf16|int8] FILE...\n"
			  "\n"
			  "Runs each file N times (default 3) after W warm-up runs (default 1) and\n"
			  "prints the median seconds per image of each stage and the GFLOP/s reached.\n"
			  "With --batch B, the files go through the network B at a time.  With\n"
			  "--pack-cache DIR, the weights packed for the kernels are read from (and\n"
			  "first written to) DIR, as osv5m.pack_cache_dir does in the server; each\n"
			  "precision has its own file there.  --precision as for geolocate.\n", out);
	else
		fputs(usage_text, out);
}

/* Report a usage error and return the usage exit status. */
static int
usage_error(const char *command, const char *fmt, const char *arg)
{
	fputs("osv5m: ", stderr);
	fprintf(stderr, fmt, arg);
	fputc('\n', stderr);
	fprintf(stderr, "Try 'osv5m %s%s--help'.\n", command ? command : "",
			command ? " " : "");
	return EXIT_USAGE;
}

/* Parse a decimal integer in [lo, hi]; false if it is not one. */
static bool
parse_int(const char *s, long long lo, long long hi, long long *out)
{
	char	   *end;
	long long	v;

	errno = 0;
	v = strtoll(s, &end, 10);
	if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi)
		return false;
	*out = v;
	return true;
}

/* ---- JSON output --------------------------------------------------------- */

/* Length of the valid UTF-8 sequence at s (1..4), or 0 if invalid. */
static int
utf8_length(const unsigned char *s)
{
	unsigned	c = s[0];
	int			n;
	unsigned	cp;

	if (c < 0x80)
		return 1;
	if (c >= 0xc2 && c <= 0xdf)
		n = 2, cp = c & 0x1f;
	else if (c >= 0xe0 && c <= 0xef)
		n = 3, cp = c & 0x0f;
	else if (c >= 0xf0 && c <= 0xf4)
		n = 4, cp = c & 0x07;
	else
		return 0;
	for (int i = 1; i < n; i++)
	{
		if ((s[i] & 0xc0) != 0x80)
			return 0;			/* also stops at the terminating NUL */
		cp = (cp << 6) | (s[i] & 0x3f);
	}
	/* overlong forms, surrogates and beyond U+10FFFF are not UTF-8 */
	if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
		(cp >= 0xd800 && cp <= 0xdfff))
		return 0;
	return n;
}

/* Print s as a JSON string. */
static void
json_string(FILE *out, const char *s)
{
	const unsigned char *p = (const unsigned char *) s;

	fputc('"', out);
	while (*p)
	{
		int			n;

		if (*p == '"' || *p == '\\')
			fprintf(out, "\\%c", *p++);
		else if (*p == '\n')
			fputs("\\n", out), p++;
		else if (*p == '\t')
			fputs("\\t", out), p++;
		else if (*p < 0x20 || *p == 0x7f)
			fprintf(out, "\\u%04x", *p++);
		else if ((n = utf8_length(p)) > 0)
		{
			fwrite(p, 1, (size_t) n, out);
			p += n;
		}
		else
		{
			/* a byte of a file name that is not UTF-8: JSON cannot hold it */
			fputs("\\ufffd", out);
			p++;
		}
	}
	fputc('"', out);
}

/* Print a double that round-trips, or null when it is not finite. */
static void
json_double(FILE *out, double v)
{
	if (isfinite(v))
		fprintf(out, "%.17g", v);
	else
		fputs("null", out);
}

/* Print a float that round-trips, or null when it is not finite. */
static void
json_float(FILE *out, float v)
{
	if (isfinite(v))
		fprintf(out, "%.9g", (double) v);
	else
		fputs("null", out);
}

/* Print the error line of a file that failed. */
static void
json_file_error(const char *file, const osv_error *err)
{
	fputs("{\"file\":", stdout);
	json_string(stdout, file);
	fputs(",\"error\":", stdout);
	json_string(stdout, err->message);
	fputs(",\"status\":", stdout);
	json_string(stdout, osv_status_name(err->status));
	if (err->detail[0] != '\0')
	{
		fputs(",\"detail\":", stdout);
		json_string(stdout, err->detail);
	}
	fputs("}\n", stdout);
}

/* Monotonic clock in seconds. */
static double
now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- files and the model ------------------------------------------------- */

/* Set the threads, open the model and a context; false after a message. */
static bool
open_model(const options *opt, osv_model **model, osv_context **ctx)
{
	osv_error	err;

	osv_set_threads(opt->threads);
	if (osv_model_open(opt->model_dir, opt->quadtree, model, &err) != OSV_OK)
	{
		fprintf(stderr, "osv5m: could not open model \"%s\": %s\n",
				opt->model_dir, err.message);
		if (err.detail[0] != '\0')
			fprintf(stderr, "osv5m: %s\n", err.detail);
		return false;
	}
	if (opt->pack_cache != NULL &&
		osv_model_use_pack_cache(*model, opt->pack_cache, opt->precision, &err) != OSV_OK)
		fprintf(stderr, "osv5m: not using the pack cache: %s\n", err.message);
	if (osv_context_new_batch(*model, opt->batch, ctx, &err) != OSV_OK)
	{
		fprintf(stderr, "osv5m: %s\n", err.message);
		osv_model_close(*model);
		*model = NULL;
		return false;
	}
	return true;
}

/* Read and run one file; false (after printing its error line) if it failed. */
static bool
run_file(osv_context *ctx, const options *opt, const char *file)
{
	osv_params	params = osv_default_params();
	osv_error	err;
	uint8_t    *data;
	size_t		size;
	osv_status	status;

	params.max_pixels = opt->max_pixels;
	params.precision = opt->precision;
	if (osv_read_file(file, MAX_FILE_BYTES, &data, &size, &err) != OSV_OK)
	{
		json_file_error(file, &err);
		return false;
	}
	status = osv_run_image(ctx, data, size, &params, &err);
	free(data);
	if (status != OSV_OK)
	{
		json_file_error(file, &err);
		return false;
	}
	return true;
}

/* ---- commands ------------------------------------------------------------ */

/* Print lat, lon, cell and probability: the members of a file's line. */
static void
print_best(const osv_prediction *p)
{
	fputs("\"lat\":", stdout);
	json_double(stdout, p->lat);
	fputs(",\"lon\":", stdout);
	json_double(stdout, p->lon);
	printf(",\"cell\":%d,\"probability\":", p->cell);
	json_double(stdout, p->probability);
}

/* Print one element of "top": {"cell", "probability", "lat", "lon"}. */
static void
print_candidate(const osv_prediction *p)
{
	printf("{\"cell\":%d,\"probability\":", p->cell);
	json_double(stdout, p->probability);
	fputs(",\"lat\":", stdout);
	json_double(stdout, p->lat);
	fputs(",\"lon\":", stdout);
	json_double(stdout, p->lon);
	fputc('}', stdout);
}

/* Print the dim floats of a feature as a JSON array. */
static void
print_feature(const float *feature, int dim)
{
	fputc('[', stdout);
	for (int j = 0; j < dim; j++)
	{
		if (j > 0)
			fputc(',', stdout);
		json_float(stdout, feature[j]);
	}
	fputc(']', stdout);
}

/*
 * Geolocate the files in runs of up to opt->batch images (osv_run_images),
 * printing one line per file in file order.
 */
static int
cmd_geolocate(const options *opt, int nfiles, char **files)
{
	osv_model  *model;
	osv_context *ctx;
	osv_prediction *top = NULL;
	osv_params	params = osv_default_params();
	int			batch = opt->batch;
	uint8_t   **data = calloc((size_t) batch, sizeof(*data));
	size_t	   *sizes = calloc((size_t) batch, sizeof(*sizes));
	osv_error  *errs = calloc((size_t) batch, sizeof(*errs));	/* of the images run */
	osv_error  *read_errs = calloc((size_t) batch, sizeof(*read_errs));	/* of the files */
	int		   *which = calloc((size_t) batch, sizeof(*which));
	bool		failed = false;

	params.max_pixels = opt->max_pixels;
	params.precision = opt->precision;
	if (data == NULL || sizes == NULL || errs == NULL || read_errs == NULL || which == NULL ||
		(opt->top > 0 && (top = calloc((size_t) opt->top, sizeof(*top))) == NULL))
	{
		fprintf(stderr, "osv5m: out of memory\n");
		failed = true;
		model = NULL;
		ctx = NULL;
		goto done;
	}
	if (!open_model(opt, &model, &ctx))
	{
		free(top);
		free(data);
		free(sizes);
		free(errs);
		free(read_errs);
		free(which);
		return EXIT_USAGE;
	}
	for (int start = 0; start < nfiles; start += batch)
	{
		int			n = nfiles - start < batch ? nfiles - start : batch;
		int			m = 0;
		osv_error	run_err;
		osv_status	status = OSV_OK;

		/* which[i]: the index of file start + i among the images run, -1 if unread */
		for (int i = 0; i < n; i++)
		{
			which[i] = -1;
			if (osv_read_file(files[start + i], MAX_FILE_BYTES, &data[m], &sizes[m], &read_errs[i]) == OSV_OK)
				which[i] = m++;
		}
		if (m > 0)
			status = osv_run_images(ctx, m, (const uint8_t *const *) data, sizes,
									&params, errs, &run_err);
		for (int i = 0; i < n; i++)
		{
			const char *file = files[start + i];
			osv_prediction best;

			if (which[i] < 0 || status != OSV_OK || errs[which[i]].status != OSV_OK)
			{
				json_file_error(file, which[i] < 0 ? &read_errs[i] :
								status != OSV_OK ? &run_err : &errs[which[i]]);
				failed = true;
				continue;
			}
			osv_context_topk_at(ctx, which[i], 1, &best);
			fputs("{\"file\":", stdout);
			json_string(stdout, file);
			fputc(',', stdout);
			print_best(&best);
			if (top != NULL)
			{
				int			k = osv_context_topk_at(ctx, which[i], opt->top, top);

				fputs(",\"top\":[", stdout);
				for (int j = 0; j < k; j++)
				{
					if (j > 0)
						fputc(',', stdout);
					print_candidate(&top[j]);
				}
				fputc(']', stdout);
			}
			if (opt->feature)
			{
				/* the context keeps the feature of a run's first image only: --batch 1 */
				fputs(",\"feature\":", stdout);
				print_feature(osv_context_feature(ctx),
							  osv_model_get_info(model)->hidden_size);
			}
			fputs("}\n", stdout);
		}
		fflush(stdout);
		for (int i = 0; i < m; i++)
			free(data[i]);
	}

done:
	osv_context_free(ctx);
	osv_model_close(model);
	free(top);
	free(data);
	free(sizes);
	free(errs);
	free(read_errs);
	free(which);
	return failed ? EXIT_FILE_FAILED : 0;
}

static int
cmd_embed(const options *opt, int nfiles, char **files)
{
	osv_model  *model;
	osv_context *ctx;
	bool		failed = false;
	int			dim;

	if (!open_model(opt, &model, &ctx))
		return EXIT_USAGE;
	dim = osv_model_get_info(model)->hidden_size;
	for (int i = 0; i < nfiles; i++)
	{
		const float *feature;

		if (!run_file(ctx, opt, files[i]))
		{
			failed = true;
			continue;
		}
		feature = osv_context_feature(ctx);
		fputs("{\"file\":", stdout);
		json_string(stdout, files[i]);
		fputs(",\"embedding\":", stdout);
		print_feature(feature, dim);
		fputs("}\n", stdout);
		fflush(stdout);
	}
	osv_context_free(ctx);
	osv_model_close(model);
	return failed ? EXIT_FILE_FAILED : 0;
}

/* FLOPs of the two MLP branches (what "head" times), in GFLOP. */
static double
head_gflop(const osv_model_info *info)
{
	double		d = info->hidden_size,
				h1 = info->mid_hidden[0],
				h2 = info->mid_hidden[1],
				c = info->num_cells;

	return 2.0 * (2.0 * (d * h1 + h1 * h2) + h2 * c + h2 * 2.0 * c) * 1e-9;
}

static int
cmd_info(const options *opt)
{
	osv_model  *model;
	osv_context *ctx;
	const osv_model_info *info;

	if (!open_model(opt, &model, &ctx))
		return EXIT_USAGE;
	info = osv_model_get_info(model);
	printf("{\"version\":\"%s\"", OSV_VERSION);
	printf(",\"hidden_size\":%d,\"num_layers\":%d,\"num_heads\":%d"
		   ",\"intermediate_size\":%d,\"patch_size\":%d,\"image_size\":%d"
		   ",\"mid_hidden\":[%d,%d],\"num_cells\":%d",
		   info->hidden_size, info->num_layers, info->num_heads,
		   info->intermediate_size, info->patch_size, info->image_size,
		   info->mid_hidden[0], info->mid_hidden[1], info->num_cells);
	printf(",\"hidden_act\":\"%s\"",
		   info->hidden_act == OSV_ACT_QUICK_GELU ? "quick_gelu" : "gelu");
	fputs(",\"layer_norm_eps\":", stdout);
	json_float(stdout, info->layer_norm_eps);
	fputs(",\"image_mean\":[", stdout);
	for (int i = 0; i < 3; i++)
	{
		if (i > 0)
			fputc(',', stdout);
		json_float(stdout, info->image_mean[i]);
	}
	fputs("],\"image_std\":[", stdout);
	for (int i = 0; i < 3; i++)
	{
		if (i > 0)
			fputc(',', stdout);
		json_float(stdout, info->image_std[i]);
	}
	fputs("],\"scale_tanh\":", stdout);
	json_double(stdout, info->scale_tanh);
	printf(",\"dtype\":\"%s\",\"file_size\":%llu,\"num_parameters\":%llu",
		   osv_dtype_name(info->dtype), (unsigned long long) info->file_size,
		   (unsigned long long) info->num_parameters);
	fputs(",\"gflop_per_image\":", stdout);
	json_double(stdout, info->gflop_per_image);
	fputs(",\"weights_path\":", stdout);
	json_string(stdout, info->weights_path);
	fputs(",\"quadtree_path\":", stdout);
	json_string(stdout, info->quadtree_path);
	fputs(",\"config_path\":", stdout);
	json_string(stdout, info->config_path);
	printf(",\"weights_format\":\"%s\",\"cells_source\":\"%s\"", info->weights_format,
		   info->cells_source);
	if (!opt->no_fingerprint)
		printf(",\"fingerprint\":\"sha256:%s\"", osv_model_fingerprint(model));
	fputs(",\"kernels\":", stdout);
	json_string(stdout, osv_kernels_name());
	fputs(",\"precisions_native\":{", stdout);
	for (int p = 0; p < OSV_NUM_PRECISIONS; p++)
		printf("%s\"%s\":%s", p > 0 ? "," : "", osv_precision_name((osv_precision) p),
			   osv_precision_native((osv_precision) p) ? "true" : "false");
	fputs("},\"pack_cache_path\":", stdout);
	json_string(stdout, info->pack_cache_path);
	fputs(",\"pack_cache_path_bf16\":", stdout);
	json_string(stdout, info->pack_cache_path_bf16);
	fputs(",\"pack_cache_path_int8\":", stdout);
	json_string(stdout, info->pack_cache_path_int8);
	printf(",\"threads\":%d}\n", osv_threads());
	osv_context_free(ctx);
	osv_model_close(model);
	return 0;
}

static int
cmd_convert(const options *opt)
{
	osv_model  *model;
	osv_error	err;

	if (osv_model_open(opt->model_dir, opt->quadtree, &model, &err) != OSV_OK)
	{
		fprintf(stderr, "osv5m: could not open model \"%s\": %s\n",
				opt->model_dir, err.message);
		if (err.detail[0] != '\0')
			fprintf(stderr, "osv5m: %s\n", err.detail);
		return EXIT_USAGE;
	}
	if (osv_model_convert(model, opt->out_dir, &err) != OSV_OK)
	{
		fprintf(stderr, "osv5m: could not convert the model: %s\n", err.message);
		osv_model_close(model);
		return EXIT_USAGE;
	}
	fprintf(stderr, "osv5m: wrote %s/model.safetensors, config.json and quadtree_10_1000.csv from %s\n",
			opt->out_dir, osv_model_get_info(model)->weights_path);
	osv_model_close(model);
	return 0;
}

/* qsort order of doubles. */
static int
compare_doubles(const void *a, const void *b)
{
	double		x = *(const double *) a,
				y = *(const double *) b;

	return (x > y) - (x < y);
}

/* Median of n values (sorts them). */
static double
median(double *v, int n)
{
	qsort(v, (size_t) n, sizeof(double), compare_doubles);
	return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

#define NSTAGES 5

static int
cmd_bench(const options *opt, int nfiles, char **files)
{
	static const char *const stages[NSTAGES] = {
		"decode", "preprocess", "backbone", "head", "total"
	};
	osv_model  *model;
	osv_context *ctx;
	const osv_model_info *info;
	uint8_t   **data;
	size_t	   *sizes;
	osv_error  *errs;
	double	   *samples[NSTAGES] = {NULL};
	double		med[NSTAGES],
				mins[NSTAGES];
	osv_params	params = osv_default_params();
	int			runs = 0,
				total_runs;
	int			rc = 0;

	if ((long long) opt->iters * nfiles > 1000000)
		return usage_error("bench", "%s", "too many runs (iters x files > 1000000)");
	total_runs = opt->iters * nfiles;
	if (!open_model(opt, &model, &ctx))
		return EXIT_USAGE;
	info = osv_model_get_info(model);
	params.max_pixels = opt->max_pixels;
	params.precision = opt->precision;

	data = calloc((size_t) nfiles, sizeof(*data));
	sizes = calloc((size_t) nfiles, sizeof(*sizes));
	errs = calloc((size_t) opt->batch, sizeof(*errs));
	for (int s = 0; s < NSTAGES; s++)
		samples[s] = calloc((size_t) total_runs, sizeof(double));
	if (data == NULL || sizes == NULL || errs == NULL || samples[0] == NULL || samples[1] == NULL ||
		samples[2] == NULL || samples[3] == NULL || samples[4] == NULL)
	{
		fprintf(stderr, "osv5m: out of memory\n");
		rc = EXIT_USAGE;
		goto done;
	}
	/* files are read once: the benchmark times the core, not the disk */
	for (int i = 0; i < nfiles; i++)
	{
		osv_error	err;

		if (osv_read_file(files[i], MAX_FILE_BYTES, &data[i], &sizes[i], &err) != OSV_OK)
		{
			fprintf(stderr, "osv5m: %s: %s\n", files[i], err.message);
			rc = EXIT_FILE_FAILED;
			goto done;
		}
	}
	/* one sample per run of up to opt->batch files: its seconds per image */
	for (int it = -opt->warmup; it < opt->iters; it++)
		for (int start = 0; start < nfiles; start += opt->batch)
		{
			int			n = nfiles - start < opt->batch ? nfiles - start : opt->batch;
			osv_error	err;
			osv_timings t;
			double		t0 = now();

			if (osv_run_images(ctx, n, (const uint8_t *const *) data + start, sizes + start,
							   &params, errs, &err) != OSV_OK)
			{
				fprintf(stderr, "osv5m: %s\n", err.message);
				rc = EXIT_FILE_FAILED;
				goto done;
			}
			for (int i = 0; i < n; i++)
				if (errs[i].status != OSV_OK)
				{
					fprintf(stderr, "osv5m: %s: %s\n", files[start + i], errs[i].message);
					rc = EXIT_FILE_FAILED;
					goto done;
				}
			if (it < 0)
				continue;
			t = osv_context_timings(ctx);
			samples[0][runs] = t.decode / n;
			samples[1][runs] = t.preprocess / n;
			samples[2][runs] = t.backbone / n;
			samples[3][runs] = t.head / n;
			samples[4][runs] = (now() - t0) / n;
			runs++;
		}
	for (int s = 0; s < NSTAGES; s++)
	{
		med[s] = median(samples[s], runs);
		mins[s] = samples[s][0];	/* sorted by median() */
	}
	{
		double		gflops = info->gflop_per_image / med[4];
		double		backbone_gflops = (info->gflop_per_image - head_gflop(info)) / med[2];

		if (opt->json)
		{
			fputs("{\"model\":", stdout);
			json_string(stdout, opt->model_dir);
			fputs(",\"kernels\":", stdout);
			json_string(stdout, osv_kernels_name());
			printf(",\"precision\":\"%s\",\"native\":%s",
				   osv_precision_name(opt->precision),
				   osv_precision_native(opt->precision) ? "true" : "false");
			printf(",\"threads\":%d,\"batch\":%d,\"iters\":%d,\"files\":%d,\"runs\":%d",
				   osv_threads(), opt->batch, opt->iters, nfiles, runs);
			fputs(",\"gflop_per_image\":", stdout);
			json_double(stdout, info->gflop_per_image);
			fputs(",\"median_s\":{", stdout);
			for (int s = 0; s < NSTAGES; s++)
			{
				printf("%s\"%s\":", s ? "," : "", stages[s]);
				json_double(stdout, med[s]);
			}
			fputs("},\"min_s\":{", stdout);
			for (int s = 0; s < NSTAGES; s++)
			{
				printf("%s\"%s\":", s ? "," : "", stages[s]);
				json_double(stdout, mins[s]);
			}
			fputs("},\"gflops\":", stdout);
			json_double(stdout, gflops);
			fputs(",\"backbone_gflops\":", stdout);
			json_double(stdout, backbone_gflops);
			fputs("}\n", stdout);
		}
		else
		{
			printf("model %s: %.3f GFLOP/image, kernels %s, %s products (%s), %d thread(s), "
				   "%d image(s) per run, %d run(s)\n",
				   opt->model_dir, info->gflop_per_image, osv_kernels_name(),
				   osv_precision_name(opt->precision),
				   osv_precision_native(opt->precision) ? "native" : "emulated",
				   osv_threads(), opt->batch, runs);
			printf("%-12s %12s %12s\n", "stage", "median ms", "min ms");
			for (int s = 0; s < NSTAGES; s++)
				printf("%-12s %12.3f %12.3f\n", stages[s], med[s] * 1e3, mins[s] * 1e3);
			printf("%.2f GFLOP/s overall, %.2f GFLOP/s in the backbone\n",
				   gflops, backbone_gflops);
		}
	}

done:
	for (int i = 0; i < nfiles && data != NULL; i++)
		free(data[i]);
	free(data);
	free(sizes);
	free(errs);
	for (int s = 0; s < NSTAGES; s++)
		free(samples[s]);
	osv_context_free(ctx);
	osv_model_close(model);
	return rc;
}

/* ---- main ---------------------------------------------------------------- */

/* The online CPUs. */
static int
default_threads(void)
{
	long		n;

	n = sysconf(_SC_NPROCESSORS_ONLN);
	return n >= 1 && n <= 1024 ? (int) n : 1;
}

int
main(int argc, char **argv)
{
	enum
	{
		OPT_MODEL = 256, OPT_QUADTREE, OPT_TOP, OPT_THREADS, OPT_MAX_PIXELS,
		OPT_ITERS, OPT_WARMUP, OPT_BATCH, OPT_JSON, OPT_HELP, OPT_OUT,
		OPT_NO_FINGERPRINT, OPT_PACK_CACHE, OPT_PRECISION, OPT_FEATURE
	};
	static const struct option longopts[] = {
		{"model", required_argument, NULL, OPT_MODEL},
		{"quadtree", required_argument, NULL, OPT_QUADTREE},
		{"top", required_argument, NULL, OPT_TOP},
		{"threads", required_argument, NULL, OPT_THREADS},
		{"max-pixels", required_argument, NULL, OPT_MAX_PIXELS},
		{"iters", required_argument, NULL, OPT_ITERS},
		{"warmup", required_argument, NULL, OPT_WARMUP},
		{"batch", required_argument, NULL, OPT_BATCH},
		{"json", no_argument, NULL, OPT_JSON},
		{"out", required_argument, NULL, OPT_OUT},
		{"no-fingerprint", no_argument, NULL, OPT_NO_FINGERPRINT},
		{"pack-cache", required_argument, NULL, OPT_PACK_CACHE},
		{"precision", required_argument, NULL, OPT_PRECISION},
		{"feature", no_argument, NULL, OPT_FEATURE},
		{"help", no_argument, NULL, OPT_HELP},
		{NULL, 0, NULL, 0}
	};
	options		opt;
	const char *command;
	bool		geolocate,
				embed,
				info,
				bench,
				convert;
	int			c;
	long long	v;

	if (argc < 2)
	{
		print_usage(stderr, NULL);
		return EXIT_USAGE;
	}
	command = argv[1];
	if (strcmp(command, "--help") == 0 || strcmp(command, "-h") == 0 ||
		strcmp(command, "help") == 0)
	{
		print_usage(stdout, argc > 2 ? argv[2] : NULL);
		return 0;
	}
	if (strcmp(command, "--version") == 0)
	{
		printf("osv5m %s\n", OSV_VERSION);
		return 0;
	}
	geolocate = strcmp(command, "geolocate") == 0;
	embed = strcmp(command, "embed") == 0;
	info = strcmp(command, "info") == 0;
	bench = strcmp(command, "bench") == 0;
	convert = strcmp(command, "convert") == 0;
	if (!geolocate && !embed && !info && !bench && !convert)
		return usage_error(NULL, "unknown command \"%s\"", command);

	memset(&opt, 0, sizeof(opt));
	opt.threads = default_threads();
	opt.max_pixels = OSV_DEFAULT_MAX_PIXELS;
	opt.iters = 3;
	opt.warmup = 1;
	opt.batch = 1;
	opt.precision = OSV_PRECISION_FP32;

	/* options after the command; "--" ends them; ':' reports a missing value */
	optind = 2;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "+:", longopts, NULL)) != -1)
	{
		const char *arg = optarg;

		switch (c)
		{
			case OPT_MODEL:
				opt.model_dir = arg;
				break;
			case OPT_QUADTREE:
				opt.quadtree = arg;
				break;
			case OPT_PACK_CACHE:
				opt.pack_cache = arg;
				break;
			case OPT_PRECISION:
				if (convert)
					return usage_error(command, "%s", "--precision is not an option of convert");
				if (!osv_precision_parse(arg, &opt.precision))
					return usage_error(command, "invalid --precision \"%s\" (fp32, bf16 or int8)", arg);
				break;
			case OPT_FEATURE:
				if (!geolocate)
					return usage_error(command, "%s", "--feature is an option of geolocate only");
				opt.feature = true;
				break;
			case OPT_TOP:
				if (!geolocate)
					return usage_error(command, "%s", "--top is an option of geolocate only");
				/* 0 is the default: no "top" member */
				if (!parse_int(arg, 0, 1 << 24, &v))
					return usage_error(command, "invalid --top \"%s\" (an integer >= 0)", arg);
				opt.top = (int) v;
				break;
			case OPT_THREADS:
				if (!parse_int(arg, 1, 1024, &v))
					return usage_error(command, "invalid --threads \"%s\" (1 to 1024)", arg);
				opt.threads = (int) v;
				break;
			case OPT_MAX_PIXELS:
				if (info)
					return usage_error(command, "%s", "--max-pixels is not an option of info");
				if (!parse_int(arg, 1, INT64_MAX, &v))
					return usage_error(command, "invalid --max-pixels \"%s\" (an integer >= 1)", arg);
				opt.max_pixels = (uint64_t) v;
				break;
			case OPT_ITERS:
			case OPT_WARMUP:
				if (!bench)
					return usage_error(command, "%s", "--iters and --warmup are options of bench only");
				if (!parse_int(arg, c == OPT_ITERS ? 1 : 0, 1000000, &v))
					return usage_error(command, "invalid --iters or --warmup \"%s\"", arg);
				if (c == OPT_ITERS)
					opt.iters = (int) v;
				else
					opt.warmup = (int) v;
				break;
			case OPT_BATCH:
				if (!geolocate && !bench)
					return usage_error(command, "%s", "--batch is an option of geolocate and bench only");
				if (!parse_int(arg, 1, 64, &v))
					return usage_error(command, "invalid --batch \"%s\" (1 to 64)", arg);
				opt.batch = (int) v;
				break;
			case OPT_JSON:
				if (!bench)
					return usage_error(command, "%s", "--json is an option of bench only");
				opt.json = true;
				break;
			case OPT_OUT:
				if (!convert)
					return usage_error(command, "%s", "--out is an option of convert only");
				opt.out_dir = arg;
				break;
			case OPT_NO_FINGERPRINT:
				if (!info)
					return usage_error(command, "%s", "--no-fingerprint is an option of info only");
				opt.no_fingerprint = true;
				break;
			case OPT_HELP:
				print_usage(stdout, command);
				return 0;
			case ':':
				return usage_error(command, "option \"%s\" needs a value", argv[optind - 1]);
			default:
				return usage_error(command, "unknown option \"%s\"", argv[optind - 1]);
		}
	}
	if (opt.model_dir == NULL)
		return usage_error(command, "%s", "--model DIR is required");
	if (opt.feature && opt.batch != 1)
		return usage_error(command, "%s", "--feature needs --batch 1");
	if ((info || convert) && optind < argc)
		return usage_error(command, "unexpected argument \"%s\"", argv[optind]);
	if (convert && opt.out_dir == NULL)
		return usage_error(command, "%s", "--out DIR2 is required");
	if (convert)
		return cmd_convert(&opt);
	if (!info && optind >= argc)
		return usage_error(command, "%s", "no image FILE given");

	if (geolocate)
		return cmd_geolocate(&opt, argc - optind, argv + optind);
	if (embed)
		return cmd_embed(&opt, argc - optind, argv + optind);
	if (info)
		return cmd_info(&opt);
	return cmd_bench(&opt, argc - optind, argv + optind);
}
