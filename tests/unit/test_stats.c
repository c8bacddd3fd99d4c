/* Latency histogram buckets and quantiles; buffer pool accounting. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/asan_interface.h>
#endif

#include "bufpool.h"
#include "stats.h"

static void
test_buckets_are_monotonic_and_tight(void **state)
{
	(void)state;
	uint64_t prev = 0;
	for (uint64_t us = 0; us < (1u << 20); us += 1 + us / 64) {
		unsigned b = hist_bucket(us);
		assert_true(b < HIST_BUCKETS);
		assert_true(us <= hist_bucket_upper(b));
		if (b > 0)
			assert_true(us > hist_bucket_upper(b - 1));
		assert_true(b >= prev);
		prev = b;
		/* log-linear: a bucket is at most 25% wider than its floor */
		if (us >= 4 && b < HIST_BUCKETS - 1)
			assert_true(hist_bucket_upper(b) - us <= us / 4 + 1);
	}
	/* 60 s fits below the overflow bucket; a day does not */
	assert_true(hist_bucket(60000000) < HIST_BUCKETS - 1);
	assert_int_equal(hist_bucket(86400000000ULL), HIST_BUCKETS - 1);
}

static void
test_quantiles(void **state)
{
	struct latency_hist h;
	(void)state;
	memset(&h, 0, sizeof(h));
	assert_int_equal(hist_quantile(&h, 0.5), 0);
	for (int i = 0; i < 990; i++)
		hist_add(&h, 100);
	for (int i = 0; i < 10; i++)
		hist_add(&h, 50000);
	uint64_t p50 = hist_quantile(&h, 0.5), p999 = hist_quantile(&h, 0.999);
	assert_true(p50 >= 100 && p50 <= 125);
	assert_true(p999 >= 50000 && p999 <= 50000);	/* capped at max */
	assert_int_equal(h.max_us, 50000);
	assert_int_equal(h.total, 1000);
}

static void
test_op_stats_json(void **state)
{
	struct op_stats s;
	(void)state;
	memset(&s, 0, sizeof(s));
	op_stats_start(&s);
	op_stats_start(&s);
	op_stats_end(&s, 4096, 0, 10);
	op_stats_end(&s, 4096, 5, 20);
	json_t *j = op_stats_json(&s);
	assert_int_equal(json_integer_value(json_object_get(j, "reqs")), 2);
	assert_int_equal(json_integer_value(json_object_get(j, "bytes")), 4096);
	assert_int_equal(json_integer_value(json_object_get(j, "errors")), 1);
	assert_int_equal(json_integer_value(json_object_get(j, "inflight")), 0);
	json_t *lat = json_object_get(j, "latency_us");
	assert_int_equal(json_array_size(json_object_get(lat, "buckets")), 2);
	json_decref(j);
}

/* reset keeps what is in flight: its end must not take inflight below zero */
static void
test_op_stats_reset_keeps_inflight(void **state)
{
	(void)state;
	struct op_stats s = { 0 };
	op_stats_start(&s);
	op_stats_start(&s);
	op_stats_end(&s, 4096, 0, 100);
	op_stats_reset(&s);
	assert_int_equal(s.inflight, 1);
	assert_int_equal(s.reqs + s.bytes + s.errors + s.lat.total + s.lat.sum_us + s.lat.max_us, 0);
	for (unsigned b = 0; b < HIST_BUCKETS; b++)
		assert_int_equal(s.lat.count[b], 0);
	op_stats_end(&s, 512, 0, 7);
	assert_int_equal(s.inflight, 0);
	assert_int_equal(s.reqs, 1);
	assert_int_equal(s.bytes, 512);
	assert_int_equal(hist_quantile(&s.lat, 0.99), 7);
}

static void
test_bufpool(void **state)
{
	(void)state;
	struct bufpool *p = bufpool_new(64 * 1024);
	void *a = bufpool_get(p, 1000);
	assert_non_null(a);
	assert_true(((uintptr_t)a % BUFPOOL_ALIGN) == 0);
	memset(a, 1, 4096);	/* the class is 4 KiB */
	bufpool_put(p, a, 1000);
	assert_int_equal(bufpool_cached_bytes(p), 4096);
#ifdef __SANITIZE_ADDRESS__
	/* cached: poisoned but for its list link, as if freed */
	assert_true(__asan_address_is_poisoned((char *)a + 64));
	assert_true(__asan_address_is_poisoned((char *)a + 4095));
#endif
	void *b = bufpool_get(p, 4096);
	assert_ptr_equal(a, b);	/* recycled */
#ifdef __SANITIZE_ADDRESS__
	assert_false(__asan_address_is_poisoned((char *)b + 64));
	assert_false(__asan_address_is_poisoned((char *)b + 4095));
#endif
	bufpool_put(p, b, 4096);
	void *big = bufpool_get(p, 1 << 20);
	bufpool_put(p, big, 1 << 20);	/* over the cache budget: freed */
	assert_int_equal(bufpool_cached_bytes(p), 4096);
	assert_null(bufpool_get(p, BUFPOOL_MAX_SIZE + 1));
	void *max = bufpool_get(p, BUFPOOL_MAX_SIZE);
	assert_non_null(max);
	bufpool_put(p, max, BUFPOOL_MAX_SIZE);
	assert_int_equal(bufpool_trim_idle(p), 0);	/* used since the last tick */
	assert_int_equal(bufpool_trim_idle(p), 1);
	assert_int_equal(bufpool_cached_bytes(p), 0);
	bufpool_free(p);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_buckets_are_monotonic_and_tight),
		cmocka_unit_test(test_quantiles),
		cmocka_unit_test(test_op_stats_json),
		cmocka_unit_test(test_op_stats_reset_keeps_inflight),
		cmocka_unit_test(test_bufpool),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
