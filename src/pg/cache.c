/*
 * cache.c: the per-backend model cache, the run helper and the mapping of
 * core statuses to SQLSTATEs.
 *
 * Each backend loads the model lazily, on the first call that needs it, and
 * keeps it for its whole life.  The core objects (osv_model, osv_context)
 * are malloc'ed by the core and live outside every PostgreSQL memory
 * context: no context reset or transaction abort can free them under us.
 * The weights stay mmap'ed read-only, so N backends share one copy in the
 * page cache.
 *
 * Invariants:
 *  - cache.model and cache.ctx are both set or both NULL;
 *  - the cached model is the one for cache.path, and was opened after
 *    file_ids[] were recorded: a file replaced after that point differs
 *    from its record at the next call, which then reloads;
 *  - no ereport, palloc or CHECK_FOR_INTERRUPTS runs while the core is on
 *    the stack: the abort callback only reads flags, and errors are raised
 *    after the core has returned and freed its own memory.
 */
#include "osv5m_pg.h"

#include <sys/stat.h>

#include "miscadmin.h"
#include "portability/instr_time.h"
#include "utils/memutils.h"

/* Where the model was loaded from, as seen by stat() before loading. */
typedef struct FileId
{
	bool		exists;
	dev_t		dev;
	ino_t		ino;
	off_t		size;
	struct timespec mtime;
} FileId;

/* The files a model depends on: weights, quadtree, config.json. */
#define NUM_MODEL_FILES 3

static OsvLoaded cache;
static char file_paths[NUM_MODEL_FILES][MAXPGPATH];
static FileId file_ids[NUM_MODEL_FILES];
static MemoryContext call_context = NULL;

/* The per-call memory context, reset: see osv5m_pg.h. */
MemoryContext
OsvCallContext(void)
{
	if (call_context == NULL)
		call_context = AllocSetContextCreate(TopMemoryContext,
											 "osv5m per-call",
											 ALLOCSET_DEFAULT_SIZES);
	else
		MemoryContextReset(call_context);
	return call_context;
}

/* Record what stat() says about path (a missing file is recorded too). */
static void
StatFile(const char *path, FileId *id)
{
	struct stat st;

	memset(id, 0, sizeof(*id));
	if (stat(path, &st) != 0)
		return;
	id->exists = true;
	id->dev = st.st_dev;
	id->ino = st.st_ino;
	id->size = st.st_size;
	id->mtime = st.st_mtim;
}

/* Whether two records describe the same file contents (as far as stat tells). */
static bool
SameFile(const FileId *a, const FileId *b)
{
	return a->exists == b->exists && a->dev == b->dev && a->ino == b->ino &&
		a->size == b->size && a->mtime.tv_sec == b->mtime.tv_sec &&
		a->mtime.tv_nsec == b->mtime.tv_nsec;
}

/* Whether none of the cached model's files changed since it was loaded. */
static bool
FilesUnchanged(void)
{
	for (int i = 0; i < NUM_MODEL_FILES; i++)
	{
		FileId		now;

		StatFile(file_paths[i], &now);
		if (!SameFile(&now, &file_ids[i]))
			return false;
	}
	return true;
}

/* Free the cached model, if any. */
static void
Unload(void)
{
	if (cache.ctx != NULL)
		osv_context_free(cache.ctx);
	if (cache.model != NULL)
		osv_model_close(cache.model);
	free(cache.path);
	memset(&cache, 0, sizeof(cache));
}

