/*
 * json.c: a small validating JSON reader (RFC 8259) for the safetensors
 * header and config.json.
 *
 * The parser is recursive descent over a byte range that need not be
 * NUL-terminated.  The result is a flat array of nodes in document order
 * (preorder): a container's children follow it, linked by first_child and
 * next_sibling.  Unescaped strings live in one arena allocated up front:
 * an unescaped string plus its NUL is never longer than its quoted source
 * text, so len + 1 bytes always suffice and string pointers never move.
 *
 * Invariants and limits, because the input is untrusted:
 *   - nesting depth is at most JSON_MAX_DEPTH (no stack exhaustion);
 *   - at most JSON_MAX_NODES nodes (bounded memory);
 *   - numbers must follow the JSON grammar and be finite doubles;
 *   - strings: no raw control characters, valid escapes only, \uXXXX
 *     including surrogate pairs becomes UTF-8, lone surrogates are errors;
 *   - nothing but whitespace may follow the top-level value.
 * On error the output is left empty and err names the byte offset.
 */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define JSON_MAX_DEPTH 64
#define JSON_MAX_NODES (1 << 20)
/* longer numbers are not worth the trouble: no float needs them */
#define JSON_MAX_NUMBER_LEN 400

typedef struct json_parser
{
	const char *text;
	size_t		len;
	size_t		pos;
	osv_json   *out;
	int			capacity;		/* allocated nodes */
	char	   *arena_next;		/* next free byte of out->strings */
	osv_error  *err;
} json_parser;

/* Report a syntax error at the current position. */
static osv_status
json_error(json_parser *p, const char *what)
{
	return osv_fail(p->err, OSV_ERR_MODEL, "invalid JSON at byte %zu: %s",
					p->pos, what);
}

/* Skip JSON whitespace (space, tab, CR, LF only). */
static void
json_skip_ws(json_parser *p)
{
	while (p->pos < p->len)
	{
		char		c = p->text[p->pos];

		if (c != ' ' && c != '\t' && c != '\r' && c != '\n')
			break;
		p->pos++;
	}
}

/* Append a node of the given type; *index receives its position. */
static osv_status
json_new_node(json_parser *p, osv_json_type type, int parent, int *index)
{
	osv_json_node *node;

	if (p->out->num_nodes >= JSON_MAX_NODES)
		return json_error(p, "too many values");
	if (p->out->num_nodes == p->capacity)
	{
		int			capacity = p->capacity ? p->capacity * 2 : 64;
		osv_json_node *nodes;

		if (capacity > JSON_MAX_NODES)
			capacity = JSON_MAX_NODES;
		nodes = realloc(p->out->nodes, (size_t) capacity * sizeof(*nodes));
		if (nodes == NULL)
			return osv_fail(p->err, OSV_ERR_NOMEM,
							"out of memory parsing JSON (%d values)", capacity);
		p->out->nodes = nodes;
		p->capacity = capacity;
	}
	*index = p->out->num_nodes++;
	node = &p->out->nodes[*index];
	memset(node, 0, sizeof(*node));
	node->type = type;
	node->first_child = -1;
	node->next_sibling = -1;
	node->parent = parent;
	return OSV_OK;
}

/* Four hex digits at text[pos..pos+4) as a code unit, or -1. */
static long
json_hex4(const json_parser *p, size_t pos)
{
	long		v = 0;

	if (pos > p->len || p->len - pos < 4)
		return -1;
	for (int i = 0; i < 4; i++)
	{
		char		c = p->text[pos + i];
		int			d;

		if (c >= '0' && c <= '9')
			d = c - '0';
		else if (c >= 'a' && c <= 'f')
			d = c - 'a' + 10;
		else if (c >= 'A' && c <= 'F')
			d = c - 'A' + 10;
		else
			return -1;
		v = v * 16 + d;
	}
	return v;
}

