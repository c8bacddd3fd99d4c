/* Counters and latency histograms, and their JSON form for `stats`. */
#include "stats.h"

#include <string.h>
#include <time.h>

uint64_t
now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static unsigned
log2_floor(uint64_t v)
{
	return 63u - (unsigned)__builtin_clzll(v);
}

unsigned
hist_bucket(uint64_t us)
{
	if (us < HIST_SUB)
		return (unsigned)us;
	unsigned e = log2_floor(us);	/* >= 2 */
	if (e >= HIST_MAX_EXP + 1)
		return HIST_BUCKETS - 1;
	unsigned sub = (unsigned)(us >> (e - 2)) & (HIST_SUB - 1);
	unsigned b = HIST_SUB + (e - 2) * HIST_SUB + sub;
	return b < HIST_BUCKETS - 1 ? b : HIST_BUCKETS - 1;
}

uint64_t
hist_bucket_upper(unsigned b)
{
	if (b < HIST_SUB)
		return b;
	if (b >= HIST_BUCKETS - 1)
		return UINT64_MAX;
	unsigned e = (b - HIST_SUB) / HIST_SUB + 2;
	unsigned sub = (b - HIST_SUB) % HIST_SUB;
	uint64_t step = (uint64_t)1 << (e - 2);
	return ((uint64_t)1 << e) + (sub + 1) * step - 1;
}

void
hist_add(struct latency_hist *h, uint64_t us)
{
	h->count[hist_bucket(us)]++;
	h->total++;
	h->sum_us += us;
	if (us > h->max_us)
		h->max_us = us;
}

uint64_t
hist_quantile(const struct latency_hist *h, double q)
{
	if (!h->total)
		return 0;
	uint64_t rank = (uint64_t)(q * (double)h->total + 0.5);
	if (rank < 1)
		rank = 1;
	uint64_t seen = 0;
	for (unsigned b = 0; b < HIST_BUCKETS; b++) {
		seen += h->count[b];
		if (seen >= rank) {
			uint64_t up = hist_bucket_upper(b);
			return up < h->max_us ? up : h->max_us;
		}
	}
	return h->max_us;
}

void
op_stats_start(struct op_stats *s)
{
	s->inflight++;
}

void
op_stats_end(struct op_stats *s, uint64_t bytes, int err, uint64_t us)
{
	s->inflight--;
	s->reqs++;
	if (err)
		s->errors++;
	else
		s->bytes += bytes;
	hist_add(&s->lat, us);
}

void
op_stats_reset(struct op_stats *s)
{
	uint64_t inflight = s->inflight;

	memset(s, 0, sizeof(*s));
	s->inflight = inflight;
}

json_t *
op_stats_json(const struct op_stats *s)
{
	const struct latency_hist *h = &s->lat;
	json_t *buckets = json_array();

	for (unsigned b = 0; b < HIST_BUCKETS; b++) {
		if (!h->count[b])
			continue;
		json_t *le = b == HIST_BUCKETS - 1 ? json_string("+Inf")
						   : json_integer((json_int_t)hist_bucket_upper(b));
		json_array_append_new(buckets, json_pack("{s:o, s:I}", "le_us", le,
							 "count", (json_int_t)h->count[b]));
	}
	return json_pack("{s:I, s:I, s:I, s:I, s:{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:o}}",
			 "reqs", (json_int_t)s->reqs,
			 "bytes", (json_int_t)s->bytes,
			 "errors", (json_int_t)s->errors,
			 "inflight", (json_int_t)s->inflight,
			 "latency_us",
			 "count", (json_int_t)h->total,
			 "sum", (json_int_t)h->sum_us,
			 "p50", (json_int_t)hist_quantile(h, 0.50),
			 "p90", (json_int_t)hist_quantile(h, 0.90),
			 "p99", (json_int_t)hist_quantile(h, 0.99),
			 "p99_9", (json_int_t)hist_quantile(h, 0.999),
			 "max", (json_int_t)h->max_us,
			 "buckets", buckets);
}
