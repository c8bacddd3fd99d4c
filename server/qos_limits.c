/*
 * QoS limits: their JSON names and checks, and the token buckets.
 *
 * Each limited dimension has a sustained bucket that fills at the limit and
 * holds a tenth of a second of it (so timer lateness loses no tokens) plus,
 * with a burst, (burst - limit) * burst length: at the burst rate that store
 * lasts exactly the burst length. A second, peak bucket caps the rate during
 * the burst. A request may go when every bucket it draws on holds its cost
 * (or the bucket's whole capacity, for requests larger than that); buckets go
 * into debt for the rest, so big requests are neither starved nor free.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "qos_limits.h"

static const char *const dim_names[QOS_NDIM] = {
	"iops_total", "iops_read", "iops_write", "bps_total", "bps_read", "bps_write",
};

static int
dim_is_bytes(int d)
{
	return d >= QOS_BPS_TOTAL;
}

/* Does dimension d apply to a read (is_write 0) or write? */
static int
dim_applies(int d, int is_write)
{
	if (d == QOS_IOPS_TOTAL || d == QOS_BPS_TOTAL)
		return 1;
	return (d == QOS_IOPS_WRITE || d == QOS_BPS_WRITE) == !!is_write;
}

int
qos_config_active(const struct qos_config *c)
{
	for (int d = 0; d < QOS_NDIM; d++)
		if (c->lim[d].rate)
			return 1;
	return 0;
}

double
qos_ops(const struct qos_config *c, uint64_t bytes)
{
	if (!c->iops_size || bytes <= c->iops_size)
		return 1.0;
	return (double)bytes / (double)c->iops_size;
}

/* The field of c named key, or NULL. */
static uint64_t *
config_field(struct qos_config *c, const char *key)
{
	char name[48];

	if (!strcmp(key, "iops_size"))
		return &c->iops_size;
	for (int d = 0; d < QOS_NDIM; d++) {
		if (!strcmp(key, dim_names[d]))
			return &c->lim[d].rate;
		snprintf(name, sizeof(name), "%s_max", dim_names[d]);
		if (!strcmp(key, name))
			return &c->lim[d].burst;
		snprintf(name, sizeof(name), "%s_max_length", dim_names[d]);
		if (!strcmp(key, name))
			return &c->lim[d].burst_secs;
	}
	return NULL;
}

static int
listed(const char *key, const char *const *names)
{
	for (; names && *names; names++)
		if (!strcmp(key, *names))
			return 1;
	return 0;
}

/* Limits that are each fine may still disagree: a burst below its limit. */
static int
config_check(const struct qos_config *c, char *err, size_t errlen)
{
	for (int d = 0; d < QOS_NDIM; d++) {
		const struct qos_limit *l = &c->lim[d];
		if (l->burst && !l->rate) {
			snprintf(err, errlen, "%s_max needs %s to be set too", dim_names[d],
				 dim_names[d]);
			return -EINVAL;
		}
		if (l->burst && l->burst < l->rate) {
			snprintf(err, errlen, "%s_max (%ju) is below %s (%ju)", dim_names[d],
				 (uintmax_t)l->burst, dim_names[d], (uintmax_t)l->rate);
			return -EINVAL;
		}
		if (l->burst_secs > QOS_MAX_BURST_SECS) {
			snprintf(err, errlen, "%s_max_length: at most %d seconds", dim_names[d],
				 QOS_MAX_BURST_SECS);
			return -EINVAL;
		}
	}
	if (c->iops_size > (1u << 30)) {
		snprintf(err, errlen, "iops_size: at most 1073741824 bytes");
		return -EINVAL;
	}
	return 0;
}

int
qos_config_update(struct qos_config *c, json_t *obj, const char *const *also_allowed,
		  char *err, size_t errlen)
{
	struct qos_config next = *c;
	const char *key;
	json_t *v;

	if (!json_is_object(obj)) {
		snprintf(err, errlen, "QoS limits must be an object of name: number");
		return -EINVAL;
	}
	json_object_foreach(obj, key, v) {
		uint64_t *field = config_field(&next, key);
		if (!field) {
			if (listed(key, also_allowed))
				continue;
			snprintf(err, errlen, "%s: no such QoS limit", key);
			return -EINVAL;
		}
		if (!json_is_integer(v) || json_integer_value(v) < 0 ||
		    (uint64_t)json_integer_value(v) > QOS_MAX_RATE) {
			snprintf(err, errlen, "%s: must be an integer from 0 to %llu (0: unlimited)",
				 key, (unsigned long long)QOS_MAX_RATE);
			return -EINVAL;
		}
		*field = (uint64_t)json_integer_value(v);
	}
	int rc = config_check(&next, err, errlen);
	if (rc < 0)
		return rc;
	*c = next;
	return 0;
}

