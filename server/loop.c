/*
 * Loops: building one (base, engine, pool, mailbox, NBD state), running it
 * on its own thread, stopping it through its mailbox.
 */
#include "loop.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include <event2/event.h>

#include "bufpool.h"
#include "io.h"
#include "log.h"
#include "nbd.h"

#define IDLE_TRIM_INTERVAL 5	/* seconds between returns of idle buffers */

static _Thread_local struct loop *current;

struct loop *
loop_current(void)
{
	return current;
}

void
loop_set_current(struct loop *l)
{
	current = l;
}

static void
on_idle_tick(evutil_socket_t fd, short what, void *arg)
{
	struct loop *l = arg;
	(void)fd;
	(void)what;
	if (bufpool_trim_idle(l->pool)) {
#ifdef __GLIBC__
		malloc_trim(0);
#endif
	}
}

struct loop *
loop_new(struct server *srv, unsigned index, const char *io_engine, size_t pool_cache,
	 char *err, size_t errlen)
{
	struct loop *l = calloc(1, sizeof(*l));
	struct timeval tick = { IDLE_TRIM_INTERVAL, 0 };

	if (!l)
		goto nomem;
	l->srv = srv;
	l->index = index;
	pthread_mutex_init(&l->start_lock, NULL);
	pthread_cond_init(&l->start_cond, NULL);
	if (!(l->base = event_base_new()) || !(l->pool = bufpool_new(pool_cache)) ||
	    !(l->mb = mailbox_new(l->base)))
		goto nomem;
	l->idle_tick = event_new(l->base, -1, EV_PERSIST, on_idle_tick, l);
	if (!l->idle_tick || event_add(l->idle_tick, &tick) < 0)
		goto nomem;
	l->engine = io_engine;
	/* loop 0's engine is made here, on the main thread that runs it; the
	 * others' on their own threads (loop_start): an io_uring takes
	 * submissions only from the thread that made it */
	if (index == 0 && !(l->io = io_engine_new(l->base, io_engine, err, errlen)))
		goto fail;
	if (!(l->nbd = nbd_server_new(srv, l)))
		goto nomem;
	return l;
nomem:
	snprintf(err, errlen, "out of memory");
fail:
	loop_free(l);
	return NULL;
}

static void *
loop_thread(void *arg)
{
	struct loop *l = arg;
	char name[16];

	snprintf(name, sizeof(name), "tapdiskd-loop%u", l->index);
	pthread_setname_np(pthread_self(), name);
	current = l;
	l->io = io_engine_new(l->base, l->engine, l->start_err, sizeof(l->start_err));
	pthread_mutex_lock(&l->start_lock);
	l->started = 1;
	pthread_cond_signal(&l->start_cond);
	pthread_mutex_unlock(&l->start_lock);
	if (l->io)
		event_base_loop(l->base, EVLOOP_NO_EXIT_ON_EMPTY);
	return NULL;
}

int
loop_start(struct loop *l, char *err, size_t errlen)
{
	int rc = pthread_create(&l->thread, NULL, loop_thread, l);
	if (rc) {
		snprintf(err, errlen, "cannot start its thread: %s", strerror(rc));
		return -rc;
	}
	l->running = 1;
	pthread_mutex_lock(&l->start_lock);
	while (!l->started)
		pthread_cond_wait(&l->start_cond, &l->start_lock);
	pthread_mutex_unlock(&l->start_lock);
	if (!l->io) {	/* the thread has ended */
		pthread_join(l->thread, NULL);
		l->running = 0;
		snprintf(err, errlen, "%s", l->start_err);
		return -EIO;
	}
	return 0;
}

static void
loop_exit(void *arg)
{
	struct loop *l = arg;
	event_base_loopexit(l->base, NULL);
}

void
loop_stop(struct loop *l)
{
	if (!l || !l->running)
		return;
	while (loop_call(l, loop_exit, l) < 0)
		;	/* out of memory: a message is a few bytes; try again */
	pthread_join(l->thread, NULL);
	l->running = 0;
	loop_drain(l);	/* what was posted after the exit: nothing is lost */
}

void
loop_drain(struct loop *l)
{
	struct loop *was = current;

	current = l;
	while (l->mb && mailbox_run(l->mb))
		;
	current = was;
}

void
loop_free(struct loop *l)
{
	if (!l)
		return;
	loop_stop(l);
	loop_drain(l);	/* what is still posted to it (every loop is stopped by now) */
	nbd_server_free(l->nbd);
	if (l->idle_tick)
		event_free(l->idle_tick);
	if (l->io && !l->zombies)
		io_engine_free(l->io);
	mailbox_free(l->mb);
	bufpool_free(l->pool);
	if (l->base)
		event_base_free(l->base);
	pthread_mutex_destroy(&l->start_lock);
	pthread_cond_destroy(&l->start_cond);
	free(l);
}

void
loop_post(struct loop *l, struct mailbox_msg *m)
{
	mailbox_post(l->mb, m);
}

struct loop_call_msg {
	struct mailbox_msg m;
	void (*fn)(void *arg);
	void *arg;
};

static void
loop_call_run(struct mailbox_msg *m)
{
	struct loop_call_msg *c = (struct loop_call_msg *)m;
	void (*fn)(void *) = c->fn;
	void *arg = c->arg;

	free(c);
	fn(arg);
}

int
loop_call(struct loop *l, void (*fn)(void *arg), void *arg)
{
	struct loop_call_msg *c = malloc(sizeof(*c));

	if (!c)
		return -ENOMEM;
	c->m.fn = loop_call_run;
	c->fn = fn;
	c->arg = arg;
	loop_post(l, &c->m);
	return 0;
}