/* Write code point cp as UTF-8 at *dst and advance it. */
static void
json_put_utf8(char **dst, unsigned long cp)
{
	unsigned char *d = (unsigned char *) *dst;

	if (cp < 0x80)
		*d++ = (unsigned char) cp;
	else if (cp < 0x800)
	{
		*d++ = (unsigned char) (0xc0 | (cp >> 6));
		*d++ = (unsigned char) (0x80 | (cp & 0x3f));
	}
	else if (cp < 0x10000)
	{
		*d++ = (unsigned char) (0xe0 | (cp >> 12));
		*d++ = (unsigned char) (0x80 | ((cp >> 6) & 0x3f));
		*d++ = (unsigned char) (0x80 | (cp & 0x3f));
	}
	else
	{
		*d++ = (unsigned char) (0xf0 | (cp >> 18));
		*d++ = (unsigned char) (0x80 | ((cp >> 12) & 0x3f));
		*d++ = (unsigned char) (0x80 | ((cp >> 6) & 0x3f));
		*d++ = (unsigned char) (0x80 | (cp & 0x3f));
	}
	*dst = (char *) d;
}

/*
 * Parse a string at p->pos (on the opening quote) into the arena.  The
 * arena cannot overflow: each escape produces no more bytes than it reads
 * (\uXXXX: 6 in, <= 3 out; a pair: 12 in, 4 out) and the two quotes pay
 * for the NUL.
 */
static osv_status
json_parse_string(json_parser *p, const char **str, size_t *str_len)
{
	char	   *start = p->arena_next;
	char	   *dst = start;

	p->pos++;					/* opening quote */
	for (;;)
	{
		unsigned char c;

		if (p->pos >= p->len)
			return json_error(p, "unterminated string");
		c = (unsigned char) p->text[p->pos];
		if (c == '"')
		{
			p->pos++;
			break;
		}
		if (c < 0x20)
			return json_error(p, "control character in string");
		if (c != '\\')
		{
			*dst++ = (char) c;
			p->pos++;
			continue;
		}
		if (p->pos + 1 >= p->len)
			return json_error(p, "unterminated string");
		c = (unsigned char) p->text[p->pos + 1];
		p->pos += 2;
		switch (c)
		{
			case '"':
			case '\\':
			case '/':
				*dst++ = (char) c;
				break;
			case 'b':
				*dst++ = '\b';
				break;
			case 'f':
				*dst++ = '\f';
				break;
			case 'n':
				*dst++ = '\n';
				break;
			case 'r':
				*dst++ = '\r';
				break;
			case 't':
				*dst++ = '\t';
				break;
			case 'u':
				{
					long		hi = json_hex4(p, p->pos);
					unsigned long cp;

					if (hi < 0)
						return json_error(p, "invalid \\u escape");
					p->pos += 4;
					cp = (unsigned long) hi;
					if (hi >= 0xdc00 && hi <= 0xdfff)
						return json_error(p, "unpaired low surrogate in \\u escape");
					if (hi >= 0xd800 && hi <= 0xdbff)
					{
						long		lo;

						if (p->pos + 2 > p->len || p->text[p->pos] != '\\' ||
							p->text[p->pos + 1] != 'u')
							return json_error(p, "unpaired high surrogate in \\u escape");
						lo = json_hex4(p, p->pos + 2);
						if (lo < 0xdc00 || lo > 0xdfff)
							return json_error(p, "unpaired high surrogate in \\u escape");
						p->pos += 6;
						cp = 0x10000 + (((unsigned long) hi - 0xd800) << 10) +
							((unsigned long) lo - 0xdc00);
					}
					json_put_utf8(&dst, cp);
					break;
				}
			default:
				p->pos--;
				return json_error(p, "invalid escape in string");
		}
	}
	*dst++ = '\0';
	p->arena_next = dst;
	*str = start;
	*str_len = (size_t) (dst - start - 1);
	return OSV_OK;
}

