/*
 * The drivers' metadata cache on a real file and I/O engine: one read for
 * many waiters, each pinned; the on_load hook decodes, or fails a load that
 * is then forgotten and read again; failed reads likewise; eviction spares
 * pinned and loading blocks; blocks made in memory (mc_insert) with their
 * offset; mc_drop.
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

#include "loop.h"
#include "meta_cache.h"

#define BLK 512

struct fixture {
	struct event_base *base;
	struct io_engine *io;
	struct mc_cache c;
	int fd;
	int loads, refuse;		/* on_load calls; errno it returns while set */
	char path[64];
};

struct waiter {
	struct mc_waiter w;
	struct mc_entry *e;
	int err, done;
};

static void
ready(struct mc_waiter *mw, struct mc_entry *e, int err)
{
	struct waiter *w = (struct waiter *)mw;
	w->e = e;
	w->err = err;
	w->done++;
}

/* Block k of the file holds k+1 in every byte; on_load adds 1 to its first. */
static int
on_load(struct mc_cache *c, struct mc_entry *e, size_t len)
{
	struct fixture *f = c->priv;
	assert_int_equal(len, BLK);
	f->loads++;
	if (f->refuse)
		return f->refuse;
	((uint8_t *)e->buf)[0]++;
	return 0;
}

static int
setup(void **state)
{
	struct fixture *f = calloc(1, sizeof(*f));
	char err[256], blk[BLK];

	f->base = event_base_new();
	f->io = io_engine_new(f->base, "threads", err, sizeof(err));
	strcpy(f->path, "/tmp/td-unit-mc-XXXXXX");
	f->fd = mkstemp(f->path);
	for (int k = 0; k < 8; k++) {
		memset(blk, k + 1, sizeof(blk));
		assert_int_equal(pwrite(f->fd, blk, sizeof(blk), (off_t)k * BLK), BLK);
	}
	mc_init(&f->c, f->io, 2);
	f->c.on_load = on_load;
	f->c.priv = f;
	*state = f;
	return f->io && f->fd >= 0 ? 0 : -1;
}

static int
teardown(void **state)
{
	struct fixture *f = *state;
	mc_free(&f->c);
	io_engine_free(f->io);
	event_base_free(f->base);
	close(f->fd);
	unlink(f->path);
	free(f);
	return 0;
}

/* mc_get of block k (key k) for w. */
static void
get(struct fixture *f, int k, struct waiter *w)
{
	memset(w, 0, sizeof(*w));
	w->w.ready = ready;
	assert_int_equal(mc_get(&f->c, (uint64_t)k, f->fd, 0, (uint64_t)k * BLK, BLK, &w->w), 0);
}

static void
test_one_read_for_all_waiters(void **state)
{
	struct fixture *f = *state;
	struct waiter a, b, c;

	get(f, 3, &a);
	get(f, 3, &b);
	assert_int_equal(a.done + b.done, 0);	/* loading: nobody has it yet */
	assert_true(loop_until(f->base, &b.done));
	assert_int_equal(a.done, 1);
	assert_ptr_equal(a.e, b.e);
	assert_int_equal(a.e->refs, 2);
	assert_int_equal(a.e->off, 3 * BLK);
	assert_int_equal(((uint8_t *)a.e->buf)[0], 5);	/* decoded once */
	assert_int_equal(((uint8_t *)a.e->buf)[1], 4);
	get(f, 3, &c);					/* loaded: now, inside mc_get */
	assert_int_equal(c.done, 1);
	assert_ptr_equal(c.e, a.e);
	assert_int_equal(f->loads, 1);
	mc_put(&f->c, a.e);
	mc_put(&f->c, b.e);
	mc_put(&f->c, c.e);
	assert_int_equal(c.e->refs, 0);
}

static void
test_refused_load_is_forgotten(void **state)
{
	struct fixture *f = *state;
	struct waiter a, b;

	f->refuse = EIO;
	get(f, 1, &a);
	get(f, 1, &b);
	assert_true(loop_until(f->base, &b.done));
	assert_int_equal(a.done, 1);
	assert_null(a.e);
	assert_null(b.e);
	assert_int_equal(a.err, EIO);
	assert_int_equal(b.err, EIO);
	assert_null(mc_find(&f->c, 1));
	assert_int_equal(f->c.count, 0);
	f->refuse = 0;				/* a later request reads again */
	get(f, 1, &a);
	assert_true(loop_until(f->base, &a.done));
	assert_non_null(a.e);
	assert_int_equal(a.err, 0);
	assert_int_equal(f->loads, 2);
	mc_put(&f->c, a.e);
}

