/*
 * The image driver interface: what every disk format (raw, ram, vhd, qcow2,
 * vmdk) implements, and the chain of images a vbd reads through.
 *
 * Threading: open, close, get_parent and validate_parent block (they read
 * metadata synchronously) and are only ever called on a worker thread, under
 * the chain lock. submit and every completion run on the event loop thread;
 * a driver never completes a request from inside submit (td_complete_later).
 */
#ifndef TD_DRIVER_H
#define TD_DRIVER_H

#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "io.h"

enum td_op {
	TD_OP_READ,
	TD_OP_WRITE,
	TD_OP_FLUSH,
	TD_OP_DISCARD,
	TD_OP_WRITE_ZEROES,
	TD_OP_BLOCK_STATUS,
	TD_OP_CACHE,
};
#define TD_OP_COUNT 7

#define TD_REQ_FUA		0x1	/* write: durable before it completes */
#define TD_REQ_NO_HOLE		0x2	/* write-zeroes: keep the range allocated */
#define TD_REQ_FAST_ZERO	0x4	/* write-zeroes: ENOTSUP rather than a slow write */
/*
 * block status: this image alone. Extents not allocated in it keep
 * TD_EXTENT_PARENT instead of being asked of the parents (a mirror of the
 * leaf only).
 */
#define TD_REQ_ONE_IMAGE	0x8

#define TD_EXTENT_HOLE		0x1	/* allocated nowhere in the chain */
#define TD_EXTENT_ZERO		0x2	/* reads as zeros */
#define TD_EXTENT_PARENT	0x4	/* driver -> chain (and TD_REQ_ONE_IMAGE): not allocated here */

struct td_extent {
	uint64_t length;
	uint32_t flags;
};

struct td_image;

struct td_request {
	enum td_op op;
	unsigned flags;		/* TD_REQ_* */
	uint64_t offset;	/* bytes, checked against the size by the submitter */
	uint64_t length;
	/* READ, WRITE: exactly length bytes. Drivers never modify the array. */
	struct iovec *iov;
	int iovcnt;
	/*
	 * BLOCK_STATUS: the driver fills nr_extents (1..max_extents) adjacent
	 * extents starting at offset and covering at most length bytes.
	 */
	struct td_extent *extents;
	unsigned max_extents, nr_extents;
	/*
	 * BLOCK_STATUS, optional: do not ask this image or those below it;
	 * what only they hold keeps TD_EXTENT_PARENT (a commit's segment).
	 */
	const struct td_image *stop_at;
	void (*done)(struct td_request *req, int err);	/* err: 0 or an errno */
	void *priv;					/* the submitter's */
	/*
	 * Scratch space reserved with the request by its submitter (the vbd's
	 * frontends reserve td_chain_scratch_size() bytes), from which the
	 * drivers take their per-request state with td_req_alloc: steady-state
	 * I/O then allocates nothing. NULL/0: every td_req_alloc is a calloc.
	 */
	void *scratch;
	size_t scratch_size, scratch_used;

	/* chain bookkeeping (image.c) */
	struct td_image *img;		/* whose driver has it now */
	int deferred_err;
	struct io_defer defer;
};

#define TD_OPEN_RDONLY		0x1
#define TD_OPEN_NODIRECT	0x2	/* never use O_DIRECT */
#define TD_OPEN_PARENT		0x4	/* opened as a parent: read-only, shared */
#define TD_OPEN_NOFILE		0x8	/* only drivers that name no file (TD_DRV_NOFILE): fuzzing */

#define TD_CAP_FLUSH		0x1
#define TD_CAP_DISCARD		0x2
#define TD_CAP_WRITE_ZEROES	0x4
#define TD_CAP_FAST_ZERO	0x8	/* write-zeroes can be cheap (no data written) */
#define TD_CAP_BLOCK_STATUS	0x10
#define TD_CAP_CACHE		0x20

struct td_image_stats {
	uint64_t hits[2], fail[2];	/* [0] reads, [1] writes: tapdisk's keys */
};

