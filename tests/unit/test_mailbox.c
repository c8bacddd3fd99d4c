/* lib/mailbox: messages posted from other threads run on the owner's loop,
 * each poster's in the order it posted them, none lost or run twice; a
 * burst costs the owner few wake-ups. Run under ThreadSanitizer by make check. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>
#include <event2/event.h>

#include "mailbox.h"

#define POSTERS 3
#define PER_POSTER 20000

struct msg {
	struct mailbox_msg m;
	int poster, seq;
};

static int next_seq[POSTERS];	/* the owner's only */
static int ran, out_of_order;
static struct event_base *base;
static struct mailbox *mb;

static void
on_msg(struct mailbox_msg *m)
{
	struct msg *x = (struct msg *)m;
	if (x->seq != next_seq[x->poster])
		out_of_order++;
	next_seq[x->poster] = x->seq + 1;
	if (++ran == POSTERS * PER_POSTER)
		event_base_loopbreak(base);
	free(x);
}

static void *
poster(void *arg)
{
	int p = (int)(intptr_t)arg;
	for (int i = 0; i < PER_POSTER; i++) {
		struct msg *x = malloc(sizeof(*x));
		x->m.fn = on_msg;
		x->poster = p;
		x->seq = i;
		mailbox_post(mb, &x->m);
	}
	return NULL;
}

static void
test_posts_from_threads_run_in_order_on_the_owner(void **state)
{
	pthread_t t[POSTERS];
	(void)state;

	base = event_base_new();
	mb = mailbox_new(base);
	assert_non_null(mb);
	for (int p = 0; p < POSTERS; p++)
		assert_int_equal(pthread_create(&t[p], NULL, poster, (void *)(intptr_t)p), 0);
	event_base_loop(base, EVLOOP_NO_EXIT_ON_EMPTY);
	for (int p = 0; p < POSTERS; p++)
		pthread_join(t[p], NULL);
	assert_int_equal(ran, POSTERS * PER_POSTER);
	assert_int_equal(out_of_order, 0);
	for (int p = 0; p < POSTERS; p++)
		assert_int_equal(next_seq[p], PER_POSTER);
	assert_int_equal(mailbox_run(mb), 0);	/* nothing left behind */
	mailbox_free(mb);
	event_base_free(base);
}

static int self_runs;

static void
repost(struct mailbox_msg *m)
{
	/* a message may post another: it runs on a later wake-up, not in this one */
	if (++self_runs < 3)
		mailbox_post(mb, m);
	else
		event_base_loopbreak(base);
}

static void
test_a_message_posting_to_its_own_mailbox(void **state)
{
	struct mailbox_msg m = { .fn = repost };
	(void)state;

	base = event_base_new();
	mb = mailbox_new(base);
	mailbox_post(mb, &m);
	assert_int_equal(mailbox_run(mb), 1);	/* the first only; it posted the second */
	event_base_loop(base, EVLOOP_NO_EXIT_ON_EMPTY);
	assert_int_equal(self_runs, 3);
	mailbox_free(mb);
	event_base_free(base);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_posts_from_threads_run_in_order_on_the_owner),
		cmocka_unit_test(test_a_message_posting_to_its_own_mailbox),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
