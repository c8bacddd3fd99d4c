/*
 * An event loop: one thread with its own event base, I/O engine (its own
 * io_uring and workers), buffer pool, NBD frontend state and mailbox. Every
 * vbd lives on one loop from open to close, and everything about it (its
 * frontends, QoS queue, chain, stats) runs on that loop's thread, so the
 * request path takes no lock. Loop 0 is the main thread: it also runs the
 * control socket, the metrics listener, xenstore and signals.
 *
 * Threads: loop_post / loop_call from any thread; the message runs on the
 * target loop's thread. loop_current() is the calling thread's loop (NULL
 * on a worker thread).
 */
#ifndef TD_LOOP_H
#define TD_LOOP_H

#include <pthread.h>

#include "mailbox.h"

struct server;
struct event_base;
struct io_engine;
struct bufpool;
struct nbd_server;
struct vbd;
struct event;

struct loop {
	struct server *srv;
	unsigned index;
	struct event_base *base;
	struct io_engine *io;
	struct bufpool *pool;
	struct mailbox *mb;
	struct nbd_server *nbd;		/* this loop's NBD listeners and connections */
	struct event *idle_tick;	/* gives idle buffers back to the system */
	struct vbd *zombies;		/* force-closed here, waiting for their last I/O */
	unsigned nr_vbds;		/* placed here (srv->lock) */
	pthread_t thread;
	int running;			/* has a thread of its own (not loop 0) */
	/* starting: the thread makes the engine (an io_uring is its maker's) */
	const char *engine;
	pthread_mutex_t start_lock;
	pthread_cond_t start_cond;
	int started;
	char start_err[256];
};

struct loop *loop_current(void);
/* For loop 0 (the main thread) and for tests: this thread runs l. */
void loop_set_current(struct loop *l);

/* NULL with err set (one line). */
struct loop *loop_new(struct server *srv, unsigned index, const char *io_engine,
		      size_t pool_cache, char *err, size_t errlen);
/* Starts the loop's own thread (every loop but 0), which makes its I/O
 * engine. 0, or -errno with err set. */
int loop_start(struct loop *l, char *err, size_t errlen);
/* Stops and joins the loop's thread (if any). */
void loop_stop(struct loop *l);
/* Runs what is queued in l's mailbox, on the calling thread, as l (stopped loops). */
void loop_drain(struct loop *l);
void loop_free(struct loop *l);

void loop_post(struct loop *l, struct mailbox_msg *m);
/* fn(arg) on l's thread; -ENOMEM if the message cannot be made (nothing posted). */
int loop_call(struct loop *l, void (*fn)(void *arg), void *arg);

#endif
