/* The Prometheus text made from a stats document: qos, escaping, histogram buckets. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <event2/buffer.h>
#include <jansson.h>

#include "metrics_http.h"

static const char *doc_text =
	"{\"vbds\": ["
	" {\"name\": \"ram:a\\\"b\\\\c\\nd:8M\", \"minor\": 0, \"reqs_outstanding\": 1,"
	"  \"reqs_queued\": 0,"
	"  \"ops\": {\"read\": {\"reqs\": 4, \"bytes\": 4096, \"errors\": 0, \"inflight\": 1,"
	"   \"latency_us\": {\"count\": 4, \"sum\": 70001234, \"buckets\": ["
	"    {\"le_us\": 3, \"count\": 2}, {\"le_us\": 1023, \"count\": 1},"
	"    {\"le_us\": \"+Inf\", \"count\": 1}]}}},"
	"  \"qos\": {\"throttled\": 5, \"queued_us_total\": 1200, \"queued_us_max\": 300,"
	"   \"queue_depth\": 2, \"ratio\": 0.5, \"group\": \"gold\", \"bad-key\": 1,"
	"   \"limits\": {\"iops\": 100}}},"
	" {\"name\": \"ram:8M\", \"minor\": 1, \"reqs_outstanding\": 0, \"reqs_queued\": 3,"
	"  \"ops\": {}}"
	"]}";

/* The text for a document, NUL-terminated; the caller frees it. */
static char *
render(const char *text)
{
	json_t *doc = json_loads(text, 0, NULL);
	struct evbuffer *out = evbuffer_new();
	char *s;

	assert_non_null(doc);
	assert_int_equal(metrics_prometheus(doc, out), 0);
	evbuffer_add(out, "", 1);
	s = strdup((char *)evbuffer_pullup(out, -1));
	evbuffer_free(out);
	json_decref(doc);
	return s;
}

#define V0 "{minor=\"0\",params=\"ram:a\\\"b\\\\c\\nd:8M\""

static void
test_qos_members_become_families(void **state)
{
	char *s = render(doc_text);
	(void)state;

	assert_non_null(strstr(s, "# TYPE tapdiskd_qos_throttled_total counter\n"));
	assert_non_null(strstr(s, "\ntapdiskd_qos_throttled_total" V0 "} 5\n"));
	assert_non_null(strstr(s, "# TYPE tapdiskd_qos_queued_us_total counter\n"));
	assert_non_null(strstr(s, "\ntapdiskd_qos_queued_us_total" V0 "} 1200\n"));
	assert_non_null(strstr(s, "# TYPE tapdiskd_qos_queued_us_max gauge\n"));
	assert_non_null(strstr(s, "# TYPE tapdiskd_qos_queue_depth gauge\n"));
	assert_non_null(strstr(s, "\ntapdiskd_qos_queue_depth" V0 "} 2\n"));
	assert_non_null(strstr(s, "\ntapdiskd_qos_ratio" V0 "} 0.5\n"));
	/* strings, objects and keys that are no metric name are left out */
	assert_null(strstr(s, "group"));
	assert_null(strstr(s, "bad"));
	assert_null(strstr(s, "limits"));
	assert_null(strstr(s, "iops"));
	/* a vbd without qos has no qos series */
	assert_null(strstr(s, "tapdiskd_qos_throttled_total{minor=\"1\""));
	free(s);
}

static void
test_no_qos_no_families(void **state)
{
	char *s = render("{\"vbds\": [{\"name\": \"ram:8M\", \"minor\": 3, \"ops\": {},"
			 " \"reqs_outstanding\": 0, \"reqs_queued\": 0}]}");
	(void)state;

	assert_null(strstr(s, "qos"));
	assert_non_null(strstr(s, "\ntapdiskd_reqs_queued{minor=\"3\",params=\"ram:8M\"} 0\n"));
	free(s);
}

static void
test_per_vbd_gauges(void **state)
{
	char *s = render(doc_text);
	(void)state;

	assert_non_null(strstr(s, "\ntapdiskd_reqs_outstanding" V0 "} 1\n"));
	assert_non_null(strstr(s, "\ntapdiskd_reqs_queued{minor=\"1\",params=\"ram:8M\"} 3\n"));
	assert_non_null(strstr(s, "\ntapdiskd_inflight" V0 ",op=\"read\"} 1\n"));
	free(s);
}

static void
test_histogram_buckets(void **state)
{
	char *s = render(doc_text);
	(void)state;

#define B(le, n) "\ntapdiskd_latency_seconds_bucket" V0 ",op=\"read\",le=\"" le "\"} " #n "\n"
	/* le_us 3 holds times below 4 us; le_us 1023 below 1024 us */
	assert_non_null(strstr(s, B("0.000002", 0)));
	assert_non_null(strstr(s, B("0.000004", 2)));
	assert_non_null(strstr(s, B("0.000512", 2)));
	assert_non_null(strstr(s, B("0.001024", 3)));
	assert_non_null(strstr(s, B("134.217728", 3)));
	assert_non_null(strstr(s, B("+Inf", 4)));
#undef B
	assert_non_null(strstr(s, "\ntapdiskd_latency_seconds_sum" V0 ",op=\"read\"} 70.001234\n"));
	assert_non_null(strstr(s, "\ntapdiskd_latency_seconds_count" V0 ",op=\"read\"} 4\n"));
	assert_non_null(strstr(s, "# TYPE tapdiskd_latency_seconds histogram\n"));
	free(s);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_qos_members_become_families),
		cmocka_unit_test(test_no_qos_no_families),
		cmocka_unit_test(test_per_vbd_gauges),
		cmocka_unit_test(test_histogram_buckets),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
