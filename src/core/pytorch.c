/*
 * pytorch.c: read a PyTorch checkpoint (torch.save of a state dict, the zip
 * format of torch >= 1.6) without Python and without executing anything.
 *
 * Layout (docs/MODEL.md section 1): a zip archive (zip.c) of stored
 * entries under one top-level folder: data.pkl, data/<key> (one raw
 * little-endian storage each), byteorder ("little"; absent in old files)
 * and version.  data.pkl is a pickle that builds an OrderedDict mapping
 * names to tensors, each made by torch._utils._rebuild_tensor_v2(storage,
 * offset, size, stride, requires_grad, hooks) where storage is a
 * persistent id ('storage', torch.<Type>Storage, key, location, numel).
 *
 * A pickle is a program for a stack machine that may call any Python
 * callable it names.  This reader is an allow-list interpreter in the
 * spirit of torch.load(weights_only=True) (torch/_weights_only_unpickler.py):
 *   - only the opcodes a state dict needs (protocols 2 to 5: PROTO, FRAME,
 *     MARK, STOP, POP, NONE, NEWTRUE, NEWFALSE, BININT*, LONG1, BINFLOAT,
 *     the unicode strings, the tuple, list and dict builders, SETITEM(S),
 *     APPEND(S), the memo opcodes, GLOBAL, STACK_GLOBAL, REDUCE, BUILD and
 *     BINPERSID); any other opcode is an error naming it;
 *   - GLOBAL only names; nothing is resolved.  The allowed globals are
 *     collections.OrderedDict, torch._utils._rebuild_tensor_v2,
 *     torch._utils._rebuild_parameter and the torch.<Type>Storage classes;
 *     any other (os.system, builtins.eval, ...) is an error that names it,
 *     raised when the GLOBAL is read, before anything could use it;
 *   - REDUCE is interpreted for those callables only, BUILD only on a dict
 *     (the state dict's _metadata attribute, which is ignored);
 *   - the stack, the mark stack, the memo and the number of objects are
 *     bounded, strings are bounded by the bytes that remain, and nothing
 *     is recursive, so a deeply nested pickle costs memory in proportion
 *     to its length and never stack.
 *
 * Tensors: the dtype comes from the storage class; the storage's numel
 * times the element size must fit in its data/<key> entry; the offset,
 * sizes and strides must address only elements inside the storage.
 * Tensors that share a storage (the alias keys of osv5m/baseline) simply
 * point into the same entry.  A big-endian byteorder entry and the legacy
 * format (a bare pickle stream) are refused with advice.
 */
#include "internal.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* data.pkl of osv5m/baseline is ~100 kB; anything near this is garbage */
#define PKL_MAX_BYTES ((uint64_t) 64 << 20)
#define PKL_MAX_STACK 100000
#define PKL_MAX_MARKS 1000
#define PKL_MAX_MEMO 1000000
#define PKL_MAX_VALUES 4000000
#define PKL_MAX_TENSORS 1000000
#define PKL_MAX_NAME 1024

typedef enum pv_kind
{
	PV_NONE,
	PV_BOOL,
	PV_INT,
	PV_FLOAT,
	PV_STR,
	PV_TUPLE,
	PV_LIST,
	PV_DICT,
	PV_GLOBAL,
	PV_STORAGE,
	PV_TENSOR
} pv_kind;

static const char *const kind_names[] = {
	"None", "bool", "int", "float", "str", "tuple", "list", "dict", "global",
	"storage", "tensor"
};

/* The callables and classes a state dict may name. */
typedef enum pv_global
{
	G_ORDERED_DICT,
	G_REBUILD_TENSOR_V2,
	G_REBUILD_PARAMETER,
	G_STORAGE					/* a torch.<Type>Storage; dtype in the value */
} pv_global;

static const struct
{
	const char *module;
	const char *name;
	pv_global	global;
	osv_dtype	dtype;
}			allowed_globals[] =
{
	{"collections", "OrderedDict", G_ORDERED_DICT, OSV_DTYPE_UNKNOWN},
	{"torch._utils", "_rebuild_tensor_v2", G_REBUILD_TENSOR_V2, OSV_DTYPE_UNKNOWN},
	{"torch._utils", "_rebuild_parameter", G_REBUILD_PARAMETER, OSV_DTYPE_UNKNOWN},
	{"torch", "FloatStorage", G_STORAGE, OSV_DTYPE_F32},
	{"torch", "DoubleStorage", G_STORAGE, OSV_DTYPE_F64},
	{"torch", "HalfStorage", G_STORAGE, OSV_DTYPE_F16},
	{"torch", "BFloat16Storage", G_STORAGE, OSV_DTYPE_BF16},
	{"torch", "LongStorage", G_STORAGE, OSV_DTYPE_I64},
	{"torch", "IntStorage", G_STORAGE, OSV_DTYPE_I32},
	{"torch", "ShortStorage", G_STORAGE, OSV_DTYPE_I16},
	{"torch", "CharStorage", G_STORAGE, OSV_DTYPE_I8},
	{"torch", "ByteStorage", G_STORAGE, OSV_DTYPE_U8},
	{"torch", "BoolStorage", G_STORAGE, OSV_DTYPE_BOOL},
};

typedef struct pv
{
	uint8_t		kind;			/* pv_kind */
	uint8_t		global;			/* PV_GLOBAL: pv_global */
	uint8_t		dtype;			/* PV_GLOBAL storage class, PV_STORAGE */
	int64_t		i;				/* PV_INT, PV_BOOL; PV_STORAGE numel; PV_TENSOR index */
	const uint8_t *s;			/* PV_STR: into data.pkl; PV_STORAGE: entry data */
	uint64_t	len;			/* PV_STR length; PV_STORAGE entry bytes */
	int32_t    *items;			/* PV_TUPLE, PV_LIST, PV_DICT (key, value pairs) */
	int32_t		n,
				cap;
} pv;

