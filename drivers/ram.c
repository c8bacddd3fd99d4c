/*
 * ram: a disk in memory. `ram:SIZE` is private to its vbd; `ram:NAME:SIZE`
 * is shared by every vbd that opens the same name (a shared scratch disk).
 * Memory is reserved lazily (untouched pages cost nothing) and tracked in
 * 64 KiB chunks so block status can report holes and discard can give
 * memory back. Pause keeps it open: the contents live nowhere else.
 * A shared store may be used by vbds on several loops at once: its
 * requests take its lock (a private one is its loop's alone, and takes none).
 */
#include "driver.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define RAM_CHUNK_SHIFT 16
#define RAM_CHUNK ((uint64_t)1 << RAM_CHUNK_SHIFT)
#define RAM_MAX_SIZE ((uint64_t)1 << 44)	/* 16 TiB of address space */

struct ram_store {
	char *name;		/* NULL: private */
	uint64_t size;
	char *mem;
	uint8_t *alloc;		/* one bit per chunk */
	unsigned refs;
	pthread_mutex_t io_lock;	/* named stores: one request at a time */
	struct ram_store *next;
};

static pthread_mutex_t ram_lock = PTHREAD_MUTEX_INITIALIZER;
static struct ram_store *named_stores;

/* Parses "256M", "1G", "4096": binary suffixes K, M, G, T. */
static int
ram_parse_size(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v;

	if (*s < '0' || *s > '9')
		return -1;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno)
		return -1;
	unsigned shift = 0;
	switch (*end) {
	case 'k': case 'K': shift = 10; end++; break;
	case 'm': case 'M': shift = 20; end++; break;
	case 'g': case 'G': shift = 30; end++; break;
	case 't': case 'T': shift = 40; end++; break;
	case '\0': break;
	default: return -1;
	}
	if (*end == 'i' || *end == 'B')
		end += (*end == 'i' && end[1] == 'B') ? 2 : 1;
	if (*end || (shift && v > (~0ULL >> shift)))
		return -1;
	*out = (uint64_t)v << shift;
	return 0;
}

static void
ram_store_free(struct ram_store *st)
{
	if (st->mem)
		munmap(st->mem, st->size);
	free(st->alloc);
	free(st->name);
	pthread_mutex_destroy(&st->io_lock);
	free(st);
}

