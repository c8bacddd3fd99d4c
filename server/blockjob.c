/*
 * What every block job shares: state, progress, rate, speed limit, JSON
 * (blockjob.h). The copies themselves are the kinds' (mirror.c).
 */
#include "blockjob.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "log.h"
#include "stats.h"
#include "vbd.h"

#define SEC_NS 1000000000ULL
/* the bucket holds at most this long's worth of tokens: bursts stay short */
#define BURST_NS (SEC_NS / 10)

void
blockjob_init(struct blockjob *job, const struct blockjob_ops *ops, const char *type,
	      struct vbd *vbd, uint64_t speed)
{
	job->ops = ops;
	job->type = type;
	job->vbd = vbd;
	job->state = BJ_RUNNING;
	job->speed = speed;
	job->started_ns = job->sample_ns = job->tokens_ns = now_ns();
}

const char *
blockjob_state_name(enum blockjob_state st)
{
	static const char *const names[] = { "running", "ready", "failed", "cancelled", "done" };
	return names[st];
}

int
blockjob_busy(const struct blockjob *job)
{
	return job && (job->state == BJ_RUNNING || job->state == BJ_READY);
}

int
blockjob_active(const struct blockjob *job)
{
	return blockjob_busy(job) && !job->stopping;
}

uint64_t
blockjob_throttle(struct blockjob *job, uint64_t len)
{
	if (!job->speed)
		return 0;
	uint64_t now = now_ns();
	double cap = (double)job->speed * BURST_NS / SEC_NS;

	/* at least one chunk fits in the bucket, however low the speed */
	if (cap < (double)len)
		cap = (double)len;
	job->tokens += (double)(now - job->tokens_ns) * (double)job->speed / SEC_NS;
	if (job->tokens > cap)
		job->tokens = cap;
	job->tokens_ns = now;
	if (job->tokens >= (double)len) {
		job->tokens -= (double)len;
		return 0;
	}
	return (uint64_t)(((double)len - job->tokens) * SEC_NS / (double)job->speed) + 1;
}

static void
rate_sample(struct blockjob *job, uint64_t now)
{
	if (now - job->sample_ns < SEC_NS)
		return;
	job->rate = (double)(job->bytes_done - job->sample_bytes) * SEC_NS /
		    (double)(now - job->sample_ns);
	job->sample_ns = now;
	job->sample_bytes = job->bytes_done;
}

void
blockjob_progress(struct blockjob *job, uint64_t len)
{
	job->bytes_done += len;
	rate_sample(job, now_ns());
}

void
blockjob_fail(struct blockjob *job, const char *fmt, ...)
{
	if (!job->error[0]) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(job->error, sizeof(job->error), fmt, ap);
		va_end(ap);
		log_warn("minor %d: %s job failed: %s", job->vbd->minor, job->type,
			 job->error);
	}
	if (!job->stopping)
		job->ops->cancel(job);
}

void
blockjob_cancel(struct blockjob *job, void (*done)(void *arg, int err, const char *msg),
		void *arg)
{
	if (!blockjob_busy(job)) {
		done(arg, EINVAL, job ? "the job has already ended" : "no job is running");
		return;
	}
	if (job->stop_fn) {
		done(arg, EALREADY, "the job is already being cancelled");
		return;
	}
	job->stop_fn = done;
	job->stop_arg = arg;
	if (!job->stopping)
		job->ops->cancel(job);
}

void
blockjob_stopped(struct blockjob *job)
{
	void (*fn)(void *, int, const char *) = job->stop_fn;

	job->rate = 0;
	job->stop_fn = NULL;
	if (fn)
		fn(job->stop_arg, 0, NULL);
	log_info("minor %d: %s job %s", job->vbd->minor, job->type,
		 blockjob_state_name(job->state));
	vbd_job_stopped(job->vbd);
}

/* The last second's rate; before a first second has passed, the average so far. */
static double
blockjob_rate(const struct blockjob *job)
{
	uint64_t now = now_ns();

	if (job->sample_ns == job->started_ns && now > job->started_ns)
		return (double)job->bytes_done * SEC_NS / (double)(now - job->started_ns);
	return job->rate;
}

json_t *
blockjob_json(const struct blockjob *job)
{
	json_t *doc = json_pack("{s:i, s:s, s:s, s:I, s:I, s:I, s:I, s:f}",
				"minor", job->vbd->minor, "type", job->type,
				"state", blockjob_state_name(job->state),
				"bytes_done", (json_int_t)job->bytes_done,
				"bytes_total", (json_int_t)job->bytes_total,
				"speed", (json_int_t)job->speed,
				"elapsed_ms", (json_int_t)((now_ns() - job->started_ns) / 1000000),
				"rate", blockjob_busy(job) ? blockjob_rate(job) : 0.0);
	if (!doc)
		return NULL;
	if (job->error[0])
		json_object_set_new(doc, "error", json_string(job->error));
	if (job->ops->describe)
		job->ops->describe(job, doc);
	return doc;
}

void
blockjob_free(struct blockjob *job)
{
	if (job)
		job->ops->free(job);
}
