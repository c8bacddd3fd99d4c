/*
 * Image chains without a real format: a "layer" driver whose file holds
 * "FILL START LEN [PARENT]" (bytes START..START+LEN read as FILL, the rest
 * falls through to PARENT). Covers parent reads, zeros below the root,
 * block status resolution, shared read-only parents, loops, depth, and
 * the registry's exclusivity rules, with raw and ram as real parents.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "driver.h"
#include "loop.h"

#define LAYER_SIZE (1u << 20)

struct layer {
	int fill;
	uint64_t start, len;
	char parent[512];
};

static int
layer_open(struct td_image *img, const struct td_open_ctx *ctx, struct td_error *err)
{
	struct layer *l = calloc(1, sizeof(*l));
	FILE *f = fopen(img->path, "r");
	(void)ctx;
	if (!f) {
		free(l);
		return td_error_set(err, errno, "%s", strerror(errno));
	}
	int n = fscanf(f, "%x %lu %lu %511s", &l->fill, &l->start, &l->len, l->parent);
	fclose(f);
	if (n < 3) {
		free(l);
		return td_error_set(err, EINVAL, "bad layer spec");
	}
	img->size = LAYER_SIZE;
	img->caps = TD_CAP_BLOCK_STATUS;
	img->priv = l;
	return 0;
}

static void
layer_close(struct td_image *img)
{
	free(img->priv);
}

static int
layer_get_parent(struct td_image *img, char **params, struct td_error *err)
{
	struct layer *l = img->priv;
	(void)err;
	*params = l->parent[0] ? strdup(l->parent) : NULL;
	return 0;
}

struct layer_req {
	struct td_request *req;
	struct td_image *img;
	int pending, err;
	struct td_request sub[2];
	struct iovec iov[2];
};

static void
layer_sub_done(struct td_request *sub, int err)
{
	struct layer_req *lr = sub->priv;
	if (err)
		lr->err = err;
	if (--lr->pending == 0) {
		td_complete_later(lr->img, lr->req, lr->err);
		free(lr);
	}
}

/* Reads [off, off+len) of the request's single buffer from the parent. */
static void
layer_from_parent(struct layer_req *lr, int i, uint64_t off, uint64_t len)
{
	struct td_request *sub = &lr->sub[i];
	char *base = lr->req->iov[0].iov_base;
	lr->iov[i].iov_base = base + (off - lr->req->offset);
	lr->iov[i].iov_len = len;
	sub->op = TD_OP_READ;
	sub->offset = off;
	sub->length = len;
	sub->iov = &lr->iov[i];
	sub->iovcnt = 1;
	sub->done = layer_sub_done;
	sub->priv = lr;
	lr->pending++;
	td_image_read_parent(lr->img, sub);
}

static void
layer_submit(struct td_image *img, struct td_request *req)
{
	struct layer *l = img->priv;
	uint64_t a = req->offset, b = req->offset + req->length;
	uint64_t s = l->start, e = l->start + l->len;

	if (req->op == TD_OP_BLOCK_STATUS) {
		uint64_t pos = a;
		req->nr_extents = 0;
		while (pos < b && req->nr_extents < req->max_extents) {
			int in = pos >= s && pos < e;
			uint64_t stop = in ? e : (pos < s ? s : b);
			if (stop > b)
				stop = b;
			req->extents[req->nr_extents].length = stop - pos;
			req->extents[req->nr_extents].flags = in ? 0 : TD_EXTENT_PARENT;
			req->nr_extents++;
			pos = stop;
		}
		td_complete_later(img, req, 0);
		return;
	}
	if (req->op != TD_OP_READ) {
		td_complete_later(img, req, EROFS);
		return;
	}
	struct layer_req *lr = calloc(1, sizeof(*lr));
	lr->req = req;
	lr->img = img;
	lr->pending = 1;	/* held until every piece is issued */
	char *buf = req->iov[0].iov_base;
	uint64_t is = a > s ? a : s, ie = b < e ? b : e;
	if (is < ie)
		memset(buf + (is - a), l->fill, ie - is);
	if (a < (is < ie ? is : b) && a < s)
		layer_from_parent(lr, 0, a, (s < b ? s : b) - a);
	if (b > e && (e > a ? e : a) < b)
		layer_from_parent(lr, 1, e > a ? e : a, b - (e > a ? e : a));
	layer_sub_done(&(struct td_request){ .priv = lr }, 0);
}