/* A tensor as _rebuild_tensor_v2 described it, before the table is built. */
typedef struct pending_tensor
{
	int32_t		storage;		/* value index of the PV_STORAGE */
	int64_t		offset;
	int			ndim;
	int64_t		shape[OSV_MAX_DIMS];
	int64_t		stride[OSV_MAX_DIMS];
} pending_tensor;

typedef struct unpickler
{
	const uint8_t *p;			/* data.pkl */
	size_t		size;
	size_t		pos;
	const osv_zip *zip;
	const char *prefix;			/* "archive/" */
	pv		   *values;
	int32_t		num_values,
				cap_values;
	int32_t    *stack;
	int32_t		sp;
	int32_t		marks[PKL_MAX_MARKS];
	int			num_marks;
	int32_t    *memo;			/* value index, or -1 */
	int32_t		memo_cap;
	pending_tensor *tensors;
	int32_t		num_tensors,
				cap_tensors;
	osv_error  *err;
} unpickler;

/* An error about data.pkl at the current opcode. */
static osv_status
pkl_fail(unpickler *u, const char *fmt,...)
__attribute__((format(printf, 2, 3)));

static osv_status
pkl_fail(unpickler *u, const char *fmt,...)
{
	char		text[400];
	va_list		ap;

	va_start(ap, fmt);
	vsnprintf(text, sizeof(text), fmt, ap);
	va_end(ap);
	return osv_fail(u->err, OSV_ERR_MODEL, "data.pkl at byte %zu: %s", u->pos, text);
}

/* Grow *arr (of *cap elements of size es) to hold at least need; false on limit or OOM. */
static bool
grow(void **arr, int32_t *cap, int64_t need, size_t es, int64_t limit)
{
	int64_t		n = *cap ? *cap : 16;
	void	   *p;

	if (need <= *cap)
		return true;
	if (need > limit)
		return false;
	while (n < need)
		n *= 2;
	if (n > limit)
		n = limit;
	p = realloc(*arr, (size_t) n * es);
	if (p == NULL)
		return false;
	*arr = p;
	*cap = (int32_t) n;
	return true;
}

/* A new value of kind; its index, or -1 after setting the error. */
static int32_t
new_value(unpickler *u, pv_kind kind)
{
	pv		   *v;

	if (!grow((void **) &u->values, &u->cap_values, (int64_t) u->num_values + 1,
			  sizeof(pv), PKL_MAX_VALUES))
	{
		pkl_fail(u, "more than %d objects, or out of memory", PKL_MAX_VALUES);
		return -1;
	}
	v = &u->values[u->num_values];
	memset(v, 0, sizeof(*v));
	v->kind = (uint8_t) kind;
	return u->num_values++;
}

static osv_status
push(unpickler *u, int32_t v)
{
	if (v < 0)
		return OSV_ERR_MODEL;
	if (u->sp >= PKL_MAX_STACK)
		return pkl_fail(u, "stack deeper than %d", PKL_MAX_STACK);
	u->stack[u->sp++] = v;
	return OSV_OK;
}

/* The stack floor: the last mark, or 0. */
static int32_t
floor_sp(const unpickler *u)
{
	return u->num_marks ? u->marks[u->num_marks - 1] : 0;
}

/* Pop one value above the last mark into *v. */
static osv_status
pop(unpickler *u, int32_t *v)
{
	if (u->sp <= floor_sp(u))
		return pkl_fail(u, "stack underflow");
	*v = u->stack[--u->sp];
	return OSV_OK;
}

/* Append item to container c (list, tuple under construction, dict). */
static osv_status
add_item(unpickler *u, int32_t c, int32_t item)
{
	pv		   *v = &u->values[c];

	if (!grow((void **) &v->items, &v->cap, (int64_t) v->n + 1, sizeof(int32_t),
			  PKL_MAX_VALUES))
		return pkl_fail(u, "container too large, or out of memory");
	v->items[v->n++] = item;
	return OSV_OK;
}

/* Read n bytes at the current position. */
static osv_status
take(unpickler *u, size_t n, const uint8_t **out)
{
	if (u->size - u->pos < n)
		return osv_fail(u->err, OSV_ERR_MODEL,
						"data.pkl at byte %zu: truncated (%zu bytes wanted, %zu left)",
						u->pos, n, u->size - u->pos);
	*out = u->p + u->pos;
	u->pos += n;
	return OSV_OK;
}

static uint64_t
le(const uint8_t *b, int n)
{
	uint64_t	v = 0;

	for (int i = n - 1; i >= 0; i--)
		v = (v << 8) | b[i];
	return v;
}

/* A string value of bytes [s, s + len). */
static osv_status
push_str(unpickler *u, const uint8_t *s, uint64_t len)
{
	int32_t		v = new_value(u, PV_STR);

	if (v < 0)
		return OSV_ERR_MODEL;
	u->values[v].s = s;
	u->values[v].len = len;
	return push(u, v);
}

static osv_status
push_int(unpickler *u, pv_kind kind, int64_t i)
{
	int32_t		v = new_value(u, kind);

	if (v < 0)
		return OSV_ERR_MODEL;
	u->values[v].i = i;
	return push(u, v);
}

/* Does value v hold the string text? */
static bool
str_is(const unpickler *u, int32_t v, const char *text)
{
	const pv   *x = &u->values[v];
	size_t		n = strlen(text);

	return x->kind == PV_STR && x->len == n && memcmp(x->s, text, n) == 0;
}

