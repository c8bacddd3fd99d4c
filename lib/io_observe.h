/*
 * Observers of what the server does to its files: every I/O op the engine
 * is given (io_submit .. io_op_complete) and every blocking file call a
 * driver makes (lib/file_calls.h). The power-loss recorder (io_record.h)
 * is one; a fault injector may be another. Because both paths report here,
 * nothing a driver writes, truncates, punches or syncs escapes them.
 *
 * Observers are installed at start, before any loop or worker runs, and
 * stay until exit; with none installed each call site costs one branch.
 *
 * Threading: begin/end are called from loop threads and worker threads at
 * once; an observer locks for itself.
 */
#ifndef TD_IO_OBSERVE_H
#define TD_IO_OBSERVE_H

#include <stdint.h>
#include <sys/uio.h>

enum io_obs_kind {
	IO_OBS_READ,
	IO_OBS_WRITE,
	IO_OBS_FDATASYNC,
	IO_OBS_FSYNC,
	IO_OBS_FALLOCATE,	/* mode: FALLOC_FL_*; offset, length */
	IO_OBS_TRUNCATE,	/* length: the new size */
};

struct io_obs_event {
	enum io_obs_kind kind;
	int fd;
	int mode;
	uint64_t offset, length;
	const struct iovec *iov;	/* READ/WRITE: the data, valid in begin only */
	int iovcnt;
	uint64_t id;			/* one per event, from 1, given before begin */
};

struct io_observer {
	/*
	 * Before the call. 0: let it run; -errno: fail it with that instead.
	 * A WRITE may also be made short (a disk filling up under it): n > 0,
	 * less than its length, writes only its first n bytes and then fails
	 * the call with -ENOSPC. Every observer's end then sees -ENOSPC, so a
	 * failed write is one whose data may have landed in part, as on a
	 * real disk.
	 */
	int (*begin)(struct io_observer *o, const struct io_obs_event *ev);
	/* After it: res is what the caller sees (bytes or 0, or -errno). */
	void (*end)(struct io_observer *o, const struct io_obs_event *ev, int res);
};

#define IO_MAX_OBSERVERS 4

/* 0, or -ENOSPC when IO_MAX_OBSERVERS are installed. Start-up only. */
int io_observer_add(struct io_observer *o);

extern int io_observed;		/* any observer installed */

/*
 * Gives ev its id and asks every observer: 0; or the first -errno (the
 * call must not run); or, for a WRITE, n > 0: the smallest short length
 * asked (write n bytes, then end the call with -ENOSPC).
 */
int io_obs_begin(struct io_obs_event *ev);
void io_obs_end(const struct io_obs_event *ev, int res);

#endif
