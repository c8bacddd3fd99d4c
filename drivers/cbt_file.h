/*
 * A CBT log file as a whole (cbt_format.h for the bytes): made, opened
 * and checked, its header and bitmap read and written, grown. For cbt-util
 * and for the server's open and close of a vbd's log (server/cbt.c), which
 * then writes bitmap bytes through its loop's I/O engine.
 *
 * Threading: blocking; workers or offline tools, never a loop.
 * Errors: -errno, with one line for a person in err where there is one.
 */
#ifndef TD_CBT_FILE_H
#define TD_CBT_FILE_H

#include <stddef.h>
#include <stdint.h>

#include "cbt_format.h"

struct cbt_file {
	int fd;
	int rdonly;
	struct cbt_header h;
	uint8_t *bitmap;	/* cbt_bitmap_bytes(h.size) bytes */
};

/* A new log for a disk of size bytes: zero UUIDs, flag 0, an empty bitmap (replaces path). */
int cbt_file_create(const char *path, uint64_t size, char *err, size_t errlen);
/* Opens and checks path; reads the header and the bitmap. */
int cbt_file_open(const char *path, int rdonly, struct cbt_file *f, char *err, size_t errlen);
/* Writes the header (f->h) / bitmap bytes [off, off + len) of f->bitmap. */
int cbt_file_write_header(struct cbt_file *f);
int cbt_file_write_bitmap(struct cbt_file *f, uint64_t off, uint64_t len);
int cbt_file_sync(struct cbt_file *f);
/*
 * The disk grew to size: the bitmap grows with clear bits, made durable
 * before the header names the new size (a crash between leaves the old,
 * still valid, log). -EINVAL if size is smaller than the log's.
 */
int cbt_file_grow(struct cbt_file *f, uint64_t size, char *err, size_t errlen);
/* Closes the fd and frees the bitmap; f can be opened again. */
void cbt_file_close(struct cbt_file *f);

#endif
