/*
 * libFuzzer target: the rbd: driver's params parser (drivers/rbd_params.c),
 * fed what a control client sends as `rbd:...` params and as a snapshot
 * name. What it accepts is checked: every name non-empty and free of the
 * separators, options once each, and the params rebuilt from the parts
 * parse again to the same parts. What it refuses has an errno and a line.
 */
#include <assert.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rbd_params.h"

static int
same(const char *a, const char *b)
{
	return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

static int
printable(const char *s)
{
	for (; *s; s++)
		if ((unsigned char)*s < 0x20 || *s == 0x7f)
			return 0;
	return 1;
}

/* Names and values end up in messages: one line each. */
static void
check_name(const char *s)
{
	assert(s && s[0] && printable(s));
	assert(!strchr(s, '/') && !strchr(s, '@') && !strchr(s, ':'));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *s = malloc(size + 1);
	struct rbd_spec spec, again;
	struct td_error err;

	if (!s)
		return 0;
	memcpy(s, data, size);
	s[size] = '\0';
	if (rbd_snap_name_check(s, &err) < 0)
		assert(err.code > 0 && err.msg[0] && !strchr(err.msg, '\n'));
	else
		check_name(s);
	if (rbd_spec_parse(s, &spec, &err) < 0) {
		assert(err.code > 0 && err.msg[0] && !strchr(err.msg, '\n'));
		assert(!spec.buf);
		free(s);
		return 0;
	}
	check_name(spec.pool);
	check_name(spec.image);
	if (spec.ns)
		check_name(spec.ns);
	if (spec.snap)
		check_name(spec.snap);
	assert(!spec.conf || (spec.conf[0] == '/' && !strchr(spec.conf, ':') && printable(spec.conf)));
	assert(!spec.id || (spec.id[0] && !strchr(spec.id, ':') && printable(spec.id)));

	char *rebuilt;
	int n = asprintf(&rebuilt, "%s/%s%s%s%s%s%s%s%s%s", spec.pool, spec.ns ? spec.ns : "",
			 spec.ns ? "/" : "", spec.image, spec.snap ? "@" : "",
			 spec.snap ? spec.snap : "", spec.conf ? ":conf=" : "",
			 spec.conf ? spec.conf : "", spec.id ? ":id=" : "", spec.id ? spec.id : "");
	assert(n > 0);
	assert(rbd_spec_parse(rebuilt, &again, &err) == 0);
	assert(strcmp(spec.pool, again.pool) == 0 && strcmp(spec.image, again.image) == 0);
	assert(same(spec.ns, again.ns) && same(spec.snap, again.snap));
	assert(same(spec.conf, again.conf) && same(spec.id, again.id));
	rbd_spec_free(&again);
	free(rebuilt);
	rbd_spec_free(&spec);
	free(s);
	return 0;
}
