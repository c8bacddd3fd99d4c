/*
 * A vbd: one virtual disk, its image chain, its request queue, its state
 * (open, paused, closing) and its statistics. Frontends (NBD connections,
 * blkif rings) submit vbd_requests; the vbd queues them while paused and
 * passes them down the chain otherwise.
 */
#ifndef TD_VBD_H
#define TD_VBD_H

#include <stdint.h>
#include <sys/queue.h>
#include <time.h>

#include "driver.h"
#include "stats.h"

struct server;
struct vbd;
struct qos_vbd;
struct event;
struct blockjob;

/* State bits, tapdisk's values (tap-ctl list prints them). */
#define VBD_DEAD		0x0001	/* force-closed, draining its last I/O */
#define VBD_CLOSED		0x0002
#define VBD_PAUSE_REQUESTED	0x0010
#define VBD_PAUSED		0x0020
#define VBD_SHUTDOWN_REQUESTED	0x0040
#define VBD_OPENING		0x1000	/* ours: chain being opened */
#define VBD_QUIESCED		0x4000	/* ours: new requests wait (a block job's pivot) */

/*
 * A request that fails with EAGAIN, EBUSY or EINTR is sent down the chain
 * again after 1 ms, 2 ms, ... at most 1 s apart; one that has not completed
 * within the vbd's timeout (tap-ctl open -t, retries included) is failed
 * with EIO, even with its I/O still in the kernel (the storage hangs).
 */
#define VBD_DEFAULT_TIMEOUT	120	/* seconds: tapdisk's */
#define VBD_MAX_TIMEOUT		86400

struct vbd_request {
	struct td_request td;
	struct vbd *vbd;
	/* the frontend's: called once, on the loop, when the request ends */
	void (*complete)(struct vbd_request *vr, int err);
	/*
	 * Optional, the frontend's: the request timed out with its I/O still
	 * out. Answer the client err now, but keep vr and the buffers its iov
	 * points at: complete still comes, once the I/O is back, and must not
	 * answer again. Without it the client waits for that.
	 */
	void (*timed_out)(struct vbd_request *vr, int err);
	const void *flow;	/* its QoS fair-queueing key: the NBD connection or blkif ring */
	uint64_t start_ns;	/* first sent down the chain: latency and timeout count from here */
	uint64_t retry_at_ns;	/* waiting to be sent again (vbd->retry), or 0 */
	unsigned retries;	/* sent again so far; each waits twice as long */
	int late;		/* timed out: its client has EIO, its I/O is still out */
	int err;
	TAILQ_ENTRY(vbd_request) link;
	TAILQ_ENTRY(vbd_request) retry_link;
	TAILQ_ENTRY(vbd_request) cbt_link;	/* waiting for its bits in the CBT log */
	uint64_t cbt_need;	/* the log write (cbt.h) that makes them durable */
	void *job_write;	/* the block job's record of this guest write, or NULL */
	TAILQ_ENTRY(vbd_request) job_link;	/* waiting for the block job */
	struct io_defer defer;
	size_t alloc_size;	/* the frontend's struct and the scratch after it */
};

struct freelist;
/*
 * A frontend's request from fl: head bytes (the frontend's struct, which
 * starts with its vbd_request), then the scratch vbd's drivers take their
 * per-request state from (none if vbd is NULL). Zeroed; NULL if out of
 * memory. vbd_request_put gives it back to fl.
 */
struct vbd_request *vbd_request_get(const struct vbd *vbd, struct freelist *fl, size_t head);
void vbd_request_put(struct freelist *fl, struct vbd_request *vr);

/* Something a vbd is served through; told when the vbd goes away. */
struct vbd_frontend;
struct vbd_frontend_ops {
	const char *kind;	/* "nbd", "nbd-listener", "blkif" */
	/* The vbd is closing: stop submitting and go away (vbd_frontend_remove). */
	void (*shutdown)(struct vbd_frontend *fe);
	/* Optional: the frontend's own statistics (blkif: under "xenbus"). */
	json_t *(*stats)(struct vbd_frontend *fe);
	/* Optional: zero the counters among those statistics (stats reset). */
	void (*reset_stats)(struct vbd_frontend *fe);
};
struct vbd_frontend {
	const struct vbd_frontend_ops *ops;
	struct vbd *vbd;
	LIST_ENTRY(vbd_frontend) link;
};