/* Resolve module.name against the allow-list; never anything else. */
static osv_status
push_global(unpickler *u, const uint8_t *module, size_t mlen, const uint8_t *name,
			size_t nlen)
{
	char		shown[300];
	size_t		j = 0;

	for (size_t i = 0; i < sizeof(allowed_globals) / sizeof(allowed_globals[0]); i++)
	{
		if (strlen(allowed_globals[i].module) == mlen &&
			memcmp(allowed_globals[i].module, module, mlen) == 0 &&
			strlen(allowed_globals[i].name) == nlen &&
			memcmp(allowed_globals[i].name, name, nlen) == 0)
		{
			int32_t		v = new_value(u, PV_GLOBAL);

			if (v < 0)
				return OSV_ERR_MODEL;
			u->values[v].global = (uint8_t) allowed_globals[i].global;
			u->values[v].dtype = (uint8_t) allowed_globals[i].dtype;
			return push(u, v);
		}
	}
	/* name the refused global, printable and short */
	for (size_t i = 0; i < mlen + 1 + nlen && j + 5 < sizeof(shown) && i < 200; i++)
	{
		uint8_t		c = i < mlen ? module[i] : i == mlen ? '.' : name[i - mlen - 1];

		if (c >= 0x20 && c < 0x7f && c != '"')
			shown[j++] = (char) c;
		else
			j += (size_t) snprintf(shown + j, sizeof(shown) - j, "\\x%02x", c);
	}
	shown[j] = '\0';
	return pkl_fail(u, "the pickle names \"%s\", which is not allowed: a weights file may only hold a state dict of tensors, and nothing in it is executed",
					shown);
}

/* An integer value, or an error naming what. */
static osv_status
get_int(unpickler *u, int32_t v, const char *what, int64_t *out)
{
	if (u->values[v].kind != PV_INT && u->values[v].kind != PV_BOOL)
		return pkl_fail(u, "%s is a %s, expected an int", what,
						kind_names[u->values[v].kind]);
	*out = u->values[v].i;
	return OSV_OK;
}

/* BINPERSID: ('storage', <Type>Storage, key, location, numel). */
static osv_status
persistent_load(unpickler *u, int32_t pid)
{
	const pv   *t = &u->values[pid];
	const osv_zip_entry *e;
	char		entry[PKL_MAX_NAME + 64];
	int64_t		numel = 0;
	uint64_t	nbytes;
	int32_t		cls,
				key,
				v;
	size_t		es;
	osv_status	st;

	if (t->kind != PV_TUPLE || t->n != 5 || !str_is(u, t->items[0], "storage"))
		return pkl_fail(u, "persistent id is not ('storage', type, key, location, numel)");
	cls = t->items[1];
	key = t->items[2];
	if (u->values[cls].kind != PV_GLOBAL || u->values[cls].global != G_STORAGE)
		return pkl_fail(u, "persistent id names a %s, not a torch storage class",
						kind_names[u->values[cls].kind]);
	if (u->values[key].kind != PV_STR || u->values[key].len == 0 ||
		u->values[key].len > PKL_MAX_NAME ||
		memchr(u->values[key].s, '\0', (size_t) u->values[key].len) != NULL)
		return pkl_fail(u, "storage key is not a short string");
	if ((st = get_int(u, t->items[4], "storage numel", &numel)) != OSV_OK)
		return st;
	es = osv_dtype_size((osv_dtype) u->values[cls].dtype);
	if (numel < 0 || __builtin_mul_overflow((uint64_t) numel, (uint64_t) es, &nbytes))
		return pkl_fail(u, "storage numel %lld is out of range", (long long) numel);
	snprintf(entry, sizeof(entry), "%sdata/%.*s", u->prefix, (int) u->values[key].len,
			 (const char *) u->values[key].s);
	e = osv_zip_find(u->zip, entry);
	if (e == NULL)
		return pkl_fail(u, "storage \"%s\" has no entry in the archive", entry);
	if (e->size < nbytes)
		return pkl_fail(u, "storage \"%s\" holds %llu bytes, its %lld %s elements need %llu",
						entry, (unsigned long long) e->size, (long long) numel,
						osv_dtype_name((osv_dtype) u->values[cls].dtype),
						(unsigned long long) nbytes);
	v = new_value(u, PV_STORAGE);
	if (v < 0)
		return OSV_ERR_MODEL;
	u->values[v].dtype = u->values[cls].dtype;
	u->values[v].i = numel;
	u->values[v].s = e->data;
	u->values[v].len = e->size;
	return push(u, v);
}

/* A tuple of ints into dims[]; returns the count or -1 after an error. */
static int
int_tuple(unpickler *u, int32_t v, const char *what, int64_t *dims)
{
	const pv   *t = &u->values[v];

	if (t->kind != PV_TUPLE)
	{
		pkl_fail(u, "tensor %s is a %s, expected a tuple", what, kind_names[t->kind]);
		return -1;
	}
	if (t->n > OSV_MAX_DIMS)
	{
		pkl_fail(u, "tensor has %d dimensions, at most %d are supported", t->n,
				 OSV_MAX_DIMS);
		return -1;
	}
	for (int i = 0; i < t->n; i++)
	{
		if (get_int(u, t->items[i], what, &dims[i]) != OSV_OK)
			return -1;
		if (dims[i] < 0)
		{
			pkl_fail(u, "tensor %s has a negative entry %lld", what, (long long) dims[i]);
			return -1;
		}
	}
	return t->n;
}