/* Load the model in dir into the (empty) cache; ERROR on failure. */
static void
Load(const char *dir)
{
	osv_model  *model = NULL;
	osv_context *ctx = NULL;
	osv_error	err;
	const osv_model_info *info;
	char	   *path_copy;
	instr_time	start,
				elapsed;

	Assert(cache.model == NULL);
	INSTR_TIME_SET_CURRENT(start);

	/*
	 * Stat the files BEFORE opening them, so that a replacement racing with
	 * the load shows up as a change at the next call.  Until the model is
	 * open we can only guess the file names (config.json may name another
	 * quadtree file); if the core used other names, stat those and load
	 * again.  Two rounds always suffice unless config.json itself keeps
	 * changing, hence the bound.
	 */
	snprintf(file_paths[0], MAXPGPATH, "%s/model.safetensors", dir);
	/* the core's rule: model.safetensors, else pytorch_model.bin */
	if (access(file_paths[0], F_OK) != 0 && errno == ENOENT)
		snprintf(file_paths[0], MAXPGPATH, "%s/pytorch_model.bin", dir);
	snprintf(file_paths[1], MAXPGPATH, "%s/quadtree_10_1000.csv", dir);
	snprintf(file_paths[2], MAXPGPATH, "%s/config.json", dir);
	for (int round = 0;; round++)
	{
		for (int i = 0; i < NUM_MODEL_FILES; i++)
			StatFile(file_paths[i], &file_ids[i]);

		if (osv_model_open(dir, NULL, &model, &err) != OSV_OK)
			OsvReportError(&err, OSV_STAGE_LOAD);
		info = osv_model_get_info(model);
		/*
		 * An empty quadtree_path: the cells came from the checkpoint and
		 * no CSV was read; the default CSV stays watched, so that one
		 * appearing later is loaded (and checked against the checkpoint).
		 */
		if ((strcmp(info->weights_path, file_paths[0]) == 0 &&
			 (strcmp(info->quadtree_path, file_paths[1]) == 0 ||
			  info->quadtree_path[0] == '\0')) ||
			round == 2 ||
			strlen(info->weights_path) >= MAXPGPATH ||
			strlen(info->quadtree_path) >= MAXPGPATH)
			break;
		strcpy(file_paths[0], info->weights_path);
		if (info->quadtree_path[0] != '\0')
			strcpy(file_paths[1], info->quadtree_path);
		osv_model_close(model);
		model = NULL;
	}

	/* a pack cache that cannot be used only costs speed: warn, go on */
	if (osv5m_pack_cache_dir != NULL && osv5m_pack_cache_dir[0] != '\0' &&
		osv_model_use_pack_cache(model, osv5m_pack_cache_dir, OSV_PRECISION_FP32, &err) != OSV_OK)
		ereport(WARNING,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("osv5m.pack_cache_dir is not used: %s", err.message),
				 errhint("Create the directory as the server's OS user with mode 0700, "
						 "or set osv5m.pack_cache_dir to ''.")));

	/* the core starts or resizes its threads on the next run */
	osv_set_threads(osv5m_threads);
	if (osv_context_new(model, &ctx, &err) != OSV_OK)
	{
		osv_model_close(model);
		OsvReportError(&err, OSV_STAGE_CONTEXT);
	}
	path_copy = strdup(dir);
	if (path_copy == NULL)
	{
		osv_context_free(ctx);
		osv_model_close(model);
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));
	}

	INSTR_TIME_SET_CURRENT(elapsed);
	INSTR_TIME_SUBTRACT(elapsed, start);
	cache.model = model;
	cache.ctx = ctx;
	cache.path = path_copy;
	cache.loaded_at = GetCurrentTimestamp();
	cache.load_seconds = INSTR_TIME_GET_DOUBLE(elapsed);
}

/* The model for the current osv5m.model_path: see osv5m_pg.h. */
OsvLoaded *
OsvGetModel(void)
{
	const char *path = osv5m_model_path;

	if (path == NULL || path[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("osv5m.model_path is not set"),
				 errhint("Set osv5m.model_path to the model's directory (config.json and "
						 "pytorch_model.bin as published, or model.safetensors), e.g. "
						 "ALTER SYSTEM SET osv5m.model_path = '/srv/osv5m/baseline'; "
						 "then SELECT pg_reload_conf().")));

	/* one stat() per file per call: cheap next to an inference */
	if (cache.model != NULL && strcmp(cache.path, path) == 0 && FilesUnchanged())
		return &cache;

	Unload();
	Load(path);
	return &cache;
}

/*
 * The core's abort callback, polled between transformer blocks.  It must
 * not ereport or call CHECK_FOR_INTERRUPTS (the siglongjmp would skip the
 * core's cleanup): it only says whether a cancel or termination is pending
 * and can be serviced now.  Other interrupts (barriers, notifications) are
 * left for the executor's next CHECK_FOR_INTERRUPTS, so they do not cost an
 * inference.
 */
static bool
InterruptRequested(void *data)
{
	return INTERRUPTS_PENDING_CONDITION() && INTERRUPTS_CAN_BE_PROCESSED() &&
		(QueryCancelPending || ProcDiePending);
}

/* The parameters of a run under the current settings. */
static osv_params
RunParams(void)
{
	osv_params	params = osv_default_params();

	params.max_pixels = (uint64_t) osv5m_max_pixels;
	params.abort_callback = InterruptRequested;
	params.abort_data = NULL;
	osv_set_threads(osv5m_threads);	/* a no-op when unchanged */
	return params;
}