static struct ram_store *
ram_store_new(const char *name, uint64_t size, struct td_error *err)
{
	struct ram_store *st = calloc(1, sizeof(*st));
	if (!st) {
		td_error_set(err, ENOMEM, "out of memory");
		return NULL;
	}
	pthread_mutex_init(&st->io_lock, NULL);
	st->size = size;
	st->mem = mmap(NULL, size, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (st->mem == MAP_FAILED) {
		st->mem = NULL;
		td_error_set(err, ENOMEM, "cannot reserve %ju bytes of memory",
			     (uintmax_t)size);
		ram_store_free(st);
		return NULL;
	}
	st->alloc = calloc(((size + RAM_CHUNK - 1) >> RAM_CHUNK_SHIFT) / 8 + 1, 1);
	if (!st->alloc || (name && !(st->name = strdup(name)))) {
		td_error_set(err, ENOMEM, "out of memory");
		ram_store_free(st);
		return NULL;
	}
	st->refs = 1;
	return st;
}

static int
ram_open(struct td_image *img, const struct td_open_ctx *ctx, struct td_error *err)
{
	const char *spec = img->path, *colon = strrchr(spec, ':');
	char *name = NULL;
	uint64_t size;
	struct ram_store *st;
	(void)ctx;

	if (ram_parse_size(colon ? colon + 1 : spec, &size) < 0 || size == 0)
		return td_error_set(err, EINVAL,
				    "bad size '%s' (want ram:SIZE or ram:NAME:SIZE, e.g. ram:256M)",
				    colon ? colon + 1 : spec);
	if (size > RAM_MAX_SIZE)
		return td_error_set(err, EINVAL, "size %ju is larger than 16 TiB",
				    (uintmax_t)size);
	if (size % 512)
		return td_error_set(err, EINVAL, "size %ju is not a multiple of 512",
				    (uintmax_t)size);
	if (colon) {
		name = strndup(spec, (size_t)(colon - spec));
		if (!name)
			return td_error_set(err, ENOMEM, "out of memory");
	}

	pthread_mutex_lock(&ram_lock);
	for (st = name ? named_stores : NULL; st; st = st->next)
		if (strcmp(st->name, name) == 0)
			break;
	if (st) {
		if (st->size != size) {
			pthread_mutex_unlock(&ram_lock);
			free(name);
			return td_error_set(err, EINVAL,
					    "ram disk '%s' exists with size %ju",
					    st->name, (uintmax_t)st->size);
		}
		st->refs++;
	} else {
		st = ram_store_new(name, size, err);
		if (st && name) {
			st->next = named_stores;
			named_stores = st;
		}
	}
	pthread_mutex_unlock(&ram_lock);
	free(name);
	if (!st)
		return -err->code;
	img->size = size;
	img->sector_size = 512;
	img->caps = TD_CAP_FLUSH | TD_CAP_DISCARD | TD_CAP_WRITE_ZEROES |
		    TD_CAP_FAST_ZERO | TD_CAP_BLOCK_STATUS | TD_CAP_CACHE;
	img->priv = st;
	return 0;
}

static void
ram_close(struct td_image *img)
{
	struct ram_store *st = img->priv;

	pthread_mutex_lock(&ram_lock);
	if (--st->refs == 0) {
		for (struct ram_store **p = &named_stores; *p; p = &(*p)->next) {
			if (*p == st) {
				*p = st->next;
				break;
			}
		}
		ram_store_free(st);
	}
	pthread_mutex_unlock(&ram_lock);
}

static int
chunk_is_alloc(const struct ram_store *st, uint64_t c)
{
	return (st->alloc[c >> 3] >> (c & 7)) & 1;
}

static void
chunk_set_alloc(struct ram_store *st, uint64_t c, int on)
{
	if (on)
		st->alloc[c >> 3] |= (uint8_t)(1u << (c & 7));
	else
		st->alloc[c >> 3] &= (uint8_t)~(1u << (c & 7));
}

static void
ram_mark(struct ram_store *st, uint64_t off, uint64_t len)
{
	if (!len)
		return;
	for (uint64_t c = off >> RAM_CHUNK_SHIFT; c <= (off + len - 1) >> RAM_CHUNK_SHIFT; c++)
		chunk_set_alloc(st, c, 1);
}

/* Zeros a range; whole chunks are given back to the kernel and become holes. */
static void
ram_zero(struct ram_store *st, uint64_t off, uint64_t len, int keep_alloc)
{
	uint64_t end = off + len;
	uint64_t first = (off + RAM_CHUNK - 1) & ~(RAM_CHUNK - 1);
	uint64_t last = end & ~(RAM_CHUNK - 1);

	if (keep_alloc || first >= last) {
		memset(st->mem + off, 0, len);
		if (keep_alloc)
			ram_mark(st, off, len);
		return;
	}
	memset(st->mem + off, 0, first - off);
	memset(st->mem + last, 0, end - last);
#ifdef MADV_DONTNEED
	if (madvise(st->mem + first, last - first, MADV_DONTNEED) < 0)
#endif
		memset(st->mem + first, 0, last - first);
	for (uint64_t c = first >> RAM_CHUNK_SHIFT; c < last >> RAM_CHUNK_SHIFT; c++)
		chunk_set_alloc(st, c, 0);
}

static void
ram_block_status(struct ram_store *st, struct td_request *req)
{
	uint64_t pos = req->offset, end = req->offset + req->length;

	req->nr_extents = 0;
	while (pos < end && req->nr_extents < req->max_extents) {
		uint64_t c = pos >> RAM_CHUNK_SHIFT;
		int alloc = chunk_is_alloc(st, c);
		uint64_t stop = pos;
		while (stop < end && chunk_is_alloc(st, stop >> RAM_CHUNK_SHIFT) == alloc)
			stop = (stop & ~(RAM_CHUNK - 1)) + RAM_CHUNK;
		if (stop > end)
			stop = end;
		req->extents[req->nr_extents].length = stop - pos;
		req->extents[req->nr_extents].flags = alloc ? 0 : TD_EXTENT_HOLE | TD_EXTENT_ZERO;
		req->nr_extents++;
		pos = stop;
	}
}

/*
 * Reads of chunks never written give zeros without touching the store: a
 * read fault on untouched anonymous memory may allocate a page (it does on
 * some kernels), so reading a thin ram disk must not fill the host's memory.
 */
static void
ram_read(const struct ram_store *st, struct td_request *req)
{
	uint64_t off = req->offset;

	for (int i = 0; i < req->iovcnt; i++) {
		uint8_t *dst = req->iov[i].iov_base;
		size_t left = req->iov[i].iov_len;
		while (left) {
			uint64_t in_chunk = RAM_CHUNK - (off & (RAM_CHUNK - 1));
			size_t n = left < in_chunk ? left : (size_t)in_chunk;
			if (chunk_is_alloc(st, off >> RAM_CHUNK_SHIFT))
				memcpy(dst, st->mem + off, n);
			else
				memset(dst, 0, n);
			dst += n;
			off += n;
			left -= n;
		}
	}
}

static void
ram_write(struct ram_store *st, struct td_request *req)
{
	uint64_t off = req->offset;

	for (int i = 0; i < req->iovcnt; i++) {
		memcpy(st->mem + off, req->iov[i].iov_base, req->iov[i].iov_len);
		off += req->iov[i].iov_len;
	}
	ram_mark(st, req->offset, req->length);
}

static void
ram_submit(struct td_image *img, struct td_request *req)
{
	struct ram_store *st = img->priv;

	if (st->name)
		pthread_mutex_lock(&st->io_lock);
	switch (req->op) {
	case TD_OP_READ:
		ram_read(st, req);
		break;
	case TD_OP_WRITE:
		ram_write(st, req);
		break;
	case TD_OP_DISCARD:
		ram_zero(st, req->offset, req->length, 0);
		break;
	case TD_OP_WRITE_ZEROES:
		ram_zero(st, req->offset, req->length, (req->flags & TD_REQ_NO_HOLE) != 0);
		break;
	case TD_OP_BLOCK_STATUS:
		ram_block_status(st, req);
		break;
	case TD_OP_FLUSH:
	case TD_OP_CACHE:
		break;
	}
	if (st->name)
		pthread_mutex_unlock(&st->io_lock);
	td_complete_later(img, req, 0);
}

const struct td_driver td_driver_ram = {
	.name = "ram",
	.flags = TD_DRV_NOFILE | TD_DRV_KEEP_ON_PAUSE,
	.open = ram_open,
	.close = ram_close,
	.submit = ram_submit,
};
