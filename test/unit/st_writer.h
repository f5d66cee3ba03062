/*
 * st_writer.h: a tiny safetensors writer for the C tests, so that test
 * models (valid and deliberately broken) are built at test time instead of
 * being checked in.
 *
 * Entries are kept in insertion order and laid out back to back; the header
 * is padded with spaces to a multiple of 8 bytes plus `misalign` (0 gives
 * the aligned layout the official writer produces).
 */
#ifndef OSV_ST_WRITER_H
#define OSV_ST_WRITER_H

#include <stddef.h>
#include <stdint.h>

typedef struct st_entry
{
	char		name[200];
	char		dtype[16];
	int			ndim;
	int64_t		shape[8];
	uint8_t    *data;
	size_t		nbytes;
} st_entry;

typedef struct st_builder
{
	st_entry   *entries;
	int			count;
	int			capacity;
} st_builder;

void		st_init(st_builder *b);
void		st_free(st_builder *b);
/* Add a tensor of floats stored as dtype "F32", "F16" or "BF16". */
void		st_add_floats(st_builder *b, const char *name, const char *dtype,
						  const int64_t *shape, int ndim, const float *values);
/* Add a tensor with the given raw bytes under any dtype string. */
void		st_add_raw(st_builder *b, const char *name, const char *dtype,
					   const int64_t *shape, int ndim, const void *data, size_t nbytes);
/* The file image: *out is malloc'ed; returns its size. */
size_t		st_serialize(const st_builder *b, int misalign, uint8_t **out);
/* Write bytes to path; 0 on success. */
int			st_write_file(const char *path, const void *data, size_t size);
/* An image of a raw header text followed by data_size zero bytes. */
size_t		st_raw_image(const char *header, size_t data_size, uint8_t **out);

/* Float to IEEE half, round to nearest even (normal range and zero). */
uint16_t	st_f32_to_f16(float f);

#endif
