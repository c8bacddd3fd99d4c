/*
 * Aligned data buffers for requests, recycled by power-of-two size class so
 * the request path rarely calls the allocator. Alignment suits O_DIRECT.
 */
#ifndef TD_BUFPOOL_H
#define TD_BUFPOOL_H

#include <stddef.h>

#define BUFPOOL_ALIGN 4096
#define BUFPOOL_MIN_SHIFT 12		/* 4 KiB */
#define BUFPOOL_MAX_SHIFT 25		/* 32 MiB */
#define BUFPOOL_MAX_SIZE ((size_t)1 << BUFPOOL_MAX_SHIFT)

struct bufpool;

/* cache_limit: bytes of free buffers kept for reuse. */
struct bufpool *bufpool_new(size_t cache_limit);
void bufpool_free(struct bufpool *p);
/* Returns a buffer of at least size bytes (size <= BUFPOOL_MAX_SIZE) or NULL. */
void *bufpool_get(struct bufpool *p, size_t size);
void bufpool_put(struct bufpool *p, void *buf, size_t size);
/* Releases every cached buffer (when the server goes idle). */
void bufpool_trim(struct bufpool *p);
/* Trims if no buffer was taken since the last call; returns 1 if it trimmed. */
int bufpool_trim_idle(struct bufpool *p);
size_t bufpool_cached_bytes(const struct bufpool *p);

#endif