/* A control operation waiting for the vbd to reach a state. */
typedef void (*vbd_done_fn)(void *arg, int err, const char *msg);

struct vbd_waiter {
	vbd_done_fn fn;
	void *arg;
	struct vbd_waiter *next;
};

struct vbd_stats {
	struct op_stats op[TD_OP_COUNT];
	uint64_t secs[2];	/* sectors read, written (tapdisk's key) */
};

/*
 * An image's hits and fail when this vbd's stats were last reset: images
 * can be shared by several vbds, so a reset subtracts instead of zeroing.
 * serial tells the image from another opened later at the same address.
 */
struct vbd_image_mark {
	uint64_t serial;
	struct td_image_stats at;
};

struct loop;

/* Everything below is the vbd's loop's (loop), but for the fields marked "lock". */
struct vbd {
	struct server *srv;
	struct loop *loop;	/* where it lives; set before it is in the table, never changed */
	int minor;
	int counted;		/* in srv->nr_open (lock) */
	int was_closed;		/* the minor was a closed one: it stays so if the open fails */
	char *params;		/* NULL when closed */
	unsigned state;
	int readonly;
	int nodirect;
	struct td_image *leaf;
	uint64_t size;
	uint32_t sector_size;
	uint32_t min_io;	/* request alignment the chain needs */
	size_t scratch_size;	/* drivers' per-request state a frontend reserves (td_chain_scratch_size) */
	unsigned caps;
	time_t opened_at;
	unsigned timeout;	/* seconds a request may take, retries included */
	struct cbt *cbt;	/* changed-block tracking, or NULL (cbt.h) */
	char *cbt_path;		/* the log the next open or reopen takes, or NULL */
	struct blockjob *job;	/* running, or the last one's summary, or NULL (blockjob.h) */
	int job_starting;	/* a job's destination is opening */
	unsigned drops;		/* chains let go of (a pivot's old one) still closing */
	void (*quiesce_fn)(void *arg);	/* VBD_QUIESCED: called once drained */
	void *quiesce_arg;

	TAILQ_HEAD(, vbd_request) queued;	/* waiting for unpause */
	TAILQ_HEAD(, vbd_request) inflight;	/* in the order they started */
	unsigned nr_inflight;
	TAILQ_HEAD(vbd_request_list, vbd_request) retry;	/* in flight, to be sent again, by due time */
	struct event *retry_ev;		/* the first of retry is due; made with the vbd */
	struct event *watchdog;		/* the oldest request's timeout; made with the vbd */
	int watchdog_armed;
	uint64_t retries, timeouts;	/* stats: requests sent again, requests timed out */
	LIST_HEAD(, vbd_frontend) frontends;
	struct vbd_waiter *drain_waiters;	/* pause/close in progress */
	int release_on_close;			/* destroy: free the minor too */

	struct vbd_stats stats;
	struct qos_vbd *qos;			/* NULL: no limits, no group */
	struct vbd_image_mark *marks;	/* one per image of the chain, or NULL */
	unsigned nr_marks;
	struct vbd *zombie_next;	/* on loop->zombies */
};

#define VBD_OPEN_READONLY 0x1
#define VBD_OPEN_NODIRECT 0x2

/*
 * Puts a new vbd (VBD_OPENING) in the table at minor, placed on loop: any
 * thread. -EBUSY if the minor is taken, -ENOMEM. vbd_open then opens it, on
 * its loop.
 */
int vbd_new(struct server *srv, int minor, struct loop *loop, struct vbd **out);
/*
 * At server_free, on the vbd's loop (or after it stopped): frees a vbd
 * still in the table, one whose open or close never finished, and the
 * timers it owns; nothing of it runs again.
 */
