/*
 * QoS limits (server/qos_limits.c): the JSON names and checks, and the
 * token buckets driven by a made-up clock: sustained rates, bursts that
 * last their length, iops_size, debt for large requests, runtime changes.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "qos_limits.h"

#define SEC 1000000000ULL

static int
update(struct qos_config *c, const char *json, char *err, size_t len)
{
	json_t *o = json_loads(json, 0, NULL);
	assert_non_null(o);
	int rc = qos_config_update(c, o, NULL, err, len);
	json_decref(o);
	return rc;
}

/* Requests of `bytes` admitted in [0, secs) when sent as fast as allowed. */
static unsigned
admitted(const char *json, int is_write, uint64_t bytes, double secs)
{
	struct qos_config c;
	struct qos_buckets bk;
	struct qos_cost cost = { is_write, bytes };
	char err[128];
	uint64_t now = 1000 * SEC, end = now + (uint64_t)(secs * SEC);
	unsigned n = 0;

	memset(&c, 0, sizeof(c));
	memset(&bk, 0, sizeof(bk));
	assert_int_equal(update(&c, json, err, sizeof(err)), 0);
	qos_buckets_configure(&bk, &c, now);
	while (now < end) {
		uint64_t wait = qos_buckets_wait(&bk, &c, &cost, now);
		if (wait) {
			now += wait;
			continue;
		}
		qos_buckets_charge(&bk, &c, &cost);
		n++;
		now += 1000;	/* a client that sends at most 1M requests/s */
	}
	return n;
}

static void
test_iops_rate_holds(void **state)
{
	(void)state;
	/* 10 s at 500/s, plus the 0.1 s the bucket starts with */
	unsigned n = admitted("{\"iops_total\": 500}", 0, 4096, 10);
	assert_in_range(n, 5000, 5051);
	/* read and write limits only bind their own direction */
	assert_int_equal(admitted("{\"iops_write\": 100}", 0, 4096, 1), 1000000);
	assert_in_range(admitted("{\"iops_write\": 100}", 1, 4096, 10), 1000, 1011);
}

static void
test_bps_rate_and_big_requests(void **state)
{
	(void)state;
	/* 1 MiB/s with 4 MiB requests: larger than the bucket, paid as debt */
	unsigned n = admitted("{\"bps_total\": 1048576}", 1, 4 << 20, 40);
	assert_in_range(n, 10, 11);
}

static void
test_burst_lasts_its_length(void **state)
{
	(void)state;
	const char *cfg = "{\"iops_total\": 500, \"iops_total_max\": 2000, "
			  "\"iops_total_max_length\": 2}";
	/* first 2 s at 2000/s, then 500/s */
	unsigned two = admitted(cfg, 0, 4096, 2);
	assert_in_range(two, 3900, 4300);
	unsigned ten = admitted(cfg, 0, 4096, 10);
	assert_in_range(ten - two, 3900, 4100);
}

static void
test_iops_size_counts_large_requests(void **state)
{
	(void)state;
	/* 64 KiB requests count as 16 ops of 4 KiB: 1600 ops/s is 100 of them */
	unsigned n = admitted("{\"iops_total\": 1600, \"iops_size\": 4096}", 0, 65536, 10);
	assert_in_range(n, 1000, 1011);
}

static void
test_bad_values_name_the_field_and_change_nothing(void **state)
{
	(void)state;
	struct qos_config c, before;
	char err[128];

	memset(&c, 0, sizeof(c));
	assert_int_equal(update(&c, "{\"iops_total\": 500}", err, sizeof(err)), 0);
	before = c;
	static const struct {
		const char *json, *says;
	} bad[] = {
		{ "{\"iops_totl\": 1}", "iops_totl: no such QoS limit" },
		{ "{\"iops_read\": -1}", "iops_read: must be" },
		{ "{\"bps_read\": \"10M\"}", "bps_read: must be" },
		{ "{\"bps_read\": 1.5}", "bps_read: must be" },
		{ "{\"bps_write\": 1099511627777}", "bps_write: must be" },
		{ "{\"iops_total_max\": 100}", "iops_total_max (100) is below iops_total (500)" },
		{ "{\"bps_total_max\": 100}", "bps_total_max needs bps_total" },
		{ "{\"iops_total_max_length\": 3601}", "iops_total_max_length: at most" },
		{ "{\"iops_size\": 2147483648}", "iops_size: at most" },
		{ "{\"iops_write\": 5, \"iops_size\": 2147483648}", "iops_size" },
		{ "[1]", "must be an object" },
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		err[0] = 0;
		json_t *o = json_loads(bad[i].json, JSON_DECODE_ANY, NULL);
		assert_non_null(o);
		assert_int_equal(qos_config_update(&c, o, NULL, err, sizeof(err)), -EINVAL);
		json_decref(o);
		assert_non_null(strstr(err, bad[i].says));
		assert_memory_equal(&c, &before, sizeof(c));
	}
}

static void
test_runtime_change_keeps_tokens_bounded(void **state)
{
	(void)state;
	struct qos_config c;
	struct qos_buckets bk;
	struct qos_cost cost = { 0, 4096 };
	char err[128];
	uint64_t now = SEC;

	memset(&c, 0, sizeof(c));
	memset(&bk, 0, sizeof(bk));
	assert_int_equal(update(&c, "{\"iops_total\": 10000}", err, sizeof(err)), 0);
	qos_buckets_configure(&bk, &c, now);
	/* down to 10/s: the 1000 tokens saved at 10000/s shrink to the new bucket */
	assert_int_equal(update(&c, "{\"iops_total\": 10}", err, sizeof(err)), 0);
	qos_buckets_configure(&bk, &c, now);
	unsigned n = 0;
	while (!qos_buckets_wait(&bk, &c, &cost, now)) {
		qos_buckets_charge(&bk, &c, &cost);
		n++;
	}
	assert_in_range(n, 1, 2);
	/* to unlimited: everything goes */
	assert_int_equal(update(&c, "{\"iops_total\": 0}", err, sizeof(err)), 0);
	qos_buckets_configure(&bk, &c, now);
	assert_int_equal(qos_config_active(&c), 0);
	assert_int_equal(qos_buckets_wait(&bk, &c, &cost, now), 0);
}

static void
test_json_round_trip(void **state)
{
	(void)state;
	struct qos_config c, d;
	char err[128];

	memset(&c, 0, sizeof(c));
	memset(&d, 0, sizeof(d));
	assert_int_equal(update(&c, "{\"bps_write\": 20971520, \"bps_write_max\": 41943040, "
				"\"bps_write_max_length\": 5, \"iops_size\": 8192}",
				err, sizeof(err)), 0);
	json_t *o = qos_config_json(&c);
	assert_int_equal(json_object_size(o), 19);
	assert_int_equal(qos_config_update(&d, o, NULL, err, sizeof(err)), 0);
	json_decref(o);
	assert_memory_equal(&c, &d, sizeof(c));
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_iops_rate_holds),
		cmocka_unit_test(test_bps_rate_and_big_requests),
		cmocka_unit_test(test_burst_lasts_its_length),
		cmocka_unit_test(test_iops_size_counts_large_requests),
		cmocka_unit_test(test_bad_values_name_the_field_and_change_nothing),
		cmocka_unit_test(test_runtime_change_keeps_tokens_bounded),
		cmocka_unit_test(test_json_round_trip),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
