/*
 * A cache of metadata blocks that drivers read through the I/O engine (VHD
 * sector bitmaps, VMDK grain tables): one read per block however many
 * requests wait for it; users pin the blocks they hold; beyond a bound the
 * least recently used unpinned blocks go. Loop thread only.
 */
#ifndef TD_META_CACHE_H
#define TD_META_CACHE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/queue.h>

#include "io.h"

#define MC_HASH 64

struct mc_entry;

/* Someone waiting for a block: e referenced, or NULL with err. */
struct mc_waiter {
	void (*ready)(struct mc_waiter *w, struct mc_entry *e, int err);
	TAILQ_ENTRY(mc_waiter) link;
};

struct mc_entry {
	uint64_t key;
	int ready;
	unsigned refs;			/* users; never evicted while > 0 */
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
	/* Optional: turns a block just read into its in-memory form (byte order). */
	void (*decode)(void *buf, size_t len);
	LIST_HEAD(, mc_entry) hash[MC_HASH];
	TAILQ_HEAD(mc_lru, mc_entry) lru;
};

void mc_init(struct mc_cache *c, struct io_engine *io, unsigned max);
/* Frees every block; none may be in use. */
void mc_free(struct mc_cache *c);
/* The block of key if cached (loaded or not), without touching its age. */
struct mc_entry *mc_find(struct mc_cache *c, uint64_t key);
/*
 * Pins the block of key for w: w->ready runs now if it is loaded, else once
 * len bytes at off of fd (io_flags: IO_F_*) are read. A failed read is
 * forgotten (the next get tries again). Returns -ENOMEM, having done nothing.
 */
int mc_get(struct mc_cache *c, uint64_t key, int fd, unsigned io_flags, uint64_t off, size_t len,
	   struct mc_waiter *w);
void mc_put(struct mc_cache *c, struct mc_entry *e);
/* Adds a loaded block; buf (malloc'd) is the cache's from now on. NULL: ENOMEM. */
struct mc_entry *mc_insert(struct mc_cache *c, uint64_t key, void *buf);
/* Forgets the block of key, if cached and unused. */
void mc_drop(struct mc_cache *c, uint64_t key);

#endif
