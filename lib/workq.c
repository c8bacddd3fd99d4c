/*
 * Worker threads for blocking calls. Submission is a mutex-protected FIFO;
 * completions go to a second list and a pipe wakes the loop only when that
 * list goes from empty to non-empty (one byte per batch, not per item).
 * With no threads (the fuzz build), items run on the loop itself, a turn
 * after they were pushed.
 */
#include "workq.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>

#include "log.h"

struct workq {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct workq_item *head, **tail;	/* waiting to run */
	struct workq_item *done_head, **done_tail;
	int stopping;
	unsigned nthreads;
	unsigned idle;		/* workers waiting for work */
	unsigned queued;
	pthread_t *threads;
	int pipe_rd, pipe_wr;
	struct event *ev;
};

static void
workq_signal_done(struct workq *q, struct workq_item *it)
{
	int wake;

	pthread_mutex_lock(&q->lock);
	it->next = NULL;
	wake = q->done_head == NULL;
	*q->done_tail = it;
	q->done_tail = &it->next;
	pthread_mutex_unlock(&q->lock);
	if (wake) {
		char c = 0;
		while (write(q->pipe_wr, &c, 1) < 0 && errno == EINTR)
			;
	}
}

static void *
workq_thread(void *arg)
{
	struct workq *q = arg;

	for (;;) {
		pthread_mutex_lock(&q->lock);
		while (!q->head && !q->stopping) {
			q->idle++;
			pthread_cond_wait(&q->cond, &q->lock);
			q->idle--;
		}
		if (!q->head) {
			pthread_mutex_unlock(&q->lock);
			return NULL;
		}
		struct workq_item *it = q->head;
		q->head = it->next;
		if (!q->head)
			q->tail = &q->head;
		q->queued--;
		/*
		 * More is queued and this item may never come back (a hung
		 * device): one more worker looks at the rest, or a vbd on good
		 * storage would wait behind a stuck one's items.
		 */
		if (q->head && q->idle)
			pthread_cond_signal(&q->cond);
		pthread_mutex_unlock(&q->lock);

		it->run(it);
		workq_signal_done(q, it);
	}
}

static void
workq_on_wake(evutil_socket_t fd, short what, void *arg)
{
	struct workq *q = arg;
	char buf[64];
	(void)what;

	while (read(fd, buf, sizeof(buf)) > 0)
		;
	pthread_mutex_lock(&q->lock);
	struct workq_item *it = q->done_head;
	q->done_head = NULL;
	q->done_tail = &q->done_head;
	pthread_mutex_unlock(&q->lock);

	while (it) {
		struct workq_item *next = it->next;
		it->done(it);
		it = next;
	}
}

/* No threads: the items pushed so far run, then complete, in push order. */
static void
workq_run_inline(evutil_socket_t fd, short what, void *arg)
{
	struct workq *q = arg;
	(void)fd;
	(void)what;

	pthread_mutex_lock(&q->lock);
	struct workq_item *it = q->head;
	q->head = NULL;
	q->tail = &q->head;
	q->queued = 0;
	pthread_mutex_unlock(&q->lock);
	/* what a done callback pushes runs on a later turn, as with threads */
	while (it) {
		struct workq_item *next = it->next;
		it->run(it);
		it->done(it);
		it = next;
	}
}

static int
set_nonblock_cloexec(int fd)
{
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		return -1;
	return fcntl(fd, F_SETFD, FD_CLOEXEC);
}

struct workq *
workq_new(struct event_base *base, unsigned nthreads)
{
	struct workq *q = calloc(1, sizeof(*q));
	int fds[2];

	if (!q)
		return NULL;
	q->tail = &q->head;
	q->done_tail = &q->done_head;
	q->pipe_rd = q->pipe_wr = -1;
	pthread_mutex_init(&q->lock, NULL);
	pthread_cond_init(&q->cond, NULL);
	if (!nthreads) {
		q->ev = event_new(base, -1, 0, workq_run_inline, q);
		if (!q->ev)
			goto fail;
		return q;
	}
	if (pipe(fds) < 0)
		goto fail;
	q->pipe_rd = fds[0];
	q->pipe_wr = fds[1];
	if (set_nonblock_cloexec(fds[0]) < 0 || set_nonblock_cloexec(fds[1]) < 0)
		goto fail;
	q->ev = event_new(base, q->pipe_rd, EV_READ | EV_PERSIST, workq_on_wake, q);
	if (!q->ev || event_add(q->ev, NULL) < 0)
		goto fail;
	q->threads = calloc(nthreads, sizeof(*q->threads));
	if (!q->threads)
		goto fail;
	/* Small stacks: the workers only run syscalls and format parsers. */
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 256 * 1024);
	for (; q->nthreads < nthreads; q->nthreads++) {
		if (pthread_create(&q->threads[q->nthreads], &attr, workq_thread, q) != 0) {
			pthread_attr_destroy(&attr);
			goto fail;
		}
	}
	pthread_attr_destroy(&attr);
	return q;
fail:
	log_err("cannot start worker threads: %s", strerror(errno));
	workq_free(q);
	return NULL;
}

/*
 * Wakes idle workers in proportion to the backlog: every wake-up is a
 * context switch, and a worker that finds more work keeps going without
 * one. Busy workers do not count: they may be stuck on a hung device; so a
 * worker taking an item with more behind it wakes one more (workq_thread).
 */
#define WORKQ_ITEMS_PER_WAKE 4

static void
workq_wake(struct workq *q)
{
	unsigned want = (q->queued + WORKQ_ITEMS_PER_WAKE - 1) / WORKQ_ITEMS_PER_WAKE;
	for (unsigned n = 0; n < want && n < q->idle; n++)
		pthread_cond_signal(&q->cond);
}

void
workq_push(struct workq *q, struct workq_item *it)
{
	workq_push_batch(q, it, &it->next, 1);
}

void
workq_push_batch(struct workq *q, struct workq_item *head, struct workq_item **tail,
		 unsigned n)
{
	*tail = NULL;
	pthread_mutex_lock(&q->lock);
	int first = !q->head;
	*q->tail = head;
	q->tail = tail;
	q->queued += n;
	workq_wake(q);
	pthread_mutex_unlock(&q->lock);
	if (!q->nthreads && first)
		event_active(q->ev, EV_TIMEOUT, 0);
}

void
workq_free(struct workq *q)
{
	if (!q)
		return;
	pthread_mutex_lock(&q->lock);
	q->stopping = 1;
	pthread_cond_broadcast(&q->cond);
	pthread_mutex_unlock(&q->lock);
	for (unsigned i = 0; i < q->nthreads; i++)
		pthread_join(q->threads[i], NULL);
	/* no threads: what is queued still runs, as a worker would run it */
	for (struct workq_item *it = q->nthreads ? NULL : q->head; it; ) {
		struct workq_item *next = it->next;
		it->run(it);
		it = next;
	}
	free(q->threads);
	if (q->ev)
		event_free(q->ev);
	if (q->pipe_rd >= 0)
		close(q->pipe_rd);
	if (q->pipe_wr >= 0)
		close(q->pipe_wr);
	pthread_mutex_destroy(&q->lock);
	pthread_cond_destroy(&q->cond);
	free(q);
}
