/* The drivers' metadata cache (see meta_cache.h). */
#include "meta_cache.h"

#include <errno.h>
#include <stdlib.h>

static unsigned
slot(uint64_t key)
{
	return (unsigned)((key ^ key >> 32) % MC_HASH);
}

void
mc_init(struct mc_cache *c, struct io_engine *io, unsigned max)
{
	c->io = io;
	c->max = max;
	c->count = 0;
	c->on_load = NULL;
	c->priv = NULL;
	for (int i = 0; i < MC_HASH; i++)
		LIST_INIT(&c->hash[i]);
	TAILQ_INIT(&c->lru);
}

static void
entry_free(struct mc_cache *c, struct mc_entry *e)
{
	if (!e->gone)
		LIST_REMOVE(e, hash);
	TAILQ_REMOVE(&c->lru, e, lru);
	c->count--;
	free(e->buf);
	free(e);
}

void
mc_free(struct mc_cache *c)
{
	while (!TAILQ_EMPTY(&c->lru))
		entry_free(c, TAILQ_FIRST(&c->lru));
}

struct mc_entry *
mc_find(struct mc_cache *c, uint64_t key)
{
	struct mc_entry *e;
	LIST_FOREACH(e, &c->hash[slot(key)], hash)
		if (e->key == key)
			return e;
	return NULL;
}

/* Unpinned and loaded: an entry the cache may let go of. */
static int
idle(const struct mc_entry *e)
{
	return !e->refs && e->ready;
}

static void
evict(struct mc_cache *c)
{
	struct mc_entry *e, *prev;
	for (e = TAILQ_LAST(&c->lru, mc_lru); e && c->count > c->max; e = prev) {
		prev = TAILQ_PREV(e, mc_lru, lru);
		if (idle(e))
			entry_free(c, e);
	}
}

static void
entry_link(struct mc_cache *c, struct mc_entry *e, uint64_t key, uint64_t off, void *buf)
{
	e->key = key;
	e->off = off;
	e->buf = buf;
	e->c = c;
	TAILQ_INIT(&e->waiters);
	LIST_INSERT_HEAD(&c->hash[slot(key)], e, hash);
	TAILQ_INSERT_HEAD(&c->lru, e, lru);
	c->count++;
}

static void
loaded(struct io_op *op, int res)
{
	struct mc_entry *e = op->data;
	struct mc_cache *c = e->c;
	int err = res < 0 ? -res : 0;
	TAILQ_HEAD(, mc_waiter) waiters;

	if (!err && c->on_load)
		err = c->on_load(c, e, e->iov.iov_len);
	TAILQ_INIT(&waiters);
	TAILQ_CONCAT(&waiters, &e->waiters, link);
	if (err) {
		entry_free(c, e);	/* forget it: a later get tries again */
		e = NULL;
	} else {
		e->ready = 1;
	}
	while (!TAILQ_EMPTY(&waiters)) {
		struct mc_waiter *w = TAILQ_FIRST(&waiters);
		TAILQ_REMOVE(&waiters, w, link);
		w->ready(w, e, err);
	}
}

static struct mc_entry *
load(struct mc_cache *c, uint64_t key, int fd, unsigned io_flags, uint64_t off, size_t len)
{
	void *buf = malloc(len);
	struct mc_entry *e = buf ? calloc(1, sizeof(*e)) : NULL;

	if (!e) {
		free(buf);
		return NULL;
	}
	entry_link(c, e, key, off, buf);
	e->iov.iov_base = buf;
	e->iov.iov_len = len;
	e->op.opcode = IO_OP_READV;
	e->op.flags = io_flags;
	e->op.fd = fd;
	e->op.offset = off;
	e->op.iov = &e->iov;
	e->op.iovcnt = 1;
	e->op.done = loaded;
	e->op.data = e;
	io_submit(c->io, &e->op);
	return e;
}

int
mc_get(struct mc_cache *c, uint64_t key, int fd, unsigned io_flags, uint64_t off, size_t len,
       struct mc_waiter *w)
{
	struct mc_entry *e = mc_find(c, key);

	if (!e) {
		if (!(e = load(c, key, fd, io_flags, off, len)))
			return -ENOMEM;
		evict(c);
	} else {
		TAILQ_REMOVE(&c->lru, e, lru);
		TAILQ_INSERT_HEAD(&c->lru, e, lru);
	}
	e->refs++;
	if (e->ready)
		w->ready(w, e, 0);
	else
		TAILQ_INSERT_TAIL(&e->waiters, w, link);
	return 0;
}

void
mc_put(struct mc_cache *c, struct mc_entry *e)
{
	if (!--e->refs && e->gone)
		entry_free(c, e);
	evict(c);
}

void
mc_drop(struct mc_cache *c, uint64_t key)
{
	struct mc_entry *e = mc_find(c, key);

	if (!e)
		return;
	if (idle(e)) {
		entry_free(c, e);
		return;
	}
	LIST_REMOVE(e, hash);	/* its users keep it until they put it */
	e->gone = 1;
}

int
mc_insert(struct mc_cache *c, uint64_t key, uint64_t off, void *buf)
{
	struct mc_entry *e = calloc(1, sizeof(*e));

	if (!e)
		return -ENOMEM;
	mc_drop(c, key);
	entry_link(c, e, key, off, buf);
	e->ready = 1;
	evict(c);
	return 0;
}
