/*
 * Parsing of the rbd: driver's params (rbd_params.h). Names are taken as
 * written: ':' separates options, '/' the pool, namespace and image, '@'
 * the snapshot, so a name holding one of those cannot be given (qemu's
 * backslash escapes are not supported).
 */
#include "rbd_params.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define RBD_NAME_MAX 256	/* longer is refused: no pool, image or snapshot is named so */

/* At most 64 bytes of a client's string for a message: control bytes as '?', one line. */
static const char *
shown(const char *s, char out[static 65])
{
	size_t i;
	for (i = 0; i < 64 && s[i]; i++)
		out[i] = (unsigned char)s[i] < 0x20 || s[i] == 0x7f ? '?' : s[i];
	out[i] = '\0';
	return out;
}

static int
name_ok(const char *what, const char *s, struct td_error *err)
{
	size_t n = strlen(s);
	char buf[65];

	if (n == 0)
		return td_error_set(err, EINVAL, "rbd: empty %s name (rbd:POOL/IMAGE[@SNAP]"
				    "[:conf=PATH][:id=USER])", what);
	if (n > RBD_NAME_MAX)
		return td_error_set(err, EINVAL, "rbd: %s name longer than %d bytes", what,
				    RBD_NAME_MAX);
	for (const char *c = s; *c; c++)
		if ((unsigned char)*c < 0x20 || *c == 0x7f || *c == '/' || *c == '@')
			return td_error_set(err, EINVAL, "rbd: the %s name '%s' holds a "
					    "character rbd: params cannot name", what, shown(s, buf));
	return 0;
}

int
rbd_snap_name_check(const char *name, struct td_error *err)
{
	if (strchr(name, ':'))
		return td_error_set(err, EINVAL, "rbd: a snapshot name cannot hold ':'");
	return name_ok("snapshot", name, err);
}

void
rbd_spec_free(struct rbd_spec *spec)
{
	free(spec->buf);
	memset(spec, 0, sizeof(*spec));
}

int
rbd_spec_parse(const char *path, struct rbd_spec *spec, struct td_error *err)
{
	char *opt, *next, *at, *slash1, *slash2;
	char buf[65];
	int rc;

	memset(spec, 0, sizeof(*spec));
	if (!(spec->buf = strdup(path)))
		return td_error_set(err, ENOMEM, "out of memory");
	/* the image part, then options */
	opt = strchr(spec->buf, ':');
	if (opt)
		*opt++ = '\0';
	for (; opt; opt = next) {
		char *eq = strchr(opt, '=');
		next = strchr(opt, ':');
		if (next)
			*next++ = '\0';
		if (!eq) {
			rc = td_error_set(err, EINVAL, "rbd: option '%s' is not KEY=VALUE "
					  "(conf=PATH, id=USER)", shown(opt, buf));
			goto fail;
		}
		*eq = '\0';
		const char **slot = strcmp(opt, "conf") == 0 ? &spec->conf :
				    strcmp(opt, "id") == 0 ? &spec->id : NULL;
		if (!slot) {
			rc = td_error_set(err, EINVAL, "rbd: unknown option '%s' (known: conf, id)",
					  shown(opt, buf));
			goto fail;
		}
		if (*slot) {
			rc = td_error_set(err, EINVAL, "rbd: option '%s' given twice", opt);
			goto fail;
		}
		if (!eq[1]) {
			rc = td_error_set(err, EINVAL, "rbd: option '%s' has an empty value", opt);
			goto fail;
		}
		for (const char *c = eq + 1; *c; c++) {
			if ((unsigned char)*c < 0x20 || *c == 0x7f) {
				rc = td_error_set(err, EINVAL, "rbd: option '%s' holds a control "
						  "character", opt);
				goto fail;
			}
		}
		if (slot == &spec->conf && eq[1] != '/') {
			/* the server's working directory means nothing to its client */
			rc = td_error_set(err, EINVAL, "rbd: conf= takes an absolute path");
			goto fail;
		}
		*slot = eq + 1;
	}
	at = strchr(spec->buf, '@');
	if (at) {
		*at = '\0';
		spec->snap = at + 1;
		if ((rc = name_ok("snapshot", spec->snap, err)) < 0)
			goto fail;
	}
	slash1 = strchr(spec->buf, '/');
	if (!slash1) {
		rc = td_error_set(err, EINVAL, "rbd: '%s' is not POOL/IMAGE or POOL/NAMESPACE/IMAGE",
				  shown(spec->buf, buf));
		goto fail;
	}
	*slash1 = '\0';
	spec->pool = spec->buf;
	spec->image = slash1 + 1;
	slash2 = strchr(spec->image, '/');
	if (slash2) {
		*slash2 = '\0';
		spec->ns = spec->image;
		spec->image = slash2 + 1;
		if ((rc = name_ok("namespace", spec->ns, err)) < 0)
			goto fail;
	}
	if ((rc = name_ok("pool", spec->pool, err)) < 0 ||
	    (rc = name_ok("image", spec->image, err)) < 0)
		goto fail;
	return 0;
fail:
	rbd_spec_free(spec);
	return rc;
}
