/* Per-vbd counters and log-linear latency histograms. */
#ifndef TD_STATS_H
#define TD_STATS_H

#include <stdint.h>

#include <jansson.h>

/*
 * Buckets: 4 linear steps per power of two, from 1 us to 2^26 us (67 s);
 * the last bucket takes everything slower.
 */
#define HIST_SUB 4
#define HIST_MAX_EXP 26
#define HIST_BUCKETS (HIST_SUB + (HIST_MAX_EXP - 1) * HIST_SUB + 1)

struct latency_hist {
	uint64_t count[HIST_BUCKETS];
	uint64_t total, sum_us, max_us;
};

struct op_stats {
	uint64_t reqs, bytes, errors, inflight;
	struct latency_hist lat;
};

unsigned hist_bucket(uint64_t us);
uint64_t hist_bucket_upper(unsigned b);	/* largest value (us) in bucket b */
void hist_add(struct latency_hist *h, uint64_t us);
/* Latency (us) at quantile q in [0,1]: upper bound of its bucket, capped at max. */
uint64_t hist_quantile(const struct latency_hist *h, double q);

void op_stats_start(struct op_stats *s);
void op_stats_end(struct op_stats *s, uint64_t bytes, int err, uint64_t us);
/* Zeroes the counters and the histogram; inflight, a gauge, stays. */
void op_stats_reset(struct op_stats *s);
json_t *op_stats_json(const struct op_stats *s);

uint64_t now_ns(void);

#endif