/* _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata]). */
static osv_status
rebuild_tensor(unpickler *u, int32_t args)
{
	const pv   *a = &u->values[args];
	pending_tensor t;
	const pv   *s;
	int			nstride;
	uint64_t	last = 0;
	int32_t		v;
	osv_status	st;

	memset(&t, 0, sizeof(t));
	if (a->kind != PV_TUPLE || a->n < 4 || a->n > 7)
		return pkl_fail(u, "_rebuild_tensor_v2 called with %d arguments, expected 6",
						a->kind == PV_TUPLE ? a->n : -1);
	t.storage = a->items[0];
	s = &u->values[t.storage];
	if (s->kind != PV_STORAGE)
		return pkl_fail(u, "_rebuild_tensor_v2 storage is a %s", kind_names[s->kind]);
	if ((st = get_int(u, a->items[1], "storage offset", &t.offset)) != OSV_OK)
		return st;
	if (t.offset < 0)
		return pkl_fail(u, "negative storage offset %lld", (long long) t.offset);
	if ((t.ndim = int_tuple(u, a->items[2], "size", t.shape)) < 0 ||
		(nstride = int_tuple(u, a->items[3], "stride", t.stride)) < 0)
		return OSV_ERR_MODEL;
	if (nstride != t.ndim)
		return pkl_fail(u, "tensor has %d sizes but %d strides", t.ndim, nstride);

	/*
	 * The last element addressed: offset + sum((size - 1) * stride), which
	 * must lie inside the storage (unless the tensor is empty).
	 */
	{
		bool		empty = false;
		uint64_t	count = 1;

		for (int d = 0; d < t.ndim; d++)
		{
			if (t.shape[d] == 0)
				empty = true;
			if (__builtin_mul_overflow(count, (uint64_t) t.shape[d], &count))
				return pkl_fail(u, "tensor element count overflows");
		}
		if (!empty)
		{
			last = (uint64_t) t.offset;
			for (int d = 0; d < t.ndim; d++)
			{
				uint64_t	step;

				if (__builtin_mul_overflow((uint64_t) (t.shape[d] - 1),
										   (uint64_t) t.stride[d], &step) ||
					__builtin_add_overflow(last, step, &last))
					return pkl_fail(u, "tensor extent overflows");
			}
			if (last >= (uint64_t) s->i)
				return pkl_fail(u, "tensor at offset %lld reaches element %llu of a storage of %lld elements",
								(long long) t.offset, (unsigned long long) last,
								(long long) s->i);
		}
	}
	if (!grow((void **) &u->tensors, &u->cap_tensors, (int64_t) u->num_tensors + 1,
			  sizeof(pending_tensor), PKL_MAX_TENSORS))
		return pkl_fail(u, "more than %d tensors, or out of memory", PKL_MAX_TENSORS);
	u->tensors[u->num_tensors] = t;
	v = new_value(u, PV_TENSOR);
	if (v < 0)
		return OSV_ERR_MODEL;
	u->values[v].i = u->num_tensors++;
	return push(u, v);
}

/* REDUCE: callable(args) for the allowed callables. */
static osv_status
reduce(unpickler *u)
{
	int32_t		fn = -1,
				args = -1,
				v;
	osv_status	st;

	if ((st = pop(u, &args)) != OSV_OK || (st = pop(u, &fn)) != OSV_OK)
		return st;
	if (u->values[fn].kind != PV_GLOBAL)
		return pkl_fail(u, "REDUCE on a %s, which is not callable",
						kind_names[u->values[fn].kind]);
	if (u->values[args].kind != PV_TUPLE)
		return pkl_fail(u, "REDUCE arguments are a %s, not a tuple",
						kind_names[u->values[args].kind]);
	switch ((pv_global) u->values[fn].global)
	{
		case G_ORDERED_DICT:
			if (u->values[args].n != 0)
				return pkl_fail(u, "OrderedDict called with arguments");
			v = new_value(u, PV_DICT);
			return push(u, v);
		case G_REBUILD_TENSOR_V2:
			return rebuild_tensor(u, args);
		case G_REBUILD_PARAMETER:
			/* (tensor, requires_grad, hooks): the tensor itself */
			if (u->values[args].n < 1 ||
				u->values[u->values[args].items[0]].kind != PV_TENSOR)
				return pkl_fail(u, "_rebuild_parameter needs a tensor");
			return push(u, u->values[args].items[0]);
		case G_STORAGE:
			break;
	}
	return pkl_fail(u, "a storage class is only allowed in a persistent id");
}

/* Pop everything above the last mark into a new container of kind. */
static osv_status
collect_mark(unpickler *u, pv_kind kind, int32_t *out)
{
	int32_t		base,
				v;
	osv_status	st;

	if (u->num_marks == 0)
		return pkl_fail(u, "no MARK on the stack");
	base = u->marks[--u->num_marks];
	v = new_value(u, kind);
	if (v < 0)
		return OSV_ERR_MODEL;
	for (int32_t i = base; i < u->sp; i++)
		if ((st = add_item(u, v, u->stack[i])) != OSV_OK)
			return st;
	u->sp = base;
	*out = v;
	return OSV_OK;
}

/* Add the key/value pairs above the last mark (or the top two) to the dict below. */
static osv_status
set_items(unpickler *u, bool marked)
{
	int32_t		base,
				dict;
	osv_status	st;

	if (marked)
	{
		if (u->num_marks == 0)
			return pkl_fail(u, "no MARK on the stack");
		base = u->marks[--u->num_marks];
	}
	else
		base = u->sp - 2;
	if (base < 1 || base < floor_sp(u) + 1 || ((u->sp - base) & 1))
		return pkl_fail(u, "SETITEM(S) without a dict and key/value pairs");
	dict = u->stack[base - 1];
	if (u->values[dict].kind != PV_DICT)
		return pkl_fail(u, "SETITEM(S) on a %s", kind_names[u->values[dict].kind]);
	for (int32_t i = base; i < u->sp; i++)
		if ((st = add_item(u, dict, u->stack[i])) != OSV_OK)
			return st;
	u->sp = base;
	return OSV_OK;
}

