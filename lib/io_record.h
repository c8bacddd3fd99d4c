/*
 * The power-loss recorder: an I/O observer (io_observe.h) that logs every
 * change the server makes to a file (writes with their data, fallocate,
 * truncate) and every sync, each as a submission and a completion, in the
 * order they happened, plus marks from the server (a flush acknowledged to
 * a client). tests/crash/replay.py rebuilds from this log the states a
 * power loss could leave the files in and checks each.
 *
 * Log format (docs/CRASH-REPLAY.md): the 8 bytes "TDIOREC1", then records,
 * each a 48-byte little-endian header
 *   u32 type (1 submit, 2 complete, 3 mark)  u32 kind (enum io_obs_kind)
 *   u64 id   i64 res (complete: bytes or -errno)
 *   u64 offset   u64 length   u32 mode   u32 name_len
 * followed by name_len bytes (the file's path, or the mark's text) and, for
 * a write's submission, length bytes of data. Reads are not logged.
 *
 * Threading: any thread; one lock orders the records. Testing only: a
 * recording server is slow and its log grows without bound.
 */
#ifndef TD_IO_RECORD_H
#define TD_IO_RECORD_H

/* Starts recording into path (created or truncated): 0 or -errno. Start-up only. */
int io_record_start(const char *path);
/* A mark in the log's order, e.g. "flush 3" (printf-style); no-op when not recording. */
void io_record_mark(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Writes out what is buffered and closes the log. */
void io_record_stop(void);

#endif