json_t *
qos_config_json(const struct qos_config *c)
{
	json_t *o = json_object();
	char name[48];

	for (int d = 0; d < QOS_NDIM; d++) {
		const struct qos_limit *l = &c->lim[d];
		json_object_set_new(o, dim_names[d], json_integer((json_int_t)l->rate));
		snprintf(name, sizeof(name), "%s_max", dim_names[d]);
		json_object_set_new(o, name, json_integer((json_int_t)l->burst));
		snprintf(name, sizeof(name), "%s_max_length", dim_names[d]);
		json_object_set_new(o, name, json_integer((json_int_t)l->burst_secs));
	}
	json_object_set_new(o, "iops_size", json_integer((json_int_t)c->iops_size));
	return o;
}

/* ---- buckets ---- */

static void
bucket_set(struct qos_bucket *b, double rate, double cap)
{
	int fresh = b->rate == 0;
	b->rate = rate;
	b->cap = cap;
	if (fresh || b->level > cap)
		b->level = cap;
	if (rate == 0)
		b->level = 0;
}

void
qos_buckets_configure(struct qos_buckets *bk, const struct qos_config *c, uint64_t now_ns)
{
	bk->active = 0;
	for (int d = 0; d < QOS_NDIM; d++) {
		const struct qos_limit *l = &c->lim[d];
		double r = (double)l->rate, window = r * QOS_WINDOW_SECS;
		double secs = l->burst_secs ? (double)l->burst_secs : 1.0;

		if (!l->rate) {
			bucket_set(&bk->b[d][0], 0, 0);
			bucket_set(&bk->b[d][1], 0, 0);
			continue;
		}
		bk->active = 1;
		if (l->burst > l->rate) {
			bucket_set(&bk->b[d][0], r, window + ((double)l->burst - r) * secs);
			bucket_set(&bk->b[d][1], (double)l->burst, (double)l->burst * QOS_WINDOW_SECS);
		} else {
			bucket_set(&bk->b[d][0], r, window);
			bucket_set(&bk->b[d][1], 0, 0);
		}
	}
	bk->last_ns = now_ns;
}

static void
buckets_refill(struct qos_buckets *bk, uint64_t now_ns)
{
	if (now_ns <= bk->last_ns)
		return;
	double dt = (double)(now_ns - bk->last_ns) / 1e9;
	for (int d = 0; d < QOS_NDIM; d++) {
		for (int k = 0; k < 2; k++) {
			struct qos_bucket *b = &bk->b[d][k];
			if (b->rate)
				b->level = fmin(b->cap, b->level + b->rate * dt);
		}
	}
	bk->last_ns = now_ns;
}

static double
dim_amount(const struct qos_config *c, int d, const struct qos_cost *cost)
{
	return dim_is_bytes(d) ? (double)cost->bytes : qos_ops(c, cost->bytes);
}

uint64_t
qos_buckets_wait(struct qos_buckets *bk, const struct qos_config *c,
		 const struct qos_cost *cost, uint64_t now_ns)
{
	double wait = 0;

	if (!bk->active)
		return 0;
	buckets_refill(bk, now_ns);
	for (int d = 0; d < QOS_NDIM; d++) {
		if (!dim_applies(d, cost->is_write))
			continue;
		double amount = dim_amount(c, d, cost);
		for (int k = 0; k < 2; k++) {
			const struct qos_bucket *b = &bk->b[d][k];
			if (!b->rate)
				continue;
			double need = fmin(amount, b->cap);
			if (b->level < need)
				wait = fmax(wait, (need - b->level) / b->rate);
		}
	}
	if (wait <= 0)
		return 0;
	return (uint64_t)ceil(wait * 1e9) + 1;
}

void
qos_buckets_charge(struct qos_buckets *bk, const struct qos_config *c,
		   const struct qos_cost *cost)
{
	if (!bk->active)
		return;
	for (int d = 0; d < QOS_NDIM; d++) {
		if (!dim_applies(d, cost->is_write))
			continue;
		double amount = dim_amount(c, d, cost);
		for (int k = 0; k < 2; k++)
			if (bk->b[d][k].rate)
				bk->b[d][k].level -= amount;
	}
}