/* APPEND / APPENDS onto the list below. */
static osv_status
append_items(unpickler *u, bool marked)
{
	int32_t		base,
				list;
	osv_status	st;

	if (marked)
	{
		if (u->num_marks == 0)
			return pkl_fail(u, "no MARK on the stack");
		base = u->marks[--u->num_marks];
	}
	else
		base = u->sp - 1;
	if (base < 1 || base < floor_sp(u) + 1)
		return pkl_fail(u, "APPEND(S) without a list");
	list = u->stack[base - 1];
	if (u->values[list].kind != PV_LIST)
		return pkl_fail(u, "APPEND(S) on a %s", kind_names[u->values[list].kind]);
	for (int32_t i = base; i < u->sp; i++)
		if ((st = add_item(u, list, u->stack[i])) != OSV_OK)
			return st;
	u->sp = base;
	return OSV_OK;
}

static osv_status
memo_put(unpickler *u, uint64_t index)
{
	if (u->sp <= 0)
		return pkl_fail(u, "memo put with an empty stack");
	if (index >= PKL_MAX_MEMO)
		return pkl_fail(u, "memo index %llu exceeds the limit of %d",
						(unsigned long long) index, PKL_MAX_MEMO);
	if ((int64_t) index >= u->memo_cap)
	{
		int32_t		old = u->memo_cap;

		if (!grow((void **) &u->memo, &u->memo_cap, (int64_t) index + 1, sizeof(int32_t),
				  PKL_MAX_MEMO))
			return pkl_fail(u, "out of memory for the memo");
		for (int32_t i = old; i < u->memo_cap; i++)
			u->memo[i] = -1;
	}
	u->memo[index] = u->stack[u->sp - 1];
	return OSV_OK;
}

static osv_status
memo_get(unpickler *u, uint64_t index)
{
	if ((int64_t) index >= u->memo_cap || u->memo[index] < 0)
		return pkl_fail(u, "memo index %llu was never stored", (unsigned long long) index);
	return push(u, u->memo[index]);
}

