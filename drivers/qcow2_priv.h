/*
 * What the qcow2 driver's files share (qcow2.c: requests, jobs; qcow2_alloc.c:
 * allocation batches): the image's state (with its caches of L2 tables and
 * refcount blocks, meta_cache.h), requests, pieces and jobs. Not for other
 * drivers.
 */
#ifndef TD_QCOW2_PRIV_H
#define TD_QCOW2_PRIV_H

#include <sys/queue.h>

#include "driver.h"
#include "file_io.h"
#include "sync_gate.h"
#include "log.h"
#include "meta_cache.h"
#include "qcow2_format.h"

#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif

#define Q_INLINE_IOV	4
#define Q_JOB_HASH	256
#define Q_BATCH_MAX	256		/* jobs per allocation batch */
#define Q_L2_CACHE	(4u << 20)	/* bytes of L2 tables cached per image */
#define Q_RB_CACHE	(1u << 20)	/* bytes of refcount blocks */
#define Q_CACHE_MIN	4		/* entries, whatever the cluster size */
#define Q_ZERO_BYTES	(2u << 20)	/* one cluster of the largest size */
#define Q_ZERO_PIECES	64		/* in flight per discard or write-zeroes */

struct qcow2;
struct qop;
struct job;

/* Someone waiting for a job (the cache has its own waiters, meta_cache.h). */
struct jwait {
	void (*fn)(struct jwait *w, int err);
	TAILQ_ENTRY(jwait) link;
};
TAILQ_HEAD(jwait_list, jwait);

/* A request's own state, beside its pieces (its td_pieces' priv). */
struct qreq {
	struct td_pieces *ps;
	struct qcow2 *q;
	struct io_op sync_op;		/* flush, FUA: the last step */
	struct mc_waiter wait;		/* block status: an L2 table loading */
	uint64_t zpos, zend;		/* discard, write-zeroes: what is left to issue */
	int zmode;			/* how whole clusters are zeroed */
	int issuing;			/* zero_issue is running */
};

/* One piece of a request: a range inside one L2 table's span, or one run. */
struct qop {
	struct td_pieces *ps;		/* its request's */
	struct qcow2 *q;
	uint64_t off, len;		/* guest bytes */
	int zero;			/* write zeros, not the request's data */
	int mode;			/* whole-cluster zeroing: enum zmode */
	uint64_t entry;			/* the L2 entry a run was classified by */
	struct jwait wait;		/* for a job on its clusters */
	struct mc_waiter l2_wait;	/* for its L2 table */
	void (*with_l2)(struct qop *v, struct mc_entry *l2);	/* once it has it */
	struct io_op op;
	struct td_request sub;		/* a read from the backing file */
	struct iovec *iov;
	int iovcnt;
	struct iovec iov_inline[Q_INLINE_IOV];
	struct iovec miov;		/* a read of metadata or compressed bytes */
	uint8_t *buf;			/* compressed bytes */
	uint8_t *cluster;		/* an inflated cluster */
	uint64_t csize;
	struct io_call call;		/* inflate, off the loop */
	struct job *job;		/* the allocation it started */
	void (*next)(struct qop *v, int err);	/* where an I/O completion goes */
	void (*after)(struct qop *v, int err);	/* where an inflate goes */
	void (*resume)(struct qop *v);		/* after a job: start again */
};

/* What whole-cluster zeroing makes of the entries (by op, version, backing). */
enum zmode {
	ZM_DEALLOC,			/* unallocated: reads zero (no backing) */
	ZM_ZERO,			/* v3 zero flag, the old cluster freed */
	ZM_ZERO_KEEP,			/* v3 zero flag on the kept allocation */
};

/* Work on clusters others must wait for. */
struct job {
	enum { JOB_ALLOC, JOB_ZERO } kind;
	uint64_t first, count;		/* guest clusters (ALLOC: count 1) */
	struct qop *v;			/* the piece it completes */
	uint64_t old;			/* ALLOC: the entry it replaces */
	uint64_t host;			/* ALLOC: the new cluster (planned) */
	uint8_t *bounce;		/* ALLOC: the whole cluster, copy-on-write */
	struct iovec *data;		/* ALLOC: what goes into the new cluster */
	int ndata;
	int err;
	struct jwait_list waiting;	/* later writes to these clusters */
	LIST_ENTRY(job) hash;		/* ALLOC, by cluster */
	TAILQ_ENTRY(job) range;		/* ZERO: all of them */
	TAILQ_ENTRY(job) queue;		/* waiting for a batch */
};
TAILQ_HEAD(job_list, job);

struct qcow2 {
	struct td_image *img;
	struct td_file f;
	struct qcow2_meta m;
	int rdonly;
	unsigned span_bits;		/* log2 of the guest bytes one L2 table maps */
	uint64_t next_free;		/* bytes: new clusters go here, never below */
	uint64_t known_end;		/* bytes of the file known to be written */
	struct mc_cache l2c, rbc;	/* L2 tables by L1 index, refcount blocks by reftable index */
	LIST_HEAD(, job) jobs[Q_JOB_HASH];
	struct job_list zero_jobs;
	struct job_list ready;		/* waiting for a batch */
	struct batch *batch;		/* the one in flight */
	uint64_t *frees;		/* host clusters to decrement */
	size_t nfrees, cap_frees;
	struct log_ratelimit rl;
	struct sync_gate gate;		/* orders a batch's steps (qcow2_alloc.c) */
};

static inline uint64_t
div_up(uint64_t v, uint64_t d)
{
	return v / d + (v % d != 0);
}

static inline uint64_t
min_u64(uint64_t a, uint64_t b)
{
	return a < b ? a : b;
}

static inline uint64_t
cluster_of(const struct qcow2 *q, uint64_t off)
{
	return off >> q->m.cluster_bits;
}

/* Entries were checked when their table was loaded (qcow2_l2_check). */
static inline enum qcow2_ckind
entry_kind(uint64_t e)
{
	if (e & QCOW2_COMPRESSED)
		return QCOW2_COMPRESSED_DATA;
	if (e & QCOW2_ZERO)
		return QCOW2_ZERO_CLUSTER;
	return (e & QCOW2_OFFSET_MASK) ? QCOW2_DATA : QCOW2_UNALLOCATED;
}

/* qcow2.c */
/* Pins table idx (at host) of c, an L2 or refcount cache, for w: mc_get. */
int qcow2_table_get(struct qcow2 *q, struct mc_cache *c, uint64_t idx, uint64_t host,
		    struct mc_waiter *w);
struct qcow2_cluster qcow2_entry_decode(const struct qcow2 *q, uint64_t e);
void qcow2_io_prep_meta(struct qcow2 *q, struct io_op *op, enum io_opcode opc,
			struct iovec *iov, void *buf, size_t len, uint64_t off);
void *qcow2_buf_alloc(size_t len);
void qcow2_job_end(struct qcow2 *q, struct job *j, int err);

/* qcow2_alloc.c */
/* Starts a batch of the ready jobs, unless one is in flight (it starts the next). */
void qcow2_batch_start(struct qcow2 *q);
/* At close (blocking, nothing in flight): the decrements no batch made. */
void qcow2_apply_frees(struct qcow2 *q);

#endif