/* Parse a number per the JSON grammar, then convert it with strtod. */
static osv_status
json_parse_number(json_parser *p, double *value)
{
	size_t		start = p->pos;
	size_t		n;
	char		buf[JSON_MAX_NUMBER_LEN + 1];
	char	   *end;

#define PEEK() (p->pos < p->len ? p->text[p->pos] : '\0')
#define IS_DIGIT(c) ((c) >= '0' && (c) <= '9')
	if (PEEK() == '-')
		p->pos++;
	if (PEEK() == '0')
		p->pos++;
	else if (IS_DIGIT(PEEK()))
	{
		while (IS_DIGIT(PEEK()))
			p->pos++;
	}
	else
		return json_error(p, "invalid number");
	if (PEEK() == '.')
	{
		p->pos++;
		if (!IS_DIGIT(PEEK()))
			return json_error(p, "invalid number");
		while (IS_DIGIT(PEEK()))
			p->pos++;
	}
	if (PEEK() == 'e' || PEEK() == 'E')
	{
		p->pos++;
		if (PEEK() == '+' || PEEK() == '-')
			p->pos++;
		if (!IS_DIGIT(PEEK()))
			return json_error(p, "invalid number");
		while (IS_DIGIT(PEEK()))
			p->pos++;
	}
#undef PEEK
#undef IS_DIGIT

	/*
	 * strtod needs a NUL-terminated copy: the text is not terminated and may
	 * be followed by more digits-like bytes of the mapping.  The core runs
	 * with LC_NUMERIC "C" (PostgreSQL forces it; the tool never calls
	 * setlocale), so '.' is the decimal point strtod expects.
	 */
	n = p->pos - start;
	if (n > JSON_MAX_NUMBER_LEN)
	{
		p->pos = start;
		return json_error(p, "number too long");
	}
	memcpy(buf, p->text + start, n);
	buf[n] = '\0';
	*value = strtod(buf, &end);
	if (end != buf + n || !isfinite(*value))
	{
		p->pos = start;
		return json_error(p, "number out of range");
	}
	return OSV_OK;
}

/* Match the literal word at p->pos. */
static bool
json_literal(json_parser *p, const char *word)
{
	size_t		n = strlen(word);

	if (p->len - p->pos < n || memcmp(p->text + p->pos, word, n) != 0)
		return false;
	p->pos += n;
	return true;
}

/* Parse one value (and its children) as a child of parent. */
static osv_status
json_parse_value(json_parser *p, int parent, int depth, int *index)
{
	osv_status	st;
	char		c;

	json_skip_ws(p);
	if (p->pos >= p->len)
		return json_error(p, "unexpected end of input");
	c = p->text[p->pos];

	if (c == '{' || c == '[')
	{
		bool		is_object = (c == '{');
		char		close = is_object ? '}' : ']';
		int			self;
		int			last = -1;

		/* bounded recursion: a "[[[[..." bomb must not exhaust the stack */
		if (depth >= JSON_MAX_DEPTH)
			return json_error(p, "nesting too deep");
		st = json_new_node(p, is_object ? OSV_JSON_OBJECT : OSV_JSON_ARRAY,
						   parent, &self);
		if (st != OSV_OK)
			return st;
		p->pos++;
		json_skip_ws(p);
		if (p->pos < p->len && p->text[p->pos] == close)
		{
			p->pos++;
			*index = self;
			return OSV_OK;
		}
		for (;;)
		{
			const char *key = NULL;
			size_t		key_len;
			int			child;

			if (is_object)
			{
				json_skip_ws(p);
				if (p->pos >= p->len || p->text[p->pos] != '"')
					return json_error(p, "expected a member name");
				st = json_parse_string(p, &key, &key_len);
				if (st != OSV_OK)
					return st;
				json_skip_ws(p);
				if (p->pos >= p->len || p->text[p->pos] != ':')
					return json_error(p, "expected ':'");
				p->pos++;
			}
			st = json_parse_value(p, self, depth + 1, &child);
			if (st != OSV_OK)
				return st;
			/* nodes may have moved (realloc): index, never hold pointers */
			p->out->nodes[child].key = key;
			if (last < 0)
				p->out->nodes[self].first_child = child;
			else
				p->out->nodes[last].next_sibling = child;
			last = child;
			p->out->nodes[self].num_children++;

			json_skip_ws(p);
			if (p->pos >= p->len)
				return json_error(p, "unexpected end of input");
			if (p->text[p->pos] == ',')
			{
				p->pos++;
				continue;
			}
			if (p->text[p->pos] == close)
			{
				p->pos++;
				break;
			}
			return json_error(p, is_object ? "expected ',' or '}'" :
							  "expected ',' or ']'");
		}
		*index = self;
		return OSV_OK;
	}
	if (c == '"')
	{
		const char *s;
		size_t		s_len;

		st = json_parse_string(p, &s, &s_len);
		if (st != OSV_OK)
			return st;
		st = json_new_node(p, OSV_JSON_STRING, parent, index);
		if (st != OSV_OK)
			return st;
		p->out->nodes[*index].string = s;
		p->out->nodes[*index].string_len = s_len;
		return OSV_OK;
	}
	if (c == '-' || (c >= '0' && c <= '9'))
	{
		double		v = 0;

		st = json_parse_number(p, &v);
		if (st != OSV_OK)
			return st;
		st = json_new_node(p, OSV_JSON_NUMBER, parent, index);
		if (st == OSV_OK)
			p->out->nodes[*index].number = v;
		return st;
	}
	if (json_literal(p, "true"))
		return json_new_node(p, OSV_JSON_TRUE, parent, index);
	if (json_literal(p, "false"))
		return json_new_node(p, OSV_JSON_FALSE, parent, index);
	if (json_literal(p, "null"))
		return json_new_node(p, OSV_JSON_NULL, parent, index);
	return json_error(p, "unexpected character");
}

