/* Both I/O engines: vectored I/O, sync, hole punching, errors, a flood of
 * requests beyond the ring size, blocking calls and deferred completions. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "io.h"
#include "loop.h"

#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_KEEP_SIZE 0x01
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif

struct fixture {
	struct event_base *base;
	struct io_engine *io;
	int fd;
	char path[64];
};

struct waiter {
	struct io_op op;
	int res, done;
};

static void
op_done(struct io_op *op, int res)
{
	struct waiter *w = (struct waiter *)op;
	w->res = res;
	w->done++;
}

static int
setup(void **state, const char *engine)
{
	struct fixture *f = calloc(1, sizeof(*f));
	char err[256];
	f->base = event_base_new();
	f->io = io_engine_new(f->base, engine, err, sizeof(err));
	if (!f->io) {
		fprintf(stderr, "%s\n", err);
		return -1;
	}
	strcpy(f->path, "/tmp/td-unit-io-XXXXXX");
	f->fd = mkstemp(f->path);
	*state = f;
	return f->fd < 0 ? -1 : 0;
}

static int setup_uring(void **state) { return setup(state, "uring"); }
static int setup_threads(void **state) { return setup(state, "threads"); }

static int
teardown(void **state)
{
	struct fixture *f = *state;
	io_engine_free(f->io);
	event_base_free(f->base);
	close(f->fd);
	unlink(f->path);
	free(f);
	return 0;
}

static int
run_op(struct fixture *f, enum io_opcode opc, uint64_t off, uint64_t len, int mode,
       struct iovec *iov, int iovcnt)
{
	struct waiter w = { 0 };
	w.op.opcode = opc;
	w.op.fd = f->fd;
	w.op.offset = off;
	w.op.length = len;
	w.op.mode = mode;
	w.op.iov = iov;
	w.op.iovcnt = iovcnt;
	w.op.done = op_done;
	io_submit(f->io, &w.op);
	assert_int_equal(w.done, 0);	/* never completes inside submit */
	assert_true(loop_until(f->base, &w.done));
	assert_int_equal(w.done, 1);
	return w.res;
}

static void
test_rw_sync_punch(void **state)
{
	struct fixture *f = *state;
	char a[1000], b[3000], c[96], back[4096];
	memset(a, 'a', sizeof(a));
	memset(b, 'b', sizeof(b));
	memset(c, 'c', sizeof(c));
	struct iovec w[3] = { { a, sizeof(a) }, { b, sizeof(b) }, { c, sizeof(c) } };
	assert_int_equal(run_op(f, IO_OP_WRITEV, 8192, 0, 0, w, 3), 4096);
	assert_int_equal(run_op(f, IO_OP_FDATASYNC, 0, 0, 0, NULL, 0), 0);
	struct iovec r = { back, sizeof(back) };
	assert_int_equal(run_op(f, IO_OP_READV, 8192, 0, 0, &r, 1), 4096);
	assert_memory_equal(back, a, sizeof(a));
	assert_memory_equal(back + 1000, b, sizeof(b));
	assert_memory_equal(back + 4000, c, sizeof(c));
	assert_int_equal(run_op(f, IO_OP_FALLOCATE, 8192, 4096, FALLOC_FL_PUNCH_HOLE |
				FALLOC_FL_KEEP_SIZE, NULL, 0), 0);
	r.iov_base = back;
	r.iov_len = sizeof(back);
	assert_int_equal(run_op(f, IO_OP_READV, 8192, 0, 0, &r, 1), 4096);
	for (size_t i = 0; i < sizeof(back); i++)
		assert_int_equal(back[i], 0);
	assert_int_equal(run_op(f, IO_OP_FADVISE, 0, 4096, POSIX_FADV_WILLNEED, NULL, 0), 0);
}

