/*
 * test_json.c: the JSON reader on valid documents, escapes, limits and
 * malformed input.
 */
#include "internal.h"
#include "check.h"

#include <stdlib.h>
#include <string.h>

/* Parse s; returns the status and leaves err filled. */
static osv_status
parse(const char *s, osv_json *json, osv_error *err)
{
	memset(err, 0, sizeof(*err));
	return osv_json_parse(s, strlen(s), json, err);
}

/* s must fail with a message containing phrase. */
static void
expect_error(const char *s, const char *phrase)
{
	osv_json	json;
	osv_error	err;
	osv_status	st = parse(s, &json, &err);

	CHECK(st == OSV_ERR_MODEL, "\"%.60s\": status %d", s, st);
	CHECK(strstr(err.message, phrase) != NULL, "\"%.60s\": message \"%s\", expected \"%s\"",
		  s, err.message, phrase);
	CHECK(json.nodes == NULL && json.strings == NULL, "output not empty on error");
}

/* Valid documents: every value type, lookups, escapes. */
static void
test_values(void)
{
	osv_json	json;
	osv_error	err;
	int			n,
				a;

	CHECK(parse(" {\"a\": [1, -2.5e2, 0, -0, true, false, null], \"b\": {\"c\": \"x\"},"
				" \"\": 3} \n", &json, &err) == OSV_OK, "%s", err.message);
	CHECK(json.nodes[0].type == OSV_JSON_OBJECT && json.nodes[0].num_children == 3, "root");
	a = osv_json_get(&json, 0, "a");
	CHECK(a >= 0 && json.nodes[a].type == OSV_JSON_ARRAY && json.nodes[a].num_children == 7,
		  "a");
	CHECK(json.nodes[osv_json_at(&json, a, 0)].number == 1, "a[0]");
	CHECK(json.nodes[osv_json_at(&json, a, 1)].number == -250, "a[1]");
	CHECK(json.nodes[osv_json_at(&json, a, 4)].type == OSV_JSON_TRUE, "a[4]");
	CHECK(json.nodes[osv_json_at(&json, a, 5)].type == OSV_JSON_FALSE, "a[5]");
	CHECK(json.nodes[osv_json_at(&json, a, 6)].type == OSV_JSON_NULL, "a[6]");
	CHECK(osv_json_at(&json, a, 7) == -1 && osv_json_at(&json, a, -1) == -1, "a[7]");
	CHECK(json.nodes[osv_json_at(&json, a, 6)].parent == a, "parent");
	n = osv_json_get(&json, osv_json_get(&json, 0, "b"), "c");
	CHECK(n >= 0 && strcmp(json.nodes[n].string, "x") == 0, "b.c");
	CHECK(osv_json_get(&json, 0, "") >= 0, "empty key");
	CHECK(osv_json_get(&json, 0, "zz") == -1 && osv_json_get(&json, a, "x") == -1, "absent");
	osv_json_free(&json);

	CHECK(parse("\"\\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\u20ac\\ud83d\\ude00\\u0000z\"",
				&json, &err) == OSV_OK, "%s", err.message);
	CHECK(json.nodes[0].string_len == 19 &&
		  memcmp(json.nodes[0].string,
				 "\"\\/\b\f\n\r\t\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\0z", 20) == 0,
		  "escapes (%zu bytes)", json.nodes[0].string_len);
	osv_json_free(&json);

	CHECK(parse("[]", &json, &err) == OSV_OK && json.nodes[0].num_children == 0 &&
		  json.nodes[0].first_child == -1, "empty array");
	osv_json_free(&json);
	CHECK(parse("1e308", &json, &err) == OSV_OK && json.nodes[0].number == 1e308, "1e308");
	osv_json_free(&json);
	osv_json_free(&json);		/* twice is harmless */
}

/* Malformed input and the limits: each fails with a precise message. */
static void
test_errors(void)
{
	char	   *bomb;
	osv_json	json;
	osv_error	err;

	expect_error("", "unexpected end");
	expect_error("   ", "unexpected end");
	expect_error("{} x", "trailing");
	expect_error("[1] [2]", "trailing");
	expect_error("01", "trailing");
	expect_error("[1,]", "unexpected character");
	expect_error("{\"a\" 1}", "expected ':'");
	expect_error("{\"a\":1,}", "member name");
	expect_error("{1:2}", "member name");
	expect_error("[1 2]", "expected ','");
	expect_error("tru", "unexpected character");
	expect_error("nul", "unexpected character");
	expect_error("-", "invalid number");
	expect_error("1.", "invalid number");
	expect_error("1e", "invalid number");
	expect_error(".5", "unexpected character");
	expect_error("+1", "unexpected character");
	expect_error("1e400", "out of range");
	expect_error("-1e400", "out of range");
	expect_error("\"abc", "unterminated");
	expect_error("\"a\\", "unterminated");
	expect_error("\"a\nb\"", "control character");
	expect_error("\"\\x\"", "invalid escape");
	expect_error("\"\\u12\"", "invalid \\u");
	expect_error("\"\\ud800\"", "unpaired high surrogate");
	expect_error("\"\\ud800\\u0041\"", "unpaired high surrogate");
	expect_error("\"\\udc00\"", "unpaired low surrogate");
	expect_error("[\"a\"", "unexpected end");

	/* a number longer than any float needs */
	bomb = malloc(1002);
	memset(bomb, '1', 1001);
	bomb[1001] = '\0';
	expect_error(bomb, "too long");
	free(bomb);

	/* depth: 64 nested arrays are fine, 65 are not, 100000 do not crash */
	bomb = malloc(200001);
	for (int depth = 64; depth <= 65; depth++)
	{
		memset(bomb, '[', depth);
		memset(bomb + depth, ']', depth);
		bomb[2 * depth] = '\0';
		if (depth == 64)
		{
			CHECK(parse(bomb, &json, &err) == OSV_OK, "depth 64: %s", err.message);
			osv_json_free(&json);
		}
		else
			expect_error(bomb, "nesting too deep");
	}
	memset(bomb, '[', 100000);
	memset(bomb + 100000, ']', 100000);
	bomb[200000] = '\0';
	expect_error(bomb, "nesting too deep");
	memset(bomb, '{', 100000);
	bomb[100000] = '\0';
	expect_error(bomb, "member name");

	/* many values: bounded count, no quadratic blow-up */
	{
		size_t		n = 0;
		char	   *big = malloc(2 * 1100000 + 3);

		big[n++] = '[';
		for (int i = 0; i < 1100000; i++)
		{
			big[n++] = '0';
			big[n++] = ',';
		}
		big[n - 1] = ']';
		big[n] = '\0';
		expect_error(big, "too many values");
		free(big);
	}
	free(bomb);

	/* text that is not NUL-terminated: the length bounds the parse */
	CHECK(osv_json_parse("123456", 3, &json, &err) == OSV_OK &&
		  json.nodes[0].number == 123, "bounded number");
	osv_json_free(&json);
	CHECK(osv_json_parse("\"abc\"", 4, &json, &err) == OSV_ERR_MODEL, "bounded string");
}

int
main(void)
{
	test_values();
	test_errors();
	return check_summary("test_json");
}