/* Run data.pkl to its STOP; *result is the value it returns. */
static osv_status
run(unpickler *u, int32_t *result)
{
	int32_t		memoize_next = 0;

	for (;;)
	{
		const uint8_t *b = NULL;
		uint8_t		op;
		size_t		at = u->pos;
		int32_t		x = -1,
					y = -1,
					v = -1;
		osv_status	st;

		if ((st = take(u, 1, &b)) != OSV_OK)
			return osv_fail(u->err, OSV_ERR_MODEL,
							"data.pkl is truncated: no STOP opcode before byte %zu", u->size);
		op = b[0];
		u->pos = at;			/* messages point at the opcode */
		u->pos++;
		switch (op)
		{
			case 0x80:			/* PROTO */
				if ((st = take(u, 1, &b)) != OSV_OK)
					return st;
				if (b[0] < 2 || b[0] > 5)
					return pkl_fail(u, "pickle protocol %d is not supported", b[0]);
				break;
			case 0x95:			/* FRAME: a length hint */
				if ((st = take(u, 8, &b)) != OSV_OK)
					return st;
				break;
			case '(':			/* MARK */
				if (u->num_marks >= PKL_MAX_MARKS)
					return pkl_fail(u, "more than %d nested MARKs", PKL_MAX_MARKS);
				u->marks[u->num_marks++] = u->sp;
				break;
			case '.':			/* STOP */
				if (u->sp != 1 || u->num_marks != 0)
					return pkl_fail(u, "STOP with %d values and %d marks on the stack, expected 1 and 0",
									u->sp, u->num_marks);
				*result = u->stack[0];
				return OSV_OK;
			case '0':			/* POP */
				if ((st = pop(u, &x)) != OSV_OK)
					return st;
				break;
			case 'N':
				if ((st = push_int(u, PV_NONE, 0)) != OSV_OK)
					return st;
				break;
			case 0x88:			/* NEWTRUE */
			case 0x89:			/* NEWFALSE */
				if ((st = push_int(u, PV_BOOL, op == 0x88)) != OSV_OK)
					return st;
				break;
			case 'J':			/* BININT */
				if ((st = take(u, 4, &b)) != OSV_OK ||
					(st = push_int(u, PV_INT, (int32_t) (uint32_t) le(b, 4))) != OSV_OK)
					return st;
				break;
			case 'K':			/* BININT1 */
				if ((st = take(u, 1, &b)) != OSV_OK ||
					(st = push_int(u, PV_INT, b[0])) != OSV_OK)
					return st;
				break;
			case 'M':			/* BININT2 */
				if ((st = take(u, 2, &b)) != OSV_OK ||
					(st = push_int(u, PV_INT, (int64_t) le(b, 2))) != OSV_OK)
					return st;
				break;
			case 0x8a:			/* LONG1: little-endian two's complement */
				{
					uint64_t	raw;
					int64_t		val;

					if ((st = take(u, 1, &b)) != OSV_OK)
						return st;
					x = b[0];
					if (x > 8)
						return pkl_fail(u, "integer of %d bytes is out of range", x);
					if ((st = take(u, (size_t) x, &b)) != OSV_OK)
						return st;
					raw = x ? le(b, x) : 0;
					if (x > 0 && x < 8 && (b[x - 1] & 0x80))
						raw |= ~(uint64_t) 0 << (8 * x);
					memcpy(&val, &raw, sizeof(val));
					if ((st = push_int(u, PV_INT, val)) != OSV_OK)
						return st;
					break;
				}
			case 'G':			/* BINFLOAT, big-endian: kept as a float, unused */
				if ((st = take(u, 8, &b)) != OSV_OK ||
					(st = push_int(u, PV_FLOAT, 0)) != OSV_OK)
					return st;
				break;
			case 'X':			/* BINUNICODE */
			case 0x8c:			/* SHORT_BINUNICODE */
			case 0x8d:			/* BINUNICODE8 */
				{
					int			n = op == 'X' ? 4 : op == 0x8c ? 1 : 8;
					uint64_t	len;

					if ((st = take(u, (size_t) n, &b)) != OSV_OK)
						return st;
					len = le(b, n);
					if (len > u->size - u->pos)
						return pkl_fail(u, "string of %llu bytes runs past the end",
										(unsigned long long) len);
					if ((st = take(u, (size_t) len, &b)) != OSV_OK ||
						(st = push_str(u, b, len)) != OSV_OK)
						return st;
					break;
				}
			case ')':			/* EMPTY_TUPLE */
				if ((v = new_value(u, PV_TUPLE)) < 0 || (st = push(u, v)) != OSV_OK)
					return OSV_ERR_MODEL;
				break;
			case ']':			/* EMPTY_LIST */
				if ((v = new_value(u, PV_LIST)) < 0 || (st = push(u, v)) != OSV_OK)
					return OSV_ERR_MODEL;
				break;
			case '}':			/* EMPTY_DICT */
				if ((v = new_value(u, PV_DICT)) < 0 || (st = push(u, v)) != OSV_OK)
					return OSV_ERR_MODEL;
				break;
			case 't':			/* TUPLE */
				if ((st = collect_mark(u, PV_TUPLE, &v)) != OSV_OK ||
					(st = push(u, v)) != OSV_OK)
					return st;
				break;
			case 0x85:			/* TUPLE1 */
			case 0x86:			/* TUPLE2 */
			case 0x87:			/* TUPLE3 */
				{
					int			n = op - 0x84;

					if (u->sp - floor_sp(u) < n)
						return pkl_fail(u, "stack underflow");
					if ((v = new_value(u, PV_TUPLE)) < 0)
						return OSV_ERR_MODEL;
					for (int i = u->sp - n; i < u->sp; i++)
						if ((st = add_item(u, v, u->stack[i])) != OSV_OK)
							return st;
					u->sp -= n;
					if ((st = push(u, v)) != OSV_OK)
						return st;
					break;
				}
			case 's':			/* SETITEM */
				if ((st = set_items(u, false)) != OSV_OK)
					return st;
				break;
			case 'u':			/* SETITEMS */
				if ((st = set_items(u, true)) != OSV_OK)
					return st;
				break;
			case 'a':			/* APPEND */
				if ((st = append_items(u, false)) != OSV_OK)
					return st;
				break;
			case 'e':			/* APPENDS */
				if ((st = append_items(u, true)) != OSV_OK)
					return st;
				break;
			case 'q':			/* BINPUT */
				if ((st = take(u, 1, &b)) != OSV_OK || (st = memo_put(u, b[0])) != OSV_OK)
					return st;
				break;
			case 'r':			/* LONG_BINPUT */
				if ((st = take(u, 4, &b)) != OSV_OK || (st = memo_put(u, le(b, 4))) != OSV_OK)
					return st;
				break;
			case 0x94:			/* MEMOIZE */
				if ((st = memo_put(u, (uint64_t) memoize_next)) != OSV_OK)
					return st;
				memoize_next++;
				break;
			case 'h':			/* BINGET */
				if ((st = take(u, 1, &b)) != OSV_OK || (st = memo_get(u, b[0])) != OSV_OK)
					return st;
				break;
			case 'j':			/* LONG_BINGET */
				if ((st = take(u, 4, &b)) != OSV_OK || (st = memo_get(u, le(b, 4))) != OSV_OK)
					return st;
				break;
			case 'c':			/* GLOBAL: "module\nname\n" */
				{
					const uint8_t *m = u->p + u->pos,
							   *nl1,
							   *n,
							   *nl2;
					size_t		left = u->size - u->pos;

					nl1 = memchr(m, '\n', left < 256 ? left : 256);
					if (nl1 == NULL)
						return pkl_fail(u, "GLOBAL module name is unterminated or too long");
					n = nl1 + 1;
					left = u->size - (size_t) (n - u->p);
					nl2 = memchr(n, '\n', left < 256 ? left : 256);
					if (nl2 == NULL)
						return pkl_fail(u, "GLOBAL name is unterminated or too long");
					if ((st = push_global(u, m, (size_t) (nl1 - m), n,
										  (size_t) (nl2 - n))) != OSV_OK)
						return st;
					u->pos = (size_t) (nl2 + 1 - u->p);
					break;
				}
			case 0x93:			/* STACK_GLOBAL */
				if ((st = pop(u, &y)) != OSV_OK || (st = pop(u, &x)) != OSV_OK)
					return st;
				if (u->values[x].kind != PV_STR || u->values[y].kind != PV_STR ||
					u->values[x].len > 255 || u->values[y].len > 255)
					return pkl_fail(u, "STACK_GLOBAL needs two short strings");
				if ((st = push_global(u, u->values[x].s, (size_t) u->values[x].len,
									  u->values[y].s, (size_t) u->values[y].len)) != OSV_OK)
					return st;
				break;
			case 'R':			/* REDUCE */
				if ((st = reduce(u)) != OSV_OK)
					return st;
				break;
			case 'b':			/* BUILD: only a dict's attributes, ignored */
				if ((st = pop(u, &y)) != OSV_OK)
					return st;
				if (u->sp <= floor_sp(u) || u->values[u->stack[u->sp - 1]].kind != PV_DICT)
					return pkl_fail(u, "BUILD is only allowed on an OrderedDict");
				break;
			case 'Q':			/* BINPERSID */
				if ((st = pop(u, &x)) != OSV_OK || (st = persistent_load(u, x)) != OSV_OK)
					return st;
				break;
			default:
				return pkl_fail(u, "pickle opcode 0x%02x is not allowed in a weights file", op);
		}
	}
}