static const struct td_driver layer_driver = {
	.name = "layer",
	.open = layer_open,
	.close = layer_close,
	.submit = layer_submit,
	.get_parent = layer_get_parent,
};

/* The same, claiming to name no file (TD_DRV_NOFILE), to reach a parent under TD_OPEN_NOFILE. */
static const struct td_driver nflayer_driver = {
	.name = "nflayer",
	.flags = TD_DRV_NOFILE,
	.open = layer_open,
	.close = layer_close,
	.submit = layer_submit,
	.get_parent = layer_get_parent,
};

/* ---- fixture ---- */

static struct event_base *base;
static struct io_engine *io;
static char dir[64];

static int
group_setup(void **state)
{
	char err[256];
	(void)state;
	base = event_base_new();
	io = io_engine_new(base, "threads", err, sizeof(err));
	strcpy(dir, "/tmp/td-unit-chain-XXXXXX");
	if (!mkdtemp(dir) || !io)
		return -1;
	return td_driver_register(&layer_driver) || td_driver_register(&nflayer_driver);
}

static int
group_teardown(void **state)
{
	char cmd[128];
	(void)state;
	io_engine_free(io);
	event_base_free(base);
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	return system(cmd);
}

static char *
spec(const char *name, const char *content)
{
	static char paths[8][128];
	static int n;
	char *p = paths[n++ % 8];
	snprintf(p, 128, "%s/%s", dir, name);
	FILE *f = fopen(p, "w");
	fputs(content, f);
	fclose(f);
	return p;
}

static int
chain_open(const char *params, unsigned flags, struct td_image **leaf, struct td_error *err)
{
	struct td_open_ctx ctx = { .io = io };
	return td_chain_open(params, flags, &ctx, leaf, err);
}

struct done {
	int done, err;
};

static void
req_done(struct td_request *req, int err)
{
	struct done *d = req->priv;
	d->err = err;
	d->done = 1;
}

static int
do_req(struct td_image *leaf, struct td_request *req)
{
	struct done d = { 0 };
	req->done = req_done;
	req->priv = &d;
	td_image_submit(leaf, req);
	assert_int_equal(d.done, 0);
	assert_true(loop_until(base, &d.done));
	return d.err;
}

static void
read_at(struct td_image *leaf, char *buf, uint64_t off, uint64_t len)
{
	struct iovec v = { buf, len };
	struct td_request r = { .op = TD_OP_READ, .offset = off, .length = len, .iov = &v, .iovcnt = 1 };
	assert_int_equal(do_req(leaf, &r), 0);
}

/* ---- tests ---- */

static void
test_reads_fall_through(void **state)
{
	struct td_image *leaf;
	struct td_error err;
	char params[256], *buf = malloc(192 << 10);
	(void)state;
	char *bottom = spec("bottom", "bb 65536 65536");
	/* top -> bottom */
	snprintf(params, sizeof(params), "layer:%s", spec("top", ""));
	FILE *f = fopen(params + 6, "w");
	fprintf(f, "aa 0 65536 layer:%s", bottom);
	fclose(f);
	assert_int_equal(chain_open(params, TD_OPEN_RDONLY, &leaf, &err), 0);
	assert_int_equal(td_chain_depth(leaf), 2);
	memset(buf, 0x77, 192 << 10);
	read_at(leaf, buf, 0, 192 << 10);
	for (int i = 0; i < 192 << 10; i++)
		assert_int_equal((unsigned char)buf[i], i < 65536 ? 0xaa : i < 131072 ? 0xbb : 0);
	/* a read straddling the edge of the top's data */
	memset(buf, 0x77, 8192);
	read_at(leaf, buf, 65536 - 4096, 8192);
	assert_int_equal((unsigned char)buf[0], 0xaa);
	assert_int_equal((unsigned char)buf[4096], 0xbb);
	assert_int_equal(leaf->stats.hits[0], 2);
	assert_true(leaf->parent->stats.hits[0] >= 2);
	td_chain_close(leaf);
	free(buf);
}

