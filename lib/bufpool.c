/*
 * Size-class free lists of aligned buffers, bounded by a byte budget. Under
 * AddressSanitizer a cached buffer is poisoned (but for the list link in
 * its first bytes): a use after bufpool_put is reported as if it were freed.
 */
#include "bufpool.h"

#include <stdlib.h>

#if defined(__SANITIZE_ADDRESS__)
#define BUFPOOL_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define BUFPOOL_ASAN 1
#endif
#endif
#ifdef BUFPOOL_ASAN
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#define NCLASSES (BUFPOOL_MAX_SHIFT - BUFPOOL_MIN_SHIFT + 1)

struct freebuf {
	struct freebuf *next;
};

struct bufpool {
	struct freebuf *free[NCLASSES];
	size_t cached, limit;
	int used;	/* since the last bufpool_trim_idle */
};

static int
size_class(size_t size)
{
	int c = 0;
	while (((size_t)1 << (BUFPOOL_MIN_SHIFT + c)) < size)
		c++;
	return c;
}

struct bufpool *
bufpool_new(size_t cache_limit)
{
	struct bufpool *p = calloc(1, sizeof(*p));
	if (p)
		p->limit = cache_limit;
	return p;
}

void *
bufpool_get(struct bufpool *p, size_t size)
{
	if (size > BUFPOOL_MAX_SIZE)
		return NULL;
	if (size == 0)
		size = 1;
	int c = size_class(size);
	struct freebuf *b = p->free[c];
	p->used = 1;
	if (b) {
		p->free[c] = b->next;
		p->cached -= (size_t)1 << (BUFPOOL_MIN_SHIFT + c);
		UNPOISON(b, (size_t)1 << (BUFPOOL_MIN_SHIFT + c));
		return b;
	}
	void *buf;
	if (posix_memalign(&buf, BUFPOOL_ALIGN, (size_t)1 << (BUFPOOL_MIN_SHIFT + c)) != 0)
		return NULL;
	return buf;
}

void
bufpool_put(struct bufpool *p, void *buf, size_t size)
{
	if (!buf)
		return;
	if (size == 0)
		size = 1;
	int c = size_class(size);
	size_t bytes = (size_t)1 << (BUFPOOL_MIN_SHIFT + c);
	if (p->cached + bytes > p->limit) {
		free(buf);
		return;
	}
	struct freebuf *b = buf;
	b->next = p->free[c];
	p->free[c] = b;
	p->cached += bytes;
	POISON((char *)b + sizeof(*b), bytes - sizeof(*b));
}

void
bufpool_trim(struct bufpool *p)
{
	for (int c = 0; c < NCLASSES; c++) {
		while (p->free[c]) {
			struct freebuf *b = p->free[c];
			p->free[c] = b->next;
			UNPOISON(b, (size_t)1 << (BUFPOOL_MIN_SHIFT + c));
			free(b);
		}
	}
	p->cached = 0;
}

int
bufpool_trim_idle(struct bufpool *p)
{
	int idle = !p->used && p->cached;
	if (idle)
		bufpool_trim(p);
	p->used = 0;
	return idle;
}

size_t
bufpool_cached_bytes(const struct bufpool *p)
{
	return p->cached;
}

void
bufpool_free(struct bufpool *p)
{
	if (!p)
		return;
	bufpool_trim(p);
	free(p);
}
