/*
 * A pool of worker threads that runs blocking work off the event loop and
 * delivers each completion back on the loop thread, in completion order.
 */
#ifndef TD_WORKQ_H
#define TD_WORKQ_H

struct event_base;

struct workq_item {
	void (*run)(struct workq_item *it);	/* on a worker thread */
	void (*done)(struct workq_item *it);	/* on the loop thread */
	struct workq_item *next;
};

struct workq;

/*
 * nthreads 0: no threads; each item runs and completes on the loop, on a
 * turn after its push, in push order (deterministic: the fuzz build).
 */
struct workq *workq_new(struct event_base *base, unsigned nthreads);
void workq_push(struct workq *q, struct workq_item *it);
/* Queues a linked list of n items (tail: the last item's next field). */
void workq_push_batch(struct workq *q, struct workq_item *head,
		      struct workq_item **tail, unsigned n);
/* Waits for queued and running items to finish; their done callbacks are not called. */
void workq_free(struct workq *q);

#endif