/* qsort order of tensors by name. */
static int
cmp_name(const void *a, const void *b)
{
	return strcmp(((const osv_tensor *) a)->name, ((const osv_tensor *) b)->name);
}

/* Turn the state dict value into the name-sorted tensor table. */
static osv_status
build_table(unpickler *u, int32_t dict, osv_pytorch *out)
{
	const pv   *d = &u->values[dict];
	size_t		names_size = 0;
	int			n = 0;
	char	   *next;

	if (d->kind != PV_DICT)
		return osv_fail(u->err, OSV_ERR_MODEL,
						"data.pkl holds a %s, not a state dict (an OrderedDict of tensors)",
						kind_names[d->kind]);
	for (int32_t i = 0; i + 1 < d->n; i += 2)
	{
		const pv   *k = &u->values[d->items[i]];

		if (u->values[d->items[i + 1]].kind != PV_TENSOR)
			continue;			/* extra state: not weights */
		if (k->kind != PV_STR || k->len > PKL_MAX_NAME ||
			memchr(k->s, '\0', (size_t) k->len) != NULL)
			return osv_fail(u->err, OSV_ERR_MODEL,
							"data.pkl: a state dict key is not a string of at most %d bytes",
							PKL_MAX_NAME);
		names_size += (size_t) k->len + 1;
		n++;
	}
	if (n == 0)
		return osv_fail(u->err, OSV_ERR_MODEL, "data.pkl: the state dict holds no tensors");
	out->tensors = calloc((size_t) n, sizeof(osv_tensor));
	out->names = malloc(names_size);
	if (out->tensors == NULL || out->names == NULL)
		return osv_fail(u->err, OSV_ERR_NOMEM, "out of memory indexing %d tensors", n);
	next = out->names;
	for (int32_t i = 0; i + 1 < d->n; i += 2)
	{
		const pv   *k = &u->values[d->items[i]];
		const pv   *tv = &u->values[d->items[i + 1]];
		const pending_tensor *p;
		const pv   *s;
		osv_tensor *t;
		size_t		es;
		uint64_t	step = 1;

		if (tv->kind != PV_TENSOR)
			continue;
		p = &u->tensors[tv->i];
		s = &u->values[p->storage];
		t = &out->tensors[out->num_tensors++];
		memcpy(next, k->s, (size_t) k->len);
		next[k->len] = '\0';
		t->name = next;
		next += k->len + 1;
		t->dtype = (osv_dtype) s->dtype;
		es = osv_dtype_size(t->dtype);
		t->ndim = p->ndim;
		t->num_elements = 1;
		t->contiguous = true;
		for (int dd = p->ndim - 1; dd >= 0; dd--)
		{
			t->shape[dd] = p->shape[dd];
			t->stride[dd] = p->stride[dd];
			/* size-1 dimensions may carry any stride */
			if (p->shape[dd] != 1 && (uint64_t) p->stride[dd] != step)
				t->contiguous = false;
			step *= (uint64_t) (p->shape[dd] ? p->shape[dd] : 1);
			t->num_elements *= (uint64_t) p->shape[dd];
		}
		if (t->num_elements == 0)
		{
			t->data = s->s;
			t->nbytes = 0;
			continue;
		}
		/* checked in rebuild_tensor: offset and extent lie inside the storage */
		{
			uint64_t	last = (uint64_t) p->offset;

			for (int dd = 0; dd < p->ndim; dd++)
				last += (uint64_t) (p->shape[dd] - 1) * (uint64_t) p->stride[dd];
			t->data = s->s + (size_t) p->offset * es;
			t->nbytes = (size_t) (last - (uint64_t) p->offset + 1) * es;
		}
	}
	qsort(out->tensors, (size_t) out->num_tensors, sizeof(osv_tensor), cmp_name);
	for (int i = 1; i < out->num_tensors; i++)
		if (strcmp(out->tensors[i - 1].name, out->tensors[i].name) == 0)
			return osv_fail(u->err, OSV_ERR_MODEL,
							"data.pkl: tensor %s appears twice in the state dict",
							out->tensors[i].name);
	return OSV_OK;
}

/* Does buf look like the legacy format: a bare pickle stream? */
static bool
is_legacy(const uint8_t *buf, size_t size)
{
	/* torch < 1.6 began with a pickled magic number after PROTO 2 */
	return size >= 2 && buf[0] == 0x80 && buf[1] <= 5;
}

