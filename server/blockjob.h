/*
 * Block jobs: long copies a vbd runs beside its guest's I/O (mirror; the
 * kinds are in their own files), one per vbd at a time, on the vbd's loop,
 * in bounded chunks so guest requests keep flowing between them. This file
 * owns what every kind shares: the state, the progress and rate, the speed
 * limit and the JSON that job-list and stats show.
 *
 * Threading: everything on the vbd's loop. Ownership: the vbd holds its job
 * (vbd->job) from the start until the next job starts or the vbd is freed;
 * a finished job keeps only its summary, so `tap-ctl jobs` shows how the
 * last one ended.
 */
#ifndef TD_BLOCKJOB_H
#define TD_BLOCKJOB_H

#include <stdint.h>

#include <jansson.h>

struct vbd;
struct vbd_request;
struct blockjob;

enum blockjob_state {
	BJ_RUNNING,	/* copying */
	BJ_READY,	/* converged: a mirror may pivot */
	BJ_FAILED,
	BJ_CANCELLED,
	BJ_DONE,
};

struct blockjob_ops {
	/*
	 * Stop: no new copies; the job calls blockjob_stopped once its I/O is
	 * back and its resources are released. Also how a vbd's close ends it.
	 */
	void (*cancel)(struct blockjob *job);
	/*
	 * Optional, for kinds that see guest writes: called before vr goes down
	 * the chain (the job active); 1 if the job keeps it for now and sends
	 * it on later with vbd_request_send. It sets vr->job_write if it wants
	 * guest_write_done: vr's chain I/O is back with err; 1 if vr must
	 * still wait (the job ends it with vbd_request_end).
	 */
	int (*guest_write)(struct blockjob *job, struct vbd_request *vr);
	int (*guest_write_done)(struct blockjob *job, struct vbd_request *vr, int err);
	/* Optional: the kind's own fields for job-list and stats. */
	void (*describe)(const struct blockjob *job, json_t *doc);
	/* Frees the kind's struct (the job has stopped). */
	void (*free)(struct blockjob *job);
};

struct blockjob {
	const struct blockjob_ops *ops;
	const char *type;	/* "mirror", "stream", "commit": a static string */
	struct vbd *vbd;
	enum blockjob_state state;
	int stopping;		/* cancel or failure in progress: state says which when done */
	uint64_t bytes_done, bytes_total;
	uint64_t speed;		/* bytes/s of data copied; 0: no limit */
	char error[512];	/* why it failed */
	/* one control command waiting for the job to stop (job-cancel) */
	void (*stop_fn)(void *arg, int err, const char *msg);
	void *stop_arg;

	uint64_t started_ns;
	/* the rate: bytes done since the last sample, a second or more apart */
	uint64_t sample_ns, sample_bytes;
	double rate;
	/* the speed limit: a token bucket of data bytes */
	uint64_t tokens_ns;
	double tokens;
};

/* Sets up the shared part; the kind's struct embeds it. */
void blockjob_init(struct blockjob *job, const struct blockjob_ops *ops, const char *type,
		   struct vbd *vbd, uint64_t speed);
const char *blockjob_state_name(enum blockjob_state st);
/* Running or ready, or still stopping: the vbd must wait for it. */
int blockjob_busy(const struct blockjob *job);
/* Running or ready and not stopping: guest writes go through it. */
int blockjob_active(const struct blockjob *job);
/*
 * The speed limit: 0 if len data bytes may be copied now (and takes them),
 * else the nanoseconds to wait before asking again.
 */
uint64_t blockjob_throttle(struct blockjob *job, uint64_t len);
/* Progress: len more bytes handled. */
void blockjob_progress(struct blockjob *job, uint64_t len);
/* Fails the job with a sentence (the first failure wins) and stops it. */
void blockjob_fail(struct blockjob *job, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
/*
 * Cancels a running or ready job; done(arg, 0, NULL) once it has stopped
 * (its destination closed), or at once with an error if it is not running.
 */
void blockjob_cancel(struct blockjob *job, void (*done)(void *arg, int err, const char *msg),
		     void *arg);
/* The kind's part: its I/O is back and released; state is final. Tells the vbd. */
void blockjob_stopped(struct blockjob *job);
/* {type, state, bytes_done, bytes_total, rate, speed, error?, ...}: new reference. */
json_t *blockjob_json(const struct blockjob *job);
/* Frees a job that has stopped (blockjob_busy false). NULL is fine. */
void blockjob_free(struct blockjob *job);

#endif
