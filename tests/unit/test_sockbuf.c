/* lib/rxbuf and lib/txbatch on a real socket pair: whole messages out of
 * partial reads, compaction, batching, and a batch the socket takes only
 * in part moving to the evbuffer in order with every buffer released once. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>
#include <event2/buffer.h>
#include <malloc.h>

#include "rxbuf.h"
#include "txbatch.h"

static void
pair(int sv[2], int sndbuf)
{
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	if (sndbuf)
		assert_int_equal(setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf)), 0);
}

static void
test_rxbuf_messages_and_compaction(void **state)
{
	struct rxbuf rb = { 0 };
	int sv[2];
	uint8_t msg[100], got[100];
	(void)state;

	pair(sv, 0);
	assert_int_equal(rxbuf_init(&rb, 256), 0);
	assert_int_equal(rxbuf_fill(&rb, sv[1]), -EAGAIN);
	for (int i = 0; i < 20; i++) {	/* 2000 bytes through a 256-byte buffer */
		memset(msg, i, sizeof(msg));
		assert_int_equal(write(sv[0], msg, 70), 70);
		assert_int_equal(write(sv[0], msg + 70, 30), 30);
		while (rxbuf_len(&rb) < sizeof(msg))
			assert_true(rxbuf_fill(&rb, sv[1]) > 0);
		assert_int_equal(rxbuf_take(&rb, got, sizeof(got)), sizeof(got));
		assert_memory_equal(got, msg, sizeof(msg));
	}
	assert_int_equal(rxbuf_len(&rb), 0);
	assert_int_equal(rb.head, 0);	/* emptied: back to the start */
	close(sv[0]);
	assert_int_equal(rxbuf_fill(&rb, sv[1]), 0);	/* end of stream */
	close(sv[1]);
	rxbuf_free(&rb);
}

static void
test_rxbuf_full(void **state)
{
	struct rxbuf rb = { 0 };
	int sv[2];
	uint8_t b[64] = { 0 };
	(void)state;

	pair(sv, 0);
	assert_int_equal(rxbuf_init(&rb, 32), 0);
	assert_int_equal(write(sv[0], b, sizeof(b)), sizeof(b));
	assert_int_equal(rxbuf_fill(&rb, sv[1]), 32);
	assert_int_equal(rxbuf_fill(&rb, sv[1]), -ENOBUFS);
	rxbuf_consume(&rb, 16);
	assert_int_equal(rxbuf_fill(&rb, sv[1]), 16);	/* compacted into the freed room */
	close(sv[0]);
	close(sv[1]);
	rxbuf_free(&rb);
}

static int released, release_order[8];
static size_t released_len[8];

static void
release(const void *data, size_t len, void *arg)
{
	(void)data;
	if (released < 8) {
		release_order[released] = (int)(intptr_t)arg;
		released_len[released] = len;
	}
	released++;
}

static void
test_txbatch_one_send_merges_copies(void **state)
{
	struct txbatch *b = calloc(1, sizeof(*b));
	struct evbuffer *out = evbuffer_new();
	uint8_t data[4096], got[4096 + 8];
	int sv[2];
	(void)state;

	pair(sv, 0);
	released = 0;
	memset(data, 7, sizeof(data));
	assert_int_equal(txb_add(b, "head", 4), 0);
	assert_int_equal(txb_add(b, "er", 2), 0);
	assert_int_equal(b->n, 1);	/* adjacent copies: one piece */
	assert_int_equal(txb_add_ref(b, data, sizeof(data), release, (void *)1), 0);
	assert_int_equal(txb_add(b, "xy", 2), 0);
	assert_int_equal(txb_length(b), 8 + sizeof(data));
	assert_int_equal(txb_flush(b, sv[0], out), 0);
	assert_int_equal(evbuffer_get_length(out), 0);
	assert_int_equal(released, 1);
	assert_int_equal(txb_length(b), 0);
	assert_int_equal(read(sv[1], got, sizeof(got)), sizeof(got));
	assert_memory_equal(got, "header", 6);
	assert_memory_equal(got + 6, data, sizeof(data));
	assert_memory_equal(got + 6 + sizeof(data), "xy", 2);
	close(sv[0]);
	close(sv[1]);
	evbuffer_free(out);
	free(b);
}