/* Parse text[0..len) into out; all or nothing. */
osv_status
osv_json_parse(const char *text, size_t len, osv_json *out, osv_error *err)
{
	json_parser p;
	osv_status	st;
	int			root;

	memset(out, 0, sizeof(*out));
	if (text == NULL && len > 0)
		return osv_fail(err, OSV_ERR_ARGUMENT, "no JSON text");
	if (len >= SIZE_MAX / 2)
		return osv_fail(err, OSV_ERR_LIMIT, "JSON text too large");

	memset(&p, 0, sizeof(p));
	p.text = text;
	p.len = len;
	p.out = out;
	p.err = err;
	out->strings = malloc(len + 1);
	if (out->strings == NULL)
		return osv_fail(err, OSV_ERR_NOMEM, "out of memory parsing JSON (%zu bytes)",
						len);
	p.arena_next = out->strings;

	st = json_parse_value(&p, -1, 0, &root);
	if (st == OSV_OK)
	{
		json_skip_ws(&p);
		if (p.pos != len)
			st = json_error(&p, "trailing characters after the value");
	}
	if (st != OSV_OK)
	{
		osv_json_free(out);
		return st;
	}
	return OSV_OK;
}

/* Free what osv_json_parse allocated; safe on an emptied osv_json. */
void
osv_json_free(osv_json *json)
{
	if (json == NULL)
		return;
	free(json->nodes);
	free(json->strings);
	memset(json, 0, sizeof(*json));
}

/* The first member named key of object obj (linear: objects are small). */
int
osv_json_get(const osv_json *json, int obj, const char *key)
{
	if (obj < 0 || obj >= json->num_nodes ||
		json->nodes[obj].type != OSV_JSON_OBJECT)
		return -1;
	for (int i = json->nodes[obj].first_child; i >= 0;
		 i = json->nodes[i].next_sibling)
	{
		if (strcmp(json->nodes[i].key, key) == 0)
			return i;
	}
	return -1;
}

/* The index-th element of array arr. */
int
osv_json_at(const osv_json *json, int arr, int index)
{
	int			i;

	if (arr < 0 || arr >= json->num_nodes ||
		json->nodes[arr].type != OSV_JSON_ARRAY || index < 0 ||
		index >= json->nodes[arr].num_children)
		return -1;
	i = json->nodes[arr].first_child;
	while (index-- > 0)
		i = json->nodes[i].next_sibling;
	return i;
}
