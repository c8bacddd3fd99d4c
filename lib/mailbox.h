/*
 * A loop's mailbox: other threads post messages, the loop that owns the
 * mailbox runs them, in the order they were posted. How work crosses from
 * one event loop to another (control commands, hand-offs, replies).
 *
 * Threads: mailbox_post from any thread; messages run on the owner's loop
 * thread. Ownership: a posted message belongs to its fn until it runs.
 */
#ifndef TD_MAILBOX_H
#define TD_MAILBOX_H

struct event_base;
struct mailbox;

struct mailbox_msg {
	void (*fn)(struct mailbox_msg *m);	/* on the owner's loop */
	struct mailbox_msg *next;
};

/* NULL on failure (errno set). */
struct mailbox *mailbox_new(struct event_base *base);
/* Messages still queued are dropped: post nothing once the owner is stopping. */
void mailbox_free(struct mailbox *mb);
void mailbox_post(struct mailbox *mb, struct mailbox_msg *m);
/* Runs what is queued now (a loop draining itself at shutdown); how many ran. */
unsigned mailbox_run(struct mailbox *mb);

#endif
