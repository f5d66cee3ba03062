/*
 * osv5m_pg.h: declarations shared by the files of the PostgreSQL glue
 * (src/pg), and only them.
 *
 * The glue is the only code that includes both postgres.h and the core's
 * osv5m.h.  Invariant: nothing declared here is ever called from inside the
 * core (the core's only way back into the glue is the abort callback, which
 * lives in cache.c and reads flags only).
 */
#ifndef OSV5M_PG_H
#define OSV5M_PG_H

#include "postgres.h"

#include "osv5m.h"
#include "utils/guc.h"
#include "utils/timestamp.h"

/* ---- settings (init.c) ---------------------------------------------- */

extern char *osv5m_model_path;	/* osv5m.model_path, "" when unset */
extern char *osv5m_pack_cache_dir;	/* osv5m.pack_cache_dir, "" when unset */
extern int	osv5m_threads;		/* osv5m.threads */
extern int	osv5m_max_pixels;	/* osv5m.max_pixels */
extern int	osv5m_images_per_run;	/* osv5m.images_per_run */
extern int	osv5m_max_workers;	/* osv5m.max_workers */
extern int	osv5m_precision;	/* osv5m.precision, an osv_precision */
extern const struct config_enum_entry osv5m_precision_options[];	/* its values */

/* ---- the per-backend model cache (cache.c) ------------------------- */

/* What the glue was doing when the core failed; it picks the SQLSTATE. */
typedef enum OsvStage
{
	OSV_STAGE_LOAD,				/* osv_model_open */
	OSV_STAGE_CONTEXT,			/* osv_context_new (loads OpenBLAS) */
	OSV_STAGE_RUN				/* osv_run_image, osv_run_images */
} OsvStage;

/* The loaded model of this backend and what it was loaded from. */
typedef struct OsvLoaded
{
	osv_model  *model;
	osv_context *ctx;
	char	   *path;			/* osv5m.model_path it was loaded for (malloc'ed) */
	TimestampTz loaded_at;
	double		load_seconds;
	/* osv5m.pack_cache_dir when it was loaded (malloc'ed), NULL when unset */
	char	   *pack_cache_dir;
	/* whether the pack cache of each osv_precision was tried for this model */
	bool		pack_cache_tried[OSV_NUM_PRECISIONS];
} OsvLoaded;

/* The model for the current osv5m.model_path, (re)loaded if needed. */
extern OsvLoaded *OsvGetModel(void);

/*
 * Run the network on img (any varlena bytes) with the current settings.
 * Afterwards the results are in OsvGetModel()->ctx.  Raises an ERROR on
 * failure or cancellation.
 */
extern OsvLoaded *OsvRunImage(const void *data, size_t size);

/*
 * Run the network on n images together (osv_run_images), growing the
 * backend's run state to n images if needed.  Afterwards image_errs[i]
 * tells how image i fared and the results are in OsvGetModel()->ctx.
 * Raises an ERROR when the run as a whole fails or is cancelled.
 */
extern OsvLoaded *OsvRunImages(int n, const uint8_t *const data[],
							   const size_t sizes[], osv_error image_errs[]);

/*
 * The one place that maps a core error to a SQLSTATE (and a hint, or
 * NULL), and the one that raises it as an ERROR with that mapping.
 */
extern int	OsvErrorCode(const osv_error *err, OsvStage stage, const char **hint);
extern void OsvReportError(const osv_error *err, OsvStage stage) pg_attribute_noreturn();

/*
 * A memory context for the transient allocations of one call (the
 * detoasted image); it is reset at the start of every call, so an ERROR in
 * the middle of one leaks nothing past the next.
 */
extern MemoryContext OsvCallContext(void);

#endif							/* OSV5M_PG_H */
