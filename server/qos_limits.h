/*
 * QoS limits and the token buckets that enforce them: the configuration a
 * vbd or a group carries (parsed from and printed as JSON), and the pure
 * arithmetic of admitting a request at a given time. No events here: the
 * schedulers in qos.c ask "may this go now, or how long until it may".
 */
#ifndef TD_QOS_LIMITS_H
#define TD_QOS_LIMITS_H

#include <stdint.h>

#include <jansson.h>

enum qos_dim {
	QOS_IOPS_TOTAL, QOS_IOPS_READ, QOS_IOPS_WRITE,
	QOS_BPS_TOTAL, QOS_BPS_READ, QOS_BPS_WRITE,
	QOS_NDIM
};

/* One limit: rate per second; optional burst rate for burst_secs seconds. 0 = none. */
struct qos_limit {
	uint64_t rate, burst, burst_secs;
};

struct qos_config {
	struct qos_limit lim[QOS_NDIM];
	uint64_t iops_size;	/* bytes per counted op; 0: every request is one op */
};

#define QOS_MAX_RATE		(1ULL << 40)	/* 1 TiB/s, 10^12 IOPS: "unlimited" is 0 */
#define QOS_MAX_BURST_SECS	3600
#define QOS_MAX_WEIGHT		1000
#define QOS_MAX_GROUP_NAME	64

/* The sustained bucket of a dimension without burst holds this many seconds of rate. */
#define QOS_WINDOW_SECS 0.1

struct qos_bucket {
	double level, cap, rate;
};

/* Sustained and peak bucket per dimension (peak unused without burst). */
struct qos_buckets {
	struct qos_bucket b[QOS_NDIM][2];
	uint64_t last_ns;
	int active;		/* any limit set */
};

/* What a request costs: is it a read or a write, and how many bytes move. */
struct qos_cost {
	int is_write;
	uint64_t bytes;
};

int qos_config_active(const struct qos_config *c);

/*
 * Applies the members of obj (iops_total=..., iops_total_max=...,
 * iops_total_max_length=..., iops_size) over *c. Unknown keys, other
 * members (group, weight: the caller's) excepted, and bad values are
 * refused with a sentence naming the field; *c is untouched then.
 */
int qos_config_update(struct qos_config *c, json_t *obj, const char *const *also_allowed,
		      char *err, size_t errlen);
json_t *qos_config_json(const struct qos_config *c);

/* Sets rates and capacities from c, keeping levels (clamped); new buckets start full. */
void qos_buckets_configure(struct qos_buckets *bk, const struct qos_config *c, uint64_t now_ns);
/* 0 if the request may go now, else nanoseconds until it may. */
uint64_t qos_buckets_wait(struct qos_buckets *bk, const struct qos_config *c,
			  const struct qos_cost *cost, uint64_t now_ns);
void qos_buckets_charge(struct qos_buckets *bk, const struct qos_config *c,
			const struct qos_cost *cost);

/* The request's cost in ops under c's iops_size. */
double qos_ops(const struct qos_config *c, uint64_t bytes);

#endif
