/*
 * A mutex-protected FIFO and an eventfd: the poster wakes the owner only
 * when the queue goes from empty to non-empty, so a burst of messages costs
 * one wake-up; the owner takes the whole queue in one lock.
 */
#include "mailbox.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <event2/event.h>

struct mailbox {
	pthread_mutex_t lock;
	struct mailbox_msg *head, **tail;
	int efd;
	struct event *ev;
};

unsigned
mailbox_run(struct mailbox *mb)
{
	struct mailbox_msg *m;
	unsigned n = 0;

	pthread_mutex_lock(&mb->lock);
	m = mb->head;
	mb->head = NULL;
	mb->tail = &mb->head;
	pthread_mutex_unlock(&mb->lock);
	while (m) {
		struct mailbox_msg *next = m->next;
		m->fn(m);	/* may free m, may post more */
		m = next;
		n++;
	}
	return n;
}

static void
mailbox_on_wake(evutil_socket_t fd, short what, void *arg)
{
	uint64_t v;
	(void)what;

	/* read first: a post after it wakes the loop again */
	while (read(fd, &v, sizeof(v)) < 0 && errno == EINTR)
		;
	mailbox_run(arg);
}

struct mailbox *
mailbox_new(struct event_base *base)
{
	struct mailbox *mb = calloc(1, sizeof(*mb));

	if (!mb)
		return NULL;
	mb->tail = &mb->head;
	pthread_mutex_init(&mb->lock, NULL);
	mb->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (mb->efd < 0)
		goto fail;
	mb->ev = event_new(base, mb->efd, EV_READ | EV_PERSIST, mailbox_on_wake, mb);
	if (!mb->ev || event_add(mb->ev, NULL) < 0)
		goto fail;
	return mb;
fail:
	mailbox_free(mb);
	errno = ENOMEM;
	return NULL;
}

void
mailbox_free(struct mailbox *mb)
{
	if (!mb)
		return;
	if (mb->ev)
		event_free(mb->ev);
	if (mb->efd >= 0)
		close(mb->efd);
	pthread_mutex_destroy(&mb->lock);
	free(mb);
}

void
mailbox_post(struct mailbox *mb, struct mailbox_msg *m)
{
	int wake;

	m->next = NULL;
	pthread_mutex_lock(&mb->lock);
	wake = mb->head == NULL;
	*mb->tail = m;
	mb->tail = &m->next;
	pthread_mutex_unlock(&mb->lock);
	if (wake) {
		uint64_t one = 1;
		while (write(mb->efd, &one, sizeof(one)) < 0 && errno == EINTR)
			;
	}
}