static void
test_block_status_resolves_through_chain(void **state)
{
	struct td_image *leaf;
	struct td_error err;
	char params[256];
	(void)state;
	char *bottom = spec("bs-bottom", "bb 65536 65536");
	snprintf(params, sizeof(params), "layer:%s", spec("bs-top", ""));
	FILE *f = fopen(params + 6, "w");
	fprintf(f, "aa 0 65536 layer:%s", bottom);
	fclose(f);
	assert_int_equal(chain_open(params, TD_OPEN_RDONLY, &leaf, &err), 0);

	struct { uint64_t off, len; uint32_t flags; } got[8];
	int n = 0;
	uint64_t pos = 0;
	while (pos < LAYER_SIZE && n < 8) {
		struct td_extent ext[16];
		struct td_request r = { .op = TD_OP_BLOCK_STATUS, .offset = pos,
					.length = LAYER_SIZE - pos, .extents = ext, .max_extents = 16 };
		assert_int_equal(do_req(leaf, &r), 0);
		assert_true(r.nr_extents >= 1);
		for (unsigned i = 0; i < r.nr_extents; i++) {
			assert_int_equal(ext[i].flags & TD_EXTENT_PARENT, 0);	/* never leaks out */
			got[n].off = pos;
			got[n].len = ext[i].length;
			got[n].flags = ext[i].flags;
			pos += ext[i].length;
			n++;
		}
	}
	assert_int_equal(pos, LAYER_SIZE);
	assert_int_equal(got[0].len, 65536);
	assert_int_equal(got[0].flags, 0);
	assert_int_equal(got[1].off, 65536);
	assert_int_equal(got[1].flags, 0);		/* the parent's data */
	assert_int_equal(got[n - 1].flags, TD_EXTENT_HOLE | TD_EXTENT_ZERO);
	td_chain_close(leaf);
}

static void
test_shared_parent_opened_once(void **state)
{
	struct td_image *a, *b, *w;
	struct td_error err;
	char pa[256], pb[256], raw[128], rawparams[160];
	(void)state;
	snprintf(raw, sizeof(raw), "%s/base.raw", dir);
	FILE *f = fopen(raw, "w");
	for (int i = 0; i < (int)LAYER_SIZE; i++)
		fputc(0x5c, f);
	fclose(f);
	snprintf(rawparams, sizeof(rawparams), "aio:%s", raw);
	snprintf(pa, sizeof(pa), "layer:%s", spec("child-a", ""));
	snprintf(pb, sizeof(pb), "layer:%s", spec("child-b", ""));
	f = fopen(pa + 6, "w");
	fprintf(f, "a1 0 4096 %s", rawparams);
	fclose(f);
	f = fopen(pb + 6, "w");
	fprintf(f, "b1 0 4096 %s", rawparams);
	fclose(f);
	assert_int_equal(chain_open(pa, TD_OPEN_RDONLY, &a, &err), 0);
	assert_int_equal(chain_open(pb, TD_OPEN_RDONLY, &b, &err), 0);
	assert_ptr_equal(a->parent, b->parent);	/* one open of the golden image */
	assert_int_equal(a->parent->refs, 2);
	/* nobody may write the shared parent */
	assert_int_equal(chain_open(rawparams, 0, &w, &err), -EBUSY);
	assert_non_null(strstr(err.msg, "already open"));
	td_chain_close(a);
	char buf[8192];
	read_at(b, buf, 0, sizeof(buf));	/* b's parent is still open */
	assert_int_equal((unsigned char)buf[0], 0xb1);
	assert_int_equal((unsigned char)buf[4096], 0x5c);
	td_chain_close(b);
	assert_int_equal(chain_open(rawparams, 0, &w, &err), 0);
	td_chain_close(w);
}

