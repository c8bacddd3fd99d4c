/*
 * The drivers' one metadata cache: blocks of metadata a driver reads through
 * the I/O engine (VHD sector bitmaps, VMDK grain tables, qcow2 L2 tables and
 * refcount blocks) or makes in memory when it allocates (a new bitmap, a
 * new L2 table or refcount block), by a key of the driver's choosing.
 *
 * One read per block however many requests want it: they wait in line and
 * each gets it pinned. Users pin what they hold (mc_get, then mc_put);
 * beyond max entries, the least recently used that are neither pinned nor
 * still loading go (the count stays above max while too many are). A
 * per-cache hook sees each block just read before anyone else does: it may
 * decode it (byte order) and check it, and its errno fails the load.
 *
 * Ownership: the cache owns its entries and their buffers (one given to
 * mc_insert too, from then on) until it evicts, drops or frees them; an
 * entry stays valid while pinned, even dropped (it goes at its last
 * mc_put). The descriptor blocks are read from stays the driver's (open
 * while the cache is), and so do waiters. The
 * cache keeps no dirty state: a driver that changes a block in memory
 * writes it back itself, at the entry's offset, and keeps it pinned until
 * it has.
 *
 * Errors: a failed read, or one the hook refuses, fails every waiter with
 * its errno and is forgotten, so the next mc_get reads again; out of memory
 * is -ENOMEM from the call that needed it, having done nothing.
 *
 * Threading: the loop thread only (load completions arrive there from the
 * I/O engine), but for mc_init and mc_free, which run where the driver
 * opens and closes its image (a worker thread, nothing in flight).
 */
#ifndef TD_META_CACHE_H
#define TD_META_CACHE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/queue.h>

#include "io.h"

#define MC_HASH 64

struct mc_entry;

/* Someone waiting for a block: e pinned for it, or NULL with err (an errno). */
struct mc_waiter {
	void (*ready)(struct mc_waiter *w, struct mc_entry *e, int err);
	TAILQ_ENTRY(mc_waiter) link;
};

struct mc_entry {
	uint64_t key;
	uint64_t off;			/* where the block lives in its file */
	int ready;			/* 0 while its read is in flight */
	int gone;			/* forgotten while in use: freed at its last mc_put */
	unsigned refs;			/* pins; never evicted while > 0 */
	void *buf;
	struct mc_cache *c;
	TAILQ_HEAD(, mc_waiter) waiters;
	struct io_op op;
	struct iovec iov;
	LIST_ENTRY(mc_entry) hash;
	TAILQ_ENTRY(mc_entry) lru;
};

struct mc_cache {
	struct io_engine *io;
	unsigned max, count;
	/*
	 * Optional, the owner's: runs on each block just read (len bytes at
	 * e->off), before any waiter sees it; may turn it into its in-memory
	 * form and check it. Returns 0, or an errno that fails the load.
	 */
	int (*on_load)(struct mc_cache *c, struct mc_entry *e, size_t len);
	void *priv;			/* the owner's, for on_load */
	LIST_HEAD(, mc_entry) hash[MC_HASH];
	TAILQ_HEAD(mc_lru, mc_entry) lru;
};

/* An empty cache of at most max unpinned blocks (on_load and priv unset). */
void mc_init(struct mc_cache *c, struct io_engine *io, unsigned max);
/* Frees every block; none may be pinned or loading. */
void mc_free(struct mc_cache *c);
/* The block of key if cached (check ready: it may be loading), neither pinned nor made younger. */
struct mc_entry *mc_find(struct mc_cache *c, uint64_t key);
/*
 * Pins the block of key for w: w->ready runs now (inside mc_get) if it is
 * loaded, else once len bytes at off of fd (io_flags: IO_F_*) are read and
 * on_load accepted them. Returns 0, or -ENOMEM having done nothing.
 */
int mc_get(struct mc_cache *c, uint64_t key, int fd, unsigned io_flags, uint64_t off, size_t len,
	   struct mc_waiter *w);
/* Unpins a block mc_get gave. */
void mc_put(struct mc_cache *c, struct mc_entry *e);
/*
 * Adds a block made in memory (it lives at off), loaded and unpinned:
 * buf (malloc'd) is the cache's from now on. An older block of the key is
 * forgotten (mc_drop). 0, or -ENOMEM (buf stays the caller's, nothing done).
 */
int mc_insert(struct mc_cache *c, uint64_t key, uint64_t off, void *buf);
/*
 * Forgets the block of key, if cached: mc_find and mc_get no longer see
 * it. Freed now if unused, else once its users (waiters of a load
 * included) have put it.
 */
void mc_drop(struct mc_cache *c, uint64_t key);

#endif