void vbd_forget(struct vbd *vbd);
/* Seconds a request may take (1..VBD_MAX_TIMEOUT); before vbd_open, on the vbd's loop. */
void vbd_set_timeout(struct vbd *vbd, unsigned secs);
/*
 * Track changed blocks in the CBT log at path from the open (before
 * vbd_open; the log must exist and match the disk's size). -ENOMEM.
 */
int vbd_set_cbt_log(struct vbd *vbd, const char *path);
/* Async, on the vbd's loop; done(arg, 0, NULL) once the vbd serves requests.
 * If the open fails, the vbd is gone from the table when done runs. */
void vbd_open(struct vbd *vbd, const char *params, unsigned flags, vbd_done_fn done, void *arg);
void vbd_pause(struct vbd *vbd, vbd_done_fn done, void *arg);
/*
 * params NULL: reopen what was open. cbt_log: track changes in this log
 * from now on (the old log, if any, is closed consistent: a toolstack's
 * rotation at snapshot); NULL keeps the log there is, grown if the disk did.
 */
void vbd_unpause(struct vbd *vbd, const char *params, const char *cbt_log, vbd_done_fn done,
		 void *arg);
/*
 * Stops the vbd: new requests fail; without force, in-flight ones finish
 * first; with force, frontends are cut off at once and the images close when
 * the I/O already in the kernel comes back. The vbd is then freed and its
 * minor stays as a closed one (list shows it), or is let go when release is
 * set (destroy).
 */
void vbd_close(struct vbd *vbd, int force, int release, vbd_done_fn done, void *arg);

void vbd_submit(struct vbd *vbd, struct vbd_request *vr);
/*
 * For block jobs (blockjob.h), on the vbd's loop. vbd_request_send: sends
 * a started request (one the job held) down the chain. vbd_request_end:
 * ends a request whose chain I/O is back with err (one the job made wait).
 */
void vbd_request_send(struct vbd *vbd, struct vbd_request *vr);
void vbd_request_end(struct vbd_request *vr, int err);
/*
 * New requests wait and fn(arg) runs once none is in flight; vbd_resume
 * lets them go. Unlike a pause, the chain stays open and nothing is told.
 */
void vbd_quiesce(struct vbd *vbd, void (*fn)(void *arg), void *arg);
void vbd_resume(struct vbd *vbd);
/*
 * The vbd serves leaf (an open chain, params its "type:path"; both taken)
 * from now on; the old chain closes on a worker (then, with adopt, leaf, a
 * writable handle from td_image_open_writable, joins the registry).
 * Quiesced, nothing in flight.
 */
void vbd_swap_chain(struct vbd *vbd, struct td_image *leaf, char *params, int adopt);
/* The chain's shape changed in place (a stream dropped the parents): size, caps, marks. */
void vbd_chain_changed(struct vbd *vbd);
/* The block job stopped (or failed to start): a close may go on. */
void vbd_job_stopped(struct vbd *vbd);
/* QoS's: sends an admitted request down the chain; ends one that cannot go. */
void vbd_start(struct vbd *vbd, struct vbd_request *vr);
void vbd_fail_request(struct vbd *vbd, struct vbd_request *vr, int err);

void vbd_frontend_add(struct vbd *vbd, struct vbd_frontend *fe,
		      const struct vbd_frontend_ops *ops);
void vbd_frontend_remove(struct vbd_frontend *fe);
unsigned vbd_frontend_count(const struct vbd *vbd, const char *kind);

json_t *vbd_stats_json(const struct vbd *vbd);
/*
 * Zeroes every cumulative counter vbd_stats_json reports (ops, secs, image
 * hits/fail, frontend counters); gauges (in flight, queued) stay. Called
 * right after vbd_stats_json, on the loop, nothing runs in between: each
 * completed request is in exactly one of the two.
 */
void vbd_stats_reset(struct vbd *vbd);
json_t *vbd_info_json(const struct vbd *vbd);

#endif