static void
test_errors(void **state)
{
	struct fixture *f = *state;
	char buf[512];
	struct iovec r = { buf, sizeof(buf) };
	/* reading where the file has no bytes: the file "shrank" */
	assert_int_equal(run_op(f, IO_OP_READV, 1 << 30, 0, 0, &r, 1), -EIO);
	int saved = f->fd;
	f->fd = 12345;	/* not open */
	r.iov_base = buf;
	r.iov_len = sizeof(buf);
	assert_int_equal(run_op(f, IO_OP_READV, 0, 0, 0, &r, 1), -EBADF);
	f->fd = saved;
}

#define FLOOD 6000	/* more than the CQ (4096): exercises the backlog */

static void
test_flood(void **state)
{
	struct fixture *f = *state;
	struct waiter *w = calloc(FLOOD, sizeof(*w));
	struct iovec *iov = calloc(FLOOD, sizeof(*iov));
	uint32_t *vals = calloc(FLOOD, sizeof(*vals));
	assert_int_equal(ftruncate(f->fd, FLOOD * 4), 0);
	for (int i = 0; i < FLOOD; i++) {
		vals[i] = (uint32_t)i * 2654435761u;
		iov[i].iov_base = &vals[i];
		iov[i].iov_len = 4;
		w[i].op.opcode = IO_OP_WRITEV;
		w[i].op.fd = f->fd;
		w[i].op.offset = (uint64_t)i * 4;
		w[i].op.iov = &iov[i];
		w[i].op.iovcnt = 1;
		w[i].op.done = op_done;
		io_submit(f->io, &w[i].op);
	}
	for (int i = 0; i < FLOOD; i++) {
		assert_true(loop_until(f->base, &w[i].done));
	}
	struct io_engine_stats st;
	io_engine_get_stats(f->io, &st);
	assert_int_equal(st.inflight, 0);
	for (int i = 0; i < FLOOD; i++) {
		assert_int_equal(w[i].done, 1);
		assert_int_equal(w[i].res, 4);
		uint32_t v;
		assert_int_equal(pread(f->fd, &v, 4, i * 4), 4);
		assert_int_equal(v, vals[i]);
	}
	free(w);
	free(iov);
	free(vals);
}

struct call_state {
	struct io_call c;
	pthread_t loop_thread, ran_on;
	int done, res;
};

static int
call_fn(struct io_call *c)
{
	struct call_state *cs = (struct call_state *)c;
	cs->ran_on = pthread_self();
	return -ENOTTY;
}

static void
call_done(struct io_call *c, int res)
{
	struct call_state *cs = (struct call_state *)c;
	assert_true(pthread_equal(pthread_self(), cs->loop_thread));
	cs->res = res;
	cs->done = 1;
}

static void
test_blocking_call(void **state)
{
	struct fixture *f = *state;
	struct call_state cs = { .c = { .fn = call_fn, .done = call_done } };
	cs.loop_thread = pthread_self();
	io_call(f->io, &cs.c);
	assert_true(loop_until(f->base, &cs.done));
	assert_int_equal(cs.res, -ENOTTY);
	assert_false(pthread_equal(cs.ran_on, cs.loop_thread));
}

static int order[4], norder;

static void
defer_fn(struct io_defer *d)
{
	order[norder++] = (int)(intptr_t)d->arg;
}

