/*
 * Whole-file qcow2 operations with plain blocking I/O (the driver's open,
 * on a worker thread, and the live snapshot): creating an image, rebuilding
 * the refcounts of an image left dirty, clearing the header bits a writer
 * must clear, finding where a file's used clusters end, and telling a
 * backing file's format by its first bytes.
 */
#ifndef TD_QCOW2_FILE_H
#define TD_QCOW2_FILE_H

#include "qcow2_format.h"

/* Creates path (it must not exist) from c; the file is synced. */
int qcow2_file_create(const char *path, const struct qcow2_create *c, struct td_error *err);

/*
 * The dirty bit (lazy refcounts, or a writer that stopped without closing):
 * counts every reference, writes fresh refcount structures at the end of
 * the file, points the header at them and clears the bit. m is reloaded.
 */
int qcow2_file_repair(int fd, struct qcow2_meta *m, struct td_error *err);

/* Clears the autoclear bits (we keep none of their data up to date). */
int qcow2_file_clear_autoclear(int fd, struct qcow2_meta *m, struct td_error *err);

/* The end of the last cluster with a non-zero refcount (for block devices). */
int qcow2_file_used_end(int fd, const struct qcow2_meta *m, uint64_t *end,
			struct td_error *err);

/* "qcow2", "vhd", "vmdk" or "aio" for a backing file without backing_fmt. */
const char *qcow2_probe_format(const char *path);

/* A qcow2 child of the qcow2 at parent_path: "qcow2:child" in *params. */
int qcow2_create_child(const char *parent_path, const char *child_path, char **params,
		       struct td_error *err);

#endif
