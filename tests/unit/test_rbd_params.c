/*
 * The rbd: driver's params parser (drivers/rbd_params.c): the forms qemu
 * names (POOL/IMAGE, POOL/NAMESPACE/IMAGE, @SNAP, :conf=, :id=) and what
 * is refused, each with one line.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "rbd_params.h"

static void
parses(const char *path, const char *pool, const char *ns, const char *image,
       const char *snap, const char *conf, const char *id)
{
	struct rbd_spec s;
	struct td_error err;

	assert_int_equal(rbd_spec_parse(path, &s, &err), 0);
	assert_string_equal(s.pool, pool);
	assert_string_equal(s.image, image);
#define OPT(field, want) \
	if (want) assert_string_equal(s.field, want); else assert_null(s.field)
	OPT(ns, ns);
	OPT(snap, snap);
	OPT(conf, conf);
	OPT(id, id);
#undef OPT
	rbd_spec_free(&s);
}

static void
refused(const char *path, const char *words)
{
	struct rbd_spec s;
	struct td_error err;

	assert_int_equal(rbd_spec_parse(path, &s, &err), -EINVAL);
	assert_int_equal(err.code, EINVAL);
	assert_non_null(strstr(err.msg, words));
	assert_null(strchr(err.msg, '\n'));
	assert_null(s.buf);
}

static void
test_forms(void **state)
{
	(void)state;
	parses("rbd/img", "rbd", NULL, "img", NULL, NULL, NULL);
	parses("rbd/ns/img", "rbd", "ns", "img", NULL, NULL, NULL);
	parses("rbd/img@snap", "rbd", NULL, "img", "snap", NULL, NULL);
	parses("p/n/i@s:conf=/etc/ceph/a.conf:id=libvirt", "p", "n", "i", "s",
	       "/etc/ceph/a.conf", "libvirt");
	parses("p/i:id=u:conf=/c=d", "p", NULL, "i", NULL, "/c=d", "u");
}

static void
test_refusals(void **state)
{
	(void)state;
	refused("rbd", "is not POOL/IMAGE");
	refused("/img", "empty pool");
	refused("rbd/", "empty image");
	refused("rbd//img", "empty namespace");
	refused("rbd/img@", "empty snapshot");
	refused("a/b/c/d", "holds a character");
	refused("rbd/img@a@b", "holds a character");
	refused("rbd/img:conf", "is not KEY=VALUE");
	refused("rbd/img:conf=", "empty value");
	refused("rbd/img:conf=/a:conf=/b", "given twice");
	refused("rbd/img:conf=ceph.conf", "absolute path");
	refused("rbd/img:pool=x", "unknown option 'pool'");
	refused("rbd/img:id=a\nb", "control character");
	refused("rbd/i\nmg", "'i?mg'");
}

static void
test_snap_names(void **state)
{
	struct td_error err;
	(void)state;
	assert_int_equal(rbd_snap_name_check("before-upgrade", &err), 0);
	assert_int_equal(rbd_snap_name_check("a:b", &err), -EINVAL);
	assert_int_equal(rbd_snap_name_check("a@b", &err), -EINVAL);
	assert_int_equal(rbd_snap_name_check("", &err), -EINVAL);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_forms),
		cmocka_unit_test(test_refusals),
		cmocka_unit_test(test_snap_names),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