static void
test_failed_read_is_forgotten(void **state)
{
	struct fixture *f = *state;
	struct waiter a;

	memset(&a, 0, sizeof(a));
	a.w.ready = ready;
	assert_int_equal(mc_get(&f->c, 9, -1, 0, 0, BLK, &a.w), 0);	/* EBADF */
	assert_true(loop_until(f->base, &a.done));
	assert_null(a.e);
	assert_int_equal(a.err, EBADF);
	assert_null(mc_find(&f->c, 9));
	assert_int_equal(f->loads, 0);		/* the hook never sees a failed read */
}

static void
test_eviction_spares_pinned_and_loading(void **state)
{
	struct fixture *f = *state;
	struct waiter w[4];

	for (int k = 0; k < 3; k++) {
		get(f, k, &w[k]);
		assert_true(loop_until(f->base, &w[k].done));
	}
	assert_int_equal(f->c.count, 3);	/* above max (2): all pinned */
	get(f, 3, &w[3]);			/* loading, pinned by its waiter */
	mc_put(&f->c, w[0].e);			/* 0 is the oldest unpinned: goes */
	assert_null(mc_find(&f->c, 0));
	assert_int_equal(f->c.count, 3);
	mc_put(&f->c, w[1].e);			/* 1 goes; 3 is loading, 2 pinned */
	assert_null(mc_find(&f->c, 1));
	assert_non_null(mc_find(&f->c, 3));
	assert_int_equal(f->c.count, 2);
	assert_true(loop_until(f->base, &w[3].done));
	mc_put(&f->c, w[2].e);
	mc_put(&f->c, w[3].e);
	assert_int_equal(f->c.count, 2);
	assert_non_null(mc_find(&f->c, 2));
	assert_non_null(mc_find(&f->c, 3));
}

static void
test_insert_and_drop(void **state)
{
	struct fixture *f = *state;
	struct waiter a, b;
	uint8_t *buf = malloc(BLK);

	memset(buf, 0x77, BLK);
	assert_int_equal(mc_insert(&f->c, 5, 4096, buf), 0);
	get(f, 5, &a);				/* in memory: no read */
	assert_int_equal(a.done, 1);
	assert_ptr_equal(a.e->buf, buf);
	assert_int_equal(a.e->off, 4096);
	assert_int_equal(f->loads, 0);
	buf = calloc(1, BLK);			/* a newer block of key 5: the pinned one is hidden */
	assert_int_equal(mc_insert(&f->c, 5, 8192, buf), 0);
	assert_ptr_equal(mc_find(&f->c, 5)->buf, buf);
	assert_int_equal(mc_find(&f->c, 5)->off, 8192);
	assert_int_equal(f->c.count, 2);
	mc_put(&f->c, a.e);			/* its last user: freed */
	assert_int_equal(f->c.count, 1);
	mc_drop(&f->c, 5);			/* unused: freed now */
	assert_null(mc_find(&f->c, 5));
	assert_int_equal(f->c.count, 0);

	get(f, 5, &b);				/* dropped while loading: its waiter still gets it */
	mc_drop(&f->c, 5);
	assert_null(mc_find(&f->c, 5));
	assert_true(loop_until(f->base, &b.done));
	assert_int_equal(b.err, 0);
	assert_int_equal(((uint8_t *)b.e->buf)[0], 7);
	assert_null(mc_find(&f->c, 5));
	mc_put(&f->c, b.e);
	assert_int_equal(f->c.count, 0);

	get(f, 5, &b);				/* an unpinned older block goes at an insert */
	assert_true(loop_until(f->base, &b.done));
	mc_put(&f->c, b.e);
	assert_int_equal(f->c.count, 1);
	buf = calloc(1, BLK);
	assert_int_equal(mc_insert(&f->c, 5, 0, buf), 0);
	assert_int_equal(f->c.count, 1);
	assert_ptr_equal(mc_find(&f->c, 5)->buf, buf);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_one_read_for_all_waiters, setup, teardown),
		cmocka_unit_test_setup_teardown(test_refused_load_is_forgotten, setup, teardown),
		cmocka_unit_test_setup_teardown(test_failed_read_is_forgotten, setup, teardown),
		cmocka_unit_test_setup_teardown(test_eviction_spares_pinned_and_loading, setup,
						teardown),
		cmocka_unit_test_setup_teardown(test_insert_and_drop, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