static void
test_txbatch_partial_send_spills_in_order(void **state)
{
	struct txbatch *b = calloc(1, sizeof(*b));
	struct evbuffer *out = evbuffer_new();
	enum { BIG = 1 << 20 };
	uint8_t *d1 = malloc(BIG), *d2 = malloc(BIG), *all = malloc(3 * BIG);
	int sv[2];
	(void)state;

	pair(sv, 4096);
	released = 0;
	memset(d1, 1, BIG);
	memset(d2, 2, BIG);
	assert_int_equal(txb_add(b, "A", 1), 0);
	assert_int_equal(txb_add_ref(b, d1, BIG, release, (void *)1), 0);
	assert_int_equal(txb_add(b, "B", 1), 0);
	assert_int_equal(txb_add_ref(b, d2, BIG, release, (void *)2), 0);
	assert_int_equal(txb_flush(b, sv[0], out), 0);
	size_t sent = 2 * BIG + 2 - evbuffer_get_length(out);
	assert_true(sent > 0 && sent < BIG);	/* the socket took part of d1 */
	assert_int_equal(released, 0);		/* d1's tail and d2 are the evbuffer's */

	/* what the socket got, then what the evbuffer holds: the whole stream */
	size_t n = 0;
	while (n < sent) {
		ssize_t r = read(sv[1], all + n, sent - n);
		assert_true(r > 0);
		n += (size_t)r;
	}
	n += evbuffer_remove(out, all + n, 3 * BIG - n);
	assert_int_equal(n, 2 * BIG + 2);
	assert_int_equal(all[0], 'A');
	assert_memory_equal(all + 1, d1, BIG);
	assert_int_equal(all[1 + BIG], 'B');
	assert_memory_equal(all + 2 + BIG, d2, BIG);
	/* each buffer released once, whole, when the evbuffer let it go */
	assert_int_equal(released, 2);
	assert_int_equal(release_order[0], 1);
	assert_int_equal(released_len[0], BIG);
	assert_int_equal(release_order[1], 2);
	close(sv[0]);
	close(sv[1]);
	evbuffer_free(out);
	free(b);
	free(d1);
	free(d2);
	free(all);
}

static void
test_txbatch_full_and_dead_socket(void **state)
{
	struct txbatch *b = calloc(1, sizeof(*b));
	struct evbuffer *out = evbuffer_new();
	uint8_t big[TXB_BYTES + 1] = { 0 };
	int sv[2];
	(void)state;

	pair(sv, 0);
	released = 0;
	assert_int_equal(txb_add(b, big, sizeof(big)), -ENOSPC);
	for (int i = 0; i < TXB_IOV; i++)
		assert_int_equal(txb_add_ref(b, big, 1, release, (void *)3), 0);
	assert_int_equal(txb_add_ref(b, big, 1, release, (void *)3), -ENOSPC);
	close(sv[1]);
	assert_int_equal(txb_flush(b, sv[0], out), -EPIPE);	/* and no SIGPIPE */
	assert_int_equal(released, TXB_IOV);
	assert_int_equal(txb_length(b), 0);
	/* no socket (a bufferevent pair): everything goes to the evbuffer */
	assert_int_equal(txb_add(b, "zz", 2), 0);
	assert_int_equal(txb_flush(b, -1, out), 0);
	assert_int_equal(evbuffer_get_length(out), 2);
	close(sv[0]);
	evbuffer_free(out);
	free(b);
}

/* A header copied in behind a large referenced buffer takes a chain of its own size. */
static void
test_txb_evbuffer_add_after_a_reference(void **state)
{
	static uint8_t big[4 << 20];
	struct evbuffer *out = evbuffer_new();
	uint8_t h[20], got[40];
	(void)state;
	for (unsigned i = 0; i < sizeof(h); i++)
		h[i] = (uint8_t)(i + 1);
	assert_int_equal(txb_evbuffer_add(out, h, sizeof(h)), 0);
	assert_int_equal(evbuffer_add_reference(out, big, sizeof(big), NULL, NULL), 0);
	struct mallinfo2 before = mallinfo2();
	assert_int_equal(txb_evbuffer_add(out, h, sizeof(h)), 0);
	assert_int_equal(txb_evbuffer_add(out, h, 0), 0);
	struct mallinfo2 after = mallinfo2();
#ifndef __SANITIZE_ADDRESS__
	/* evbuffer_add made a 4 MiB chain here (glibc: an mmap) */
	assert_true(after.hblkhd - before.hblkhd < 64 * 1024);
	assert_true(after.uordblks - before.uordblks < 64 * 1024);
#else
	(void)before;
	(void)after;
#endif
	assert_int_equal(evbuffer_get_length(out), 2 * sizeof(h) + sizeof(big));
	assert_int_equal(evbuffer_remove(out, got, sizeof(h)), (int)sizeof(h));
	assert_int_equal(evbuffer_drain(out, sizeof(big)), 0);
	assert_int_equal(evbuffer_remove(out, got + sizeof(h), sizeof(h)), (int)sizeof(h));
	assert_memory_equal(got, h, sizeof(h));
	assert_memory_equal(got + sizeof(h), h, sizeof(h));
	evbuffer_free(out);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_rxbuf_messages_and_compaction),
		cmocka_unit_test(test_rxbuf_full),
		cmocka_unit_test(test_txbatch_one_send_merges_copies),
		cmocka_unit_test(test_txbatch_partial_send_spills_in_order),
		cmocka_unit_test(test_txbatch_full_and_dead_socket),
		cmocka_unit_test(test_txb_evbuffer_add_after_a_reference),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