static void
test_loops_and_depth(void **state)
{
	struct td_image *leaf;
	struct td_error err;
	char a[128], b[128];
	(void)state;
	snprintf(a, sizeof(a), "%s/loop-a", dir);
	snprintf(b, sizeof(b), "%s/loop-b", dir);
	FILE *f = fopen(a, "w");
	fprintf(f, "1 0 1 layer:%s", b);
	fclose(f);
	f = fopen(b, "w");
	fprintf(f, "2 0 1 layer:%s", a);
	fclose(f);
	char pa[160];
	snprintf(pa, sizeof(pa), "layer:%s", a);
	assert_int_equal(chain_open(pa, TD_OPEN_RDONLY, &leaf, &err), -ELOOP);
	assert_non_null(strstr(err.msg, "loops back"));

	/* a chain deeper than the limit: 300 layers on a ram root */
	char prev[160] = "ram:1M";
	for (int i = 0; i < 300; i++) {
		char p[128];
		snprintf(p, sizeof(p), "%s/deep-%d", dir, i);
		f = fopen(p, "w");
		fprintf(f, "3 0 1 %s", prev);
		fclose(f);
		snprintf(prev, sizeof(prev), "layer:%s", p);
	}
	assert_int_equal(chain_open(prev, TD_OPEN_RDONLY, &leaf, &err), -ELOOP);
	assert_non_null(strstr(err.msg, "deeper"));
}

static void
test_parent_errors_name_both(void **state)
{
	struct td_image *leaf;
	struct td_error err;
	char p[160];
	(void)state;
	snprintf(p, sizeof(p), "layer:%s", spec("orphan", ""));
	FILE *f = fopen(p + 6, "w");
	fprintf(f, "1 0 1 aio:%s/no-such-parent.raw", dir);
	fclose(f);
	assert_int_equal(chain_open(p, TD_OPEN_RDONLY, &leaf, &err), -ENOENT);
	assert_non_null(strstr(err.msg, "orphan"));
	assert_non_null(strstr(err.msg, "parent aio:"));
	assert_non_null(strstr(err.msg, "No such file"));
	assert_int_equal(chain_open("layer:", 0, &leaf, &err), -EINVAL);
	assert_int_equal(chain_open("bogus:/x", 0, &leaf, &err), -EINVAL);
	assert_non_null(strstr(err.msg, "unknown image type 'bogus'"));
	assert_non_null(strstr(err.msg, "layer"));
}

/* TD_OPEN_NOFILE: file-backed types are refused before their path is touched. */
static void
test_nofile_opens_no_file(void **state)
{
	struct td_image *leaf;
	struct td_error err;
	char p[160];
	(void)state;
	assert_int_equal(chain_open("aio:/dev/null", TD_OPEN_NOFILE, &leaf, &err), -EACCES);
	assert_non_null(strstr(err.msg, "opens no files"));
	assert_int_equal(chain_open("layer:/nonexistent", TD_OPEN_NOFILE | TD_OPEN_RDONLY, &leaf,
				    &err), -EACCES);
	/* its parents are opened with NOFILE too */
	snprintf(p, sizeof(p), "nflayer:%s", spec("nofile", "1 0 1 aio:/dev/null"));
	assert_int_equal(chain_open(p, TD_OPEN_RDONLY | TD_OPEN_NOFILE, &leaf, &err), -EACCES);
	assert_non_null(strstr(err.msg, "parent aio:/dev/null"));
	assert_int_equal(chain_open("ram:1M", TD_OPEN_NOFILE, &leaf, &err), 0);
	assert_int_equal(leaf->size, 1u << 20);
	td_chain_close(leaf);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_reads_fall_through),
		cmocka_unit_test(test_block_status_resolves_through_chain),
		cmocka_unit_test(test_shared_parent_opened_once),
		cmocka_unit_test(test_loops_and_depth),
		cmocka_unit_test(test_parent_errors_name_both),
		cmocka_unit_test(test_nofile_opens_no_file),
	};
	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