/* After a run that did not complete: raise the cancel, or the core's error. */
static void
ReportRunFailure(osv_status status, const osv_error *err)
{
	if (status == OSV_ERR_ABORTED)
	{
		/* the core has returned and cleaned up: now raise the cancel */
		CHECK_FOR_INTERRUPTS();
		ereport(ERROR,
				(errcode(ERRCODE_QUERY_CANCELED),
				 errmsg("canceling geolocation because an interrupt was requested")));
	}
	OsvReportError(err, OSV_STAGE_RUN);
}

/* Run the network on encoded image bytes: see osv5m_pg.h. */
OsvLoaded *
OsvRunImage(const void *data, size_t size)
{
	OsvLoaded  *loaded = OsvGetModel();
	osv_params	params = RunParams();
	osv_error	err;
	osv_status	status;

	status = osv_run_image(loaded->ctx, data, size, &params, &err);
	if (status != OSV_OK)
		ReportRunFailure(status, &err);
	return loaded;
}

/*
 * Give the cached model a run state for n images per run.  A backend that
 * only ever geolocates one image at a time keeps the small one (about
 * 12 MB for ViT-L/14); one that runs batches keeps the larger one until the
 * model is reloaded.
 */
static void
EnsureBatchCapacity(OsvLoaded *loaded, int n)
{
	osv_context *ctx;
	osv_error	err;

	if (osv_context_max_images(loaded->ctx) >= n)
		return;
	if (osv_context_new_batch(loaded->model, n, &ctx, &err) != OSV_OK)
		OsvReportError(&err, OSV_STAGE_CONTEXT);
	osv_context_free(loaded->ctx);
	loaded->ctx = ctx;
}

/* Run the network on n images at once: see osv5m_pg.h. */
OsvLoaded *
OsvRunImages(int n, const uint8_t *const data[], const size_t sizes[],
			 osv_error image_errs[])
{
	OsvLoaded  *loaded = OsvGetModel();
	osv_params	params;
	osv_error	err;
	osv_status	status;

	EnsureBatchCapacity(loaded, n);
	params = RunParams();
	status = osv_run_images(loaded->ctx, n, data, sizes, &params, image_errs, &err);
	if (status != OSV_OK)
		ReportRunFailure(status, &err);
	return loaded;
}

/* The SQLSTATE and hint of a core error: see osv5m_pg.h. */
int
OsvErrorCode(const osv_error *err, OsvStage stage, const char **hint)
{
	*hint = NULL;
	switch (err->status)
	{
		case OSV_ERR_NOMEM:
			return ERRCODE_OUT_OF_MEMORY;
		case OSV_ERR_IMAGE_UNSUPPORTED:
			*hint = "Only JPEG and PNG images are supported.";
			return ERRCODE_FEATURE_NOT_SUPPORTED;
		case OSV_ERR_IMAGE_CORRUPT:
			return ERRCODE_INVALID_BINARY_REPRESENTATION;
		case OSV_ERR_LIMIT:
			*hint = "A superuser can raise osv5m.max_pixels.";
			return ERRCODE_PROGRAM_LIMIT_EXCEEDED;
		case OSV_ERR_ARGUMENT:
			return ERRCODE_INVALID_PARAMETER_VALUE;
		case OSV_ERR_ABORTED:
			return ERRCODE_QUERY_CANCELED;
		case OSV_ERR_IO:
		case OSV_ERR_MODEL:
		default:
			if (stage == OSV_STAGE_CONTEXT)
			{
				/* the context is where the core allocates the run state */
				*hint = "Check the server's free memory and the model's dimensions.";
				return ERRCODE_EXTERNAL_ROUTINE_EXCEPTION;
			}
			*hint = "Set osv5m.model_path to the model's directory (config.json and "
				"pytorch_model.bin as published, or model.safetensors), e.g. "
				"ALTER SYSTEM SET osv5m.model_path = '/srv/osv5m/baseline'.";
			return ERRCODE_CONFIG_FILE_ERROR;
	}
}

/* Raise a core error as an ERROR: see osv5m_pg.h. */
void
OsvReportError(const osv_error *err, OsvStage stage)
{
	const char *hint;
	int			code = OsvErrorCode(err, stage, &hint);

	ereport(ERROR,
			(errcode(code),
			 stage == OSV_STAGE_LOAD ?
			 errmsg("could not load osv5m model: %s", err->message) :
			 errmsg("%s", err->message),
			 err->detail[0] != '\0' ? errdetail("%s", err->detail) : 0,
			 hint != NULL ? errhint("%s", hint) : 0));
	pg_unreachable();
}