struct td_image {
	const struct td_driver *drv;
	char *params;		/* "type:path" */
	char *path;
	unsigned oflags;	/* TD_OPEN_* */
	uint64_t size;		/* bytes */
	uint32_t sector_size;
	uint32_t min_io;	/* offsets and lengths must be multiples (1: any) */
	unsigned caps;		/* TD_CAP_* */
	struct td_image *parent;
	struct io_engine *io;
	void *priv;		/* the driver's */
	/*
	 * Optional, the driver's, on the loop: a word on a remote image's
	 * health for stats ("connected", "connection lost"); NULL for files.
	 */
	const char *status;
	struct td_image_stats stats;
	/* never reused, unlike the address: names the image in a vbd's stats marks */
	uint64_t serial;

	/* registry of open images (image.c) */
	char *key;
	unsigned refs;
	struct td_image *reg_next;
};

/* An error with the sentence the user will read. code is a positive errno. */
struct td_error {
	int code;
	char msg[1024];
};
int td_error_set(struct td_error *err, int code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

struct td_open_ctx {
	struct io_engine *io;
	/*
	 * The vbd's request timeout in seconds (0: none known): a remote
	 * driver bounds its own waits (connecting, a cluster that went away)
	 * by it, so a request fails rather than outlives it.
	 */
	unsigned timeout;
};

#define TD_DRV_NOFILE		0x1	/* path names no file (ram) */
#define TD_DRV_KEEP_ON_PAUSE	0x2	/* pause must not close it: contents live in it */
#define TD_DRV_URI		0x4	/* path is a URI, kept as given (nbd): no file, but not NOFILE */

struct td_driver {
	const char *name;
	unsigned flags;		/* TD_DRV_* */
	/*
	 * Bytes of per-request state submit usually needs (taken with
	 * td_req_alloc), as SPDK's bdev modules declare get_ctx_size: a chain
	 * reserves the sum over its images with every request.
	 */
	size_t ctx_size;
	/* Sets size, sector_size, caps and priv. Returns 0 or -errno with err set. */
	int (*open)(struct td_image *img, const struct td_open_ctx *ctx,
		    struct td_error *err);
	/* Makes everything durable and releases the image. */
	void (*close)(struct td_image *img);
	void (*submit)(struct td_image *img, struct td_request *req);
	/* Optional. *params = "type:path" (malloc'd) or NULL for no parent. */
	int (*get_parent)(struct td_image *img, char **params, struct td_error *err);
	/* Optional. Is parent really the image this one was made on? */
	int (*validate_parent)(struct td_image *img, struct td_image *parent,
			       struct td_error *err);
	/*
	 * Optional, blocking, on a worker under the chain lock, with no
	 * request in flight on the image: rewrites the image's metadata so it
	 * has no parent any more (a stream copied up what it needed), durably,
	 * and forgets the parent's name. The chain drops the parents after
	 * (td_chain_detach). 0 or -errno with err set; on failure the image is
	 * as it was (it may say either, after a crash: both read the same).
	 */
	int (*detach_parent)(struct td_image *img, struct td_error *err);
	/*
	 * Optional, the same conditions: rewrites img's metadata so its parent
	 * is parent (an image below the one it had: a commit merged those into
	 * it), durably, naming a parent that opens at every step. The chain
	 * is rewired after (td_chain_rebase).
	 */
	int (*set_parent)(struct td_image *img, struct td_image *parent, struct td_error *err);
	/*
	 * Optional, blocking, on a closed image: creates child_path as a new
	 * leaf on top of parent_path; *child_params is its "type:path".
	 */
	int (*create_child)(const char *parent_path, const char *child_path,
			    char **child_params, struct td_error *err);
	/*
	 * Optional, blocking, on a closed image (the vbd paused): an image that
	 * keeps its snapshots inside itself (rbd:) makes one named name and
	 * stays the leaf; *snap_params (malloc'd) is the "type:path" that opens
	 * the snapshot. timeout as td_open_ctx's. A driver with this op takes
	 * `snapshot`'s path as this name; create_child is not used.
	 */
	int (*snapshot)(const char *path, const char *name, unsigned timeout,
			char **snap_params, struct td_error *err);
};

extern const struct td_driver td_driver_raw;
extern const struct td_driver td_driver_ram;
extern const struct td_driver td_driver_vhd;
extern const struct td_driver td_driver_vmdk;
extern const struct td_driver td_driver_qcow2;
extern const struct td_driver td_driver_nbd;
#if defined(TD_RBD) && TD_RBD
extern const struct td_driver td_driver_rbd;	/* built with librbd (make RBD=1, the default) */
#endif

/*
 * Per-request state for a driver: size zeroed bytes from the request's
 * scratch while it lasts, else from the heap (NULL if out of memory).
 * td_req_free gives back what came from the heap; scratch is the
 * submitter's and lives as long as the request.
 */
void *td_req_alloc(struct td_request *req, size_t size);
void td_req_free(struct td_request *req, void *p);
/*
 * For a driver that asks another image on req's behalf (a parent, an image
 * inside its own): gives sub size bytes of req's scratch for the state of
 * the drivers below, while req has room; else sub has none and those
 * drivers take theirs from the heap. Nothing to give back.
 */
void td_req_lend(struct td_request *req, struct td_request *sub, size_t size);
/* A struct's room in scratch (td_req_alloc aligns to 16), for ctx_size. */
#define TD_CTX_SIZE(type) ((sizeof(type) + 15) & ~(size_t)15)
/* The scratch a request on this chain should carry: the images' ctx_size summed. */
size_t td_chain_scratch_size(const struct td_image *leaf);

const struct td_driver *td_driver_find(const char *type);
/* Adds a driver beyond the built-in ones (tests, out-of-tree formats). */
int td_driver_register(const struct td_driver *drv);

/* Splits "type:path"; "aio" is raw. Returns 0 or -errno with err set. */
int td_params_parse(const char *params, const struct td_driver **drv,
		    char **path, struct td_error *err);

/*
 * A path made absolute against dir (a client's working directory), into
 * *out (malloc'd). A relative path without dir is refused: the server's own
 * directory means nothing to the client. Returns 0 or -errno with err set.
 */
int td_path_absolute(const char *path, const char *dir, char **out, struct td_error *err);
/* The same for TYPE:PATH params; drivers whose path names no file keep it as it is. */
int td_params_absolute(const char *params, const char *dir, char **out,
		       struct td_error *err);

/* Blocking (worker thread): opens the leaf and every parent below it. */
int td_chain_open(const char *params, unsigned oflags,
		  const struct td_open_ctx *ctx, struct td_image **leaf,
		  struct td_error *err);
/* Blocking (worker thread): closes what td_chain_open opened. */
void td_chain_close(struct td_image *leaf);
/*
 * Blocking (worker thread), for a commit into base, an image of the chain
 * below top (open read-only as a parent): *rw, a writable handle on base
 * over base's own parent (one more reference on it), kept out of the
 * registry until td_image_adopt. -EBUSY with err set when another chain
 * holds base or an image between top and base (a commit would change that
 * disk too). td_chain_close lets go of it.
 */
int td_image_open_writable(struct td_image *top, struct td_image *base, unsigned oflags,
			   const struct td_open_ctx *ctx, struct td_image **rw,
			   struct td_error *err);
/*
 * Blocking (worker thread), once the chain that held base read-only is
 * closed: rw takes base's place in the registry, a writer now.
 */
void td_image_adopt(struct td_image *rw);
/*
 * Blocking (worker thread), no request in flight on img: img's driver
 * drops its parent (detach_parent), then the parents are let go of (closed
 * where no other chain holds them). -ENOTSUP when the driver cannot.
 */
int td_chain_detach(struct td_image *img, struct td_error *err);
/*
 * Blocking (worker thread), no request in flight: child's driver points it
 * at rw (set_parent), an image below child's parent; then the images from
 * child's old parent down to above rw are let go of. adopt: rw is a
 * writable handle from td_image_open_writable (a commit filled it), which
 * takes the place of the read-only one in the registry; else rw is an
 * image of the chain already (a stream --base), with one more reference.
 */
int td_chain_rebase(struct td_image *child, struct td_image *rw, int adopt,
		    struct td_error *err);
/* Number of images in the chain, leaf included. */
unsigned td_chain_depth(const struct td_image *leaf);

/* Loop thread. Submits req to img and counts it in img's stats. */
void td_image_submit(struct td_image *img, struct td_request *req);
/*
 * For a driver: req (or the part of it a driver sub-request describes) is
 * not allocated in img. Reads go to the parent, or read zeros below the root.
 */
void td_image_read_parent(struct td_image *img, struct td_request *req);
/*
 * How a driver ends a request it was handed (or passed on to it whole):
 * the chain's accounting, then req->done. Sub-requests a driver submits
 * come back to their own done through the same path.
 */
void td_request_done(struct td_request *req, int err);
/* td_request_done(req, err) on the loop's next turn, as img's driver. */
void td_complete_later(struct td_image *img, struct td_request *req, int err);

/*
 * Describes bytes [skip, skip+len) of iov in out (at most max entries).
 * Returns the number of entries, or -1 if more than max are needed.
 */
int td_iov_slice(const struct iovec *iov, int iovcnt, uint64_t skip, uint64_t len,
		 struct iovec *out, int max);

/*
 * Points *iov at bytes [off, off+len) of req's data, or with zeros set, at
 * len bytes of zeros from a buffer of zeros_len bytes: in inl when ninl
 * entries suffice, else in a new array. An array *iov held before (not
 * inl) is freed first; free the last one unless it is inl. 0 or -ENOMEM.
 */
int td_req_iov(const struct td_request *req, uint64_t off, uint64_t len, const void *zeros,
	       size_t zeros_len, struct iovec *inl, int ninl, struct iovec **iov, int *iovcnt);

/*
 * For a driver: reads [off, off+len) of img's parent into iov (the part
 * past the parent's end, or all of it below the root, reads as zeros),
 * then done(sub, err), on behalf of req, whose scratch lends sub the
 * parents' state while it lasts (td_req_lend). The caller owns sub and
 * sets sub->priv.
 */
void td_image_read_parent_range(struct td_image *img, struct td_request *req,
				struct td_request *sub, uint64_t off, uint64_t len,
				struct iovec *iov, int iovcnt,
				void (*done)(struct td_request *sub, int err));

/* Block status: adds an extent (merged with the last when flags match); 0 when full. */
int td_extent_add(struct td_request *req, uint64_t len, uint32_t flags);

/* Zeroes the bytes of iov from keep on; returns the entries that hold [0, keep). */
int td_iov_zero_tail(struct iovec *iov, int iovcnt, uint64_t keep);
/* Zero-fills an iovec array. */
void td_iov_zero(const struct iovec *iov, int iovcnt);
uint64_t td_iov_length(const struct iovec *iov, int iovcnt);


/*
 * A request a driver serves in pieces: it completes with the first error
 * once the last piece is done, never from inside submit. The driver's own
 * per-request state can come with it (priv), and a last step of its own
 * can run before the completion (last).
 */
struct td_pieces {
	struct td_request *req;
	struct td_image *img;
	int pending;		/* pieces in flight, +1 while submit issues them */
	int err;		/* the first error */
	/*
	 * Optional, the driver's: runs once the last piece is done. Returns 0
	 * to complete the request now (with ps->err), or 1 having started a
	 * last step (qcow2: the sync of a FUA write or a flush) whose
	 * completion ends the request with td_pieces_end.
	 */
	int (*last)(struct td_pieces *ps);
	void *priv;		/* priv_size zeroed bytes of the driver's, or NULL */
};
/*
 * In submit: NULL if out of memory. From the request's scratch when there
 * is room for TD_PIECES_CTX_SIZE(priv_size) bytes, priv included.
 */
struct td_pieces *td_pieces_new(struct td_image *img, struct td_request *req, size_t priv_size);
#define TD_PIECES_CTX_SIZE(priv_size) \
	(TD_CTX_SIZE(struct td_pieces) + (((priv_size) + 15) & ~(size_t)15))
/* One more piece (before it is issued). */
static inline void td_pieces_add(struct td_pieces *ps) { ps->pending++; }
/* A piece is done (err 0 or an errno); the last one completes and frees ps. */
void td_pieces_done(struct td_pieces *ps, int err);
/*
 * The same, for a piece that ends inside a library's callback holding the
 * library's lock (libnbd): the request completes on the loop's next turn,
 * so that whoever it wakes may submit again without deadlocking.
 */
void td_pieces_done_later(struct td_pieces *ps, int err);
/* End of submit: every piece is issued (or failed, ps->err set). */
void td_pieces_issued(struct td_pieces *ps);
/* The end of a last step (see last): frees ps, completes the request with err. */
void td_pieces_end(struct td_pieces *ps, int err);

#endif