static void
test_defer_fifo(void **state)
{
	struct fixture *f = *state;
	struct io_defer d[4];
	norder = 0;
	for (int i = 0; i < 4; i++) {
		d[i].fn = defer_fn;
		d[i].arg = (void *)(intptr_t)i;
		io_defer(f->io, &d[i]);
	}
	assert_int_equal(norder, 0);
	volatile int four = 0;
	while (norder < 4) {
		event_base_loop(f->base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
		four = norder == 4;
	}
	assert_true(four);
	for (int i = 0; i < 4; i++)
		assert_int_equal(order[i], i);
}

static void
test_iov_advance(void **state)
{
	char x[10], y[20];
	struct iovec v[2] = { { x, 10 }, { y, 20 } };
	int cnt = 2;
	(void)state;
	struct iovec *p = io_iov_advance(v, &cnt, 15);
	assert_int_equal(cnt, 1);
	assert_ptr_equal(p->iov_base, y + 5);
	assert_int_equal(p->iov_len, 15);
	p = io_iov_advance(p, &cnt, 15);
	assert_int_equal(cnt, 0);
}

static void
test_unknown_engine(void **state)
{
	char err[256];
	struct event_base *base = event_base_new();
	(void)state;
	assert_null(io_engine_new(base, "spdk", err, sizeof(err)));
	assert_non_null(strstr(err, "spdk"));
	event_base_free(base);
}

/* A tmpfs file's ops run on the loop, yet still complete on a later turn. */
static void
test_memory_ops(void **state)
{
	struct fixture *f = *state;
	char path[] = "/dev/shm/td-unit-mem-XXXXXX";
	int fd = mkstemp(path);
	if (fd < 0) {
		skip();	/* no tmpfs at /dev/shm on this host */
		return;
	}
	char out[8192], in[8192];
	memset(out, 0x6d, sizeof(out));
	struct iovec v = { out, sizeof(out) };
	struct waiter w = { 0 };
	w.op.opcode = IO_OP_WRITEV;
	w.op.flags = IO_F_MEMORY;
	w.op.fd = fd;
	w.op.offset = 4096;
	w.op.iov = &v;
	w.op.iovcnt = 1;
	w.op.done = op_done;
	io_submit(f->io, &w.op);
	assert_int_equal(w.done, 0);
	assert_true(loop_until(f->base, &w.done));
	assert_int_equal(w.res, (int)sizeof(out));
	assert_int_equal(pread(fd, in, sizeof(in), 4096), (ssize_t)sizeof(in));
	assert_memory_equal(in, out, sizeof(in));
	struct io_engine_stats st;
	io_engine_get_stats(f->io, &st);
	assert_int_equal(st.inflight, 0);
	close(fd);
	unlink(path);
}

/* A worker stuck on a hung device must not hold up work queued after it. */
struct stuck_item {
	struct workq_item it;
	pthread_mutex_t *lock;
	pthread_cond_t *cond;
	volatile int *release;
	int done;
};

static void
stuck_run(struct workq_item *it)
{
	struct stuck_item *s = (struct stuck_item *)it;
	if (!s->lock)
		return;
	pthread_mutex_lock(s->lock);
	while (!*s->release)
		pthread_cond_wait(s->cond, s->lock);
	pthread_mutex_unlock(s->lock);
}

static void
stuck_done(struct workq_item *it)
{
	((struct stuck_item *)it)->done = 1;
}

static void
test_workq_hung_worker(void **state)
{
	pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
	pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
	volatile int release = 0;
	struct event_base *base = event_base_new();
	struct workq *q = workq_new(base, 4);
	struct stuck_item hung = { .it = { stuck_run, stuck_done, NULL }, &lock, &cond, &release, 0 };
	(void)state;
	workq_push(q, &hung.it);
	usleep(20000);	/* let a worker take it and block */
	for (int round = 0; round < 3; round++) {
		struct stuck_item quick = { .it = { stuck_run, stuck_done, NULL } };
		workq_push(q, &quick.it);
		assert_true(loop_until(base, &quick.done));
	}
	assert_int_equal(hung.done, 0);
	pthread_mutex_lock(&lock);
	release = 1;
	pthread_cond_broadcast(&cond);
	pthread_mutex_unlock(&lock);
	assert_true(loop_until(base, &hung.done));
	workq_free(q);
	event_base_free(base);
}

/* A batch all of whose items hang (a dead disk's ops of one loop turn): work
 * queued after it still finds a worker. */
static void
test_workq_hung_batch(void **state)
{
	pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
	pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
	volatile int release = 0;
	struct event_base *base = event_base_new();
	struct workq *q = workq_new(base, 4);
	struct stuck_item hung[3];
	(void)state;
	for (int i = 0; i < 3; i++) {
		hung[i] = (struct stuck_item){ .it = { stuck_run, stuck_done, NULL }, &lock, &cond,
					       &release, 0 };
		if (i)
			hung[i - 1].it.next = &hung[i].it;
	}
	workq_push_batch(q, &hung[0].it, &hung[2].it.next, 3);
	usleep(20000);
	struct stuck_item quick = { .it = { stuck_run, stuck_done, NULL } };
	workq_push(q, &quick.it);
	assert_true(loop_until(base, &quick.done));
	pthread_mutex_lock(&lock);
	release = 1;
	pthread_cond_broadcast(&cond);
	pthread_mutex_unlock(&lock);
	for (int i = 0; i < 3; i++)
		assert_true(loop_until(base, &hung[i].done));
	workq_free(q);
	event_base_free(base);
}

/* No threads: items run and complete on the loop, a turn after the push, in order. */
struct inline_item {
	struct workq_item it;
	struct workq *q;
	int *log, *n;		/* the order things happened in */
	int id, ran, done;
	struct inline_item *then;	/* pushed from done */
};

static void
inline_run(struct workq_item *it)
{
	struct inline_item *x = (struct inline_item *)it;
	x->ran = 1;
	x->log[(*x->n)++] = x->id;
}

static void
inline_done(struct workq_item *it)
{
	struct inline_item *x = (struct inline_item *)it;
	assert_true(x->ran);
	x->done = 1;
	x->log[(*x->n)++] = -x->id;
	if (x->then)
		workq_push(x->q, &x->then->it);
}

static void
test_workq_no_threads(void **state)
{
	struct event_base *base = event_base_new();
	struct workq *q = workq_new(base, 0);
	int log[16], n = 0;
	struct inline_item c = { { inline_run, inline_done, NULL }, q, log, &n, 3, 0, 0, NULL };
	struct inline_item a = { { inline_run, inline_done, NULL }, q, log, &n, 1, 0, 0, &c };
	struct inline_item b = { { inline_run, inline_done, NULL }, q, log, &n, 2, 0, 0, NULL };
	struct inline_item left = { { inline_run, inline_done, NULL }, q, log, &n, 4, 0, 0, NULL };
	(void)state;
	assert_non_null(q);
	workq_push(q, &a.it);
	workq_push(q, &b.it);
	assert_int_equal(n, 0);		/* nothing inside the push */
	assert_true(loop_until(base, &c.done));
	/* a and b in order; c, pushed by a's done, after them (a later turn) */
	static const int want[] = { 1, -1, 2, -2, 3, -3 };
	assert_int_equal(n, 6);
	assert_memory_equal(log, want, sizeof(want));
	/* what is still queued at free runs, as a worker would run it, unanswered */
	workq_push(q, &left.it);
	workq_free(q);
	assert_true(left.ran);
	assert_false(left.done);
	event_base_free(base);
}

#define ENGINE_TESTS(setupfn) \
	cmocka_unit_test_setup_teardown(test_memory_ops, setupfn, teardown), \
	cmocka_unit_test_setup_teardown(test_rw_sync_punch, setupfn, teardown), \
	cmocka_unit_test_setup_teardown(test_errors, setupfn, teardown), \
	cmocka_unit_test_setup_teardown(test_flood, setupfn, teardown), \
	cmocka_unit_test_setup_teardown(test_blocking_call, setupfn, teardown), \
	cmocka_unit_test_setup_teardown(test_defer_fifo, setupfn, teardown)

int
main(void)
{
	const struct CMUnitTest tests[] = {
		ENGINE_TESTS(setup_uring),
		ENGINE_TESTS(setup_threads),
		cmocka_unit_test(test_iov_advance),
		cmocka_unit_test(test_workq_hung_worker),
		cmocka_unit_test(test_workq_hung_batch),
		cmocka_unit_test(test_workq_no_threads),
		cmocka_unit_test(test_unknown_engine),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
