/*
 * init.c: the module's entry point and its settings.
 *
 * All GUCs are defined here and only here.  _PG_init runs in the postmaster
 * when the library is in shared_preload_libraries, so it must stay cheap and
 * must not touch the core: in particular no compute thread starts here
 * (src/core/pool.c starts them in the process that runs the network, on
 * its first run, so the postmaster and its forks never have any).
 */
#include "osv5m_pg.h"

#include <limits.h>

#include "fmgr.h"
#include "utils/guc.h"

PG_MODULE_MAGIC;

char	   *osv5m_model_path = NULL;
char	   *osv5m_pack_cache_dir = NULL;
int			osv5m_threads = 1;
int			osv5m_max_pixels = (int) OSV_DEFAULT_MAX_PIXELS;
int			osv5m_images_per_run = 4;
int			osv5m_max_workers = 4;
int			osv5m_precision = OSV_PRECISION_FP32;

/*
 * The values of osv5m.precision, spelled as the core's osv_precision_name()
 * spells them (the enum needs its strings at compile time).  The setting
 * offers a precision of the core only once the glue reports and records it
 * (osv5m_model_info, osv5m_jobs.precision).
 */
const struct config_enum_entry osv5m_precision_options[] = {
	{"fp32", OSV_PRECISION_FP32, false},
	{"bf16", OSV_PRECISION_BF16, false},
	{"int8", OSV_PRECISION_INT8, false},
	{NULL, 0, false}
};

void		_PG_init(void);

/*
 * osv5m.model_path must be empty or absolute: a relative path would be
 * resolved against the data directory, which is never what was meant.
 */
static bool
CheckModelPath(char **newval, void **extra, GucSource source)
{
	if (*newval != NULL && (*newval)[0] != '\0' && (*newval)[0] != '/')
	{
		GUC_check_errdetail("osv5m.model_path must be an absolute path or empty.");
		return false;
	}
	return true;
}

/* Define the settings of the osv5m.* namespace and reserve the prefix. */
void
_PG_init(void)
{
	/*
	 * Superuser-only: the path names files the server process opens, and a
	 * model decides what every IMMUTABLE inference call returns.
	 */
	DefineCustomStringVariable("osv5m.model_path",
							   "Directory of the geolocation model.",
							   "A directory holding config.json and pytorch_model.bin as "
							   "published (or model.safetensors, with quadtree_10_1000.csv "
							   "when the weights hold no cells).  "
							   "Empty (the default) means no model: inference functions "
							   "raise an error.  Each backend loads the model on first use "
							   "and reloads it when this setting or the files change.",
							   &osv5m_model_path,
							   "",
							   PGC_SUSET,
							   0,
							   CheckModelPath, NULL, NULL);

	/*
	 * Superuser-only, like the model: the files in this directory are the
	 * weights the products read.
	 */
	DefineCustomStringVariable("osv5m.pack_cache_dir",
							   "Directory of the weights packed for the matrix kernels.",
							   "An absolute path to a directory owned by the server's OS user "
							   "and writable by no one else.  The first backend to load a model "
							   "writes its weights there packed for this CPU's kernels (about "
							   "the size of the weights), and every backend then reads them "
							   "through the page cache: faster inference, no memory per "
							   "backend.  Empty (the default): the weights are packed on the "
							   "fly.  Takes effect when a backend loads the model.",
							   &osv5m_pack_cache_dir,
							   "",
							   PGC_SUSET,
							   0,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("osv5m.threads",
							"Number of threads an inference call of this backend uses.",
							"Range 1 to 64; default 1.  More threads make one call faster "
							"but compete with other backends for the cores.",
							&osv5m_threads,
							1, 1, 64,
							PGC_USERSET,
							0,
							NULL, NULL, NULL);

	/*
	 * Any user, like osv5m.threads: it trades exactness for speed in the
	 * calls of the session that sets it, and reads no file.  Unlike
	 * osv5m.threads it changes what the IMMUTABLE functions return, as
	 * osv5m.model_path does (README, Why IMMUTABLE).
	 */
	DefineCustomEnumVariable("osv5m.precision",
							 "Arithmetic of the matrix products with the model's weights: fp32, bf16 or int8.",
							 "fp32 (the default) computes the published model in float32.  "
							 "bf16 rounds the weights and the activations entering the "
							 "matrix products to bfloat16 and sums in float32: faster on "
							 "CPUs with AVX512_BF16, and the results change slightly.  "
							 "int8 quantizes them to 8 bits per row and sums in integers: "
							 "faster still on CPUs with AVX512_VNNI, and the results change "
							 "more.  Other CPUs emulate both bit for bit: the same results, "
							 "no faster than fp32.",
							 &osv5m_precision,
							 OSV_PRECISION_FP32,
							 osv5m_precision_options,
							 PGC_USERSET,
							 0,
							 NULL, NULL, NULL);

	/*
	 * Superuser-only: decoding needs 3 bytes per pixel before the image is
	 * scaled down, so whoever may raise the limit may make every backend
	 * allocate gigabytes.  The default (50 megapixels, 150 MB of RGB) admits
	 * any camera photo of today.
	 */
	DefineCustomIntVariable("osv5m.max_pixels",
							"Largest image, in pixels (width times height), that inference functions decode.",
							"Range 1 to 2147483647; default 50000000.  Larger images are "
							"rejected before any pixel memory is allocated.",
							&osv5m_max_pixels,
							(int) OSV_DEFAULT_MAX_PIXELS, 1, INT_MAX,
							PGC_SUSET,
							0,
							NULL, NULL, NULL);

	/*
	 * Why 4: the matrix products then stream each weight matrix once per 4
	 * images instead of once per image, about 10 % faster per image on
	 * ViT-L/14 (test/bench/batch_bench.sh); 8 adds 1 to 2 % more for twice
	 * the activations (about 12 MB per image).
	 */
	DefineCustomIntVariable("osv5m.images_per_run",
							"Number of images osv5m_enrich runs through the network together.",
							"Range 1 to 64; default 4.  More images per run are faster per "
							"image and take about 12 MB of backend memory each "
							"(ViT-L/14).  geolocate() always runs one image.",
							&osv5m_images_per_run,
							4, 1, 64,
							PGC_USERSET,
							0,
							NULL, NULL, NULL);

	/*
	 * Superuser-only: each background worker takes a max_worker_processes
	 * slot (shared with parallel query) and a core, so whoever may raise
	 * the limit may take them all.  Why 4: half of max_worker_processes'
	 * default of 8, leaving the rest to parallel query and other roles.
	 */
	DefineCustomIntVariable("osv5m.max_workers",
							"Most background workers one osv5m_enrich run may start, and one role may have running at once.",
							"Range 1 to 64; default 4.  A larger request, or one that would "
							"take the role's running workers past this, is reduced with a "
							"NOTICE (to none when the role already has this many); the "
							"calling backend does the rest of the work.",
							&osv5m_max_workers,
							4, 1, 64,
							PGC_SUSET,
							0,
							NULL, NULL, NULL);

	MarkGUCPrefixReserved("osv5m");
}