osv_status
osv_pytorch_parse(const uint8_t *buf, size_t size, osv_pytorch *out, osv_error *err)
{
	unpickler	u;
	const osv_zip_entry *pkl = NULL,
			   *e;
	char		prefix[PKL_MAX_NAME + 2];
	char		name[PKL_MAX_NAME + 32];
	int32_t		result = -1;
	osv_status	st;

	memset(out, 0, sizeof(*out));
	if (is_legacy(buf, size))
		return osv_fail(err, OSV_ERR_MODEL,
						"PyTorch checkpoint in the legacy format of torch before 1.6 (a bare pickle stream), which is not supported: load it with torch and save it again with torch >= 1.6, or convert it to model.safetensors");
	if (size >= 2 && buf[0] == 0x1f && buf[1] == 0x8b)
		return osv_fail(err, OSV_ERR_MODEL,
						"the weights file is gzip-compressed: decompress it first");
	if (size < 4 || memcmp(buf, "PK\003\004", 4) != 0)
		return osv_fail(err, OSV_ERR_MODEL,
						"not a PyTorch checkpoint: the file does not start like a zip archive");
	if ((st = osv_zip_parse(buf, size, &out->zip, err)) != OSV_OK)
		return st;

	/* exactly one <folder>/data.pkl, at depth one */
	for (int i = 0; i < out->zip.num_entries; i++)
	{
		const char *n = out->zip.entries[i].name;
		const char *slash = strchr(n, '/');

		if (slash != NULL && slash != n && strcmp(slash + 1, "data.pkl") == 0)
		{
			if (pkl != NULL)
			{
				osv_pytorch_close(out);
				return osv_fail(err, OSV_ERR_MODEL,
								"the archive holds more than one data.pkl");
			}
			pkl = &out->zip.entries[i];
		}
	}
	if (pkl == NULL || strlen(pkl->name) - strlen("data.pkl") > PKL_MAX_NAME)
	{
		osv_pytorch_close(out);
		return osv_fail(err, OSV_ERR_MODEL,
						"not a PyTorch checkpoint: the zip archive has no <folder>/data.pkl");
	}
	snprintf(prefix, sizeof(prefix), "%.*s", (int) (strlen(pkl->name) - strlen("data.pkl")),
			 pkl->name);

	snprintf(name, sizeof(name), "%sbyteorder", prefix);
	e = osv_zip_find(&out->zip, name);
	if (e != NULL && !(e->size == 6 && memcmp(e->data, "little", 6) == 0))
	{
		bool		big = e->size == 3 && memcmp(e->data, "big", 3) == 0;

		osv_pytorch_close(out);
		if (big)
			return osv_fail(err, OSV_ERR_MODEL,
							"the checkpoint was saved on a big-endian machine, which is not supported: load it with torch and save it again on a little-endian one, or convert it to model.safetensors");
		return osv_fail(err, OSV_ERR_MODEL, "the checkpoint's byteorder entry is neither little nor big");
	}
	if (pkl->size > PKL_MAX_BYTES)
	{
		osv_pytorch_close(out);
		return osv_fail(err, OSV_ERR_MODEL, "data.pkl of %llu bytes exceeds the limit of %llu",
						(unsigned long long) pkl->size, (unsigned long long) PKL_MAX_BYTES);
	}

	memset(&u, 0, sizeof(u));
	u.p = pkl->data;
	u.size = (size_t) pkl->size;
	u.zip = &out->zip;
	u.prefix = prefix;
	u.err = err;
	u.stack = malloc(PKL_MAX_STACK * sizeof(int32_t));
	if (u.stack == NULL)
		st = osv_fail(err, OSV_ERR_NOMEM, "out of memory for the unpickler");
	else
		st = run(&u, &result);
	if (st == OSV_OK)
		st = build_table(&u, result, out);
	for (int32_t i = 0; i < u.num_values; i++)
		free(u.values[i].items);
	free(u.values);
	free(u.stack);
	free(u.memo);
	free(u.tensors);
	if (st != OSV_OK)
	{
		osv_pytorch_close(out);
		return st;
	}
	return OSV_OK;
}

/* mmap path read-only and parse it; the mapping lives until close. */
osv_status
osv_pytorch_open(const char *path, osv_pytorch *out, osv_error *err)
{
	char		label[1100];
	uint64_t	size;
	void	   *map;
	int			fd;
	osv_status	st;

	memset(out, 0, sizeof(*out));
	osv_file_label(label, sizeof(label), NULL, path);
	st = osv_file_open(path, label, &fd, &size, NULL, err);
	if (st != OSV_OK)
		return st;
	if (size < 22)
	{
		close(fd);
		return osv_fail(err, OSV_ERR_MODEL,
						"not a PyTorch checkpoint: %llu bytes, too short for a zip archive",
						(unsigned long long) size);
	}
	if (size > SIZE_MAX)
	{
		close(fd);
		return osv_fail(err, OSV_ERR_LIMIT, "\"%s\" is too large to map", path);
	}
	/* shared and read-only, as model.safetensors: see safetensors.c */
	map = mmap(NULL, (size_t) size, PROT_READ, MAP_SHARED, fd, 0);
	if (map == MAP_FAILED)
	{
		int			e = errno;

		close(fd);
		return osv_fail(err, OSV_ERR_IO, "could not map \"%s\": %s", path, strerror(e));
	}
	close(fd);
	osv_map_populate(map, (size_t) size);
	st = osv_pytorch_parse(map, (size_t) size, out, err);
	if (st != OSV_OK)
	{
		munmap(map, (size_t) size);
		return st;
	}
	out->map = map;
	out->map_size = (size_t) size;
	return OSV_OK;
}

void
osv_pytorch_close(osv_pytorch *pt)
{
	if (pt == NULL)
		return;
	free(pt->tensors);
	free(pt->names);
	osv_zip_free(&pt->zip);
	if (pt->map != NULL)
		munmap(pt->map, pt->map_size);
	memset(pt, 0, sizeof(*pt));
}
