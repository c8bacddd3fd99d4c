/*
 * Fault injection, for testing only (tapdiskd --fault-injection): an I/O
 * observer (io_observe.h) that fails the nth I/O it is given from the
 * moment it is armed, counting engine ops and blocking file calls alike,
 * optionally only those of some kinds and only on files whose path
 * contains a given string. The fault is an errno (EIO, ENOSPC, or a
 * transient EAGAIN/EBUSY/EINTR), or a short write (the write's first part
 * lands, then it fails with ENOSPC), for count matching I/Os in a row.
 * Arming again replaces what was armed; the counters say what happened.
 *
 * Threading: any thread (one lock); the observer sees loop and worker
 * threads at once. Unarmed, each I/O costs one atomic load.
 */
#ifndef TD_IO_FAULT_H
#define TD_IO_FAULT_H

#include <stdint.h>

/* Kinds of I/O a fault may be limited to (0: every kind). */
#define IO_FAULT_READ		0x01
#define IO_FAULT_WRITE		0x02
#define IO_FAULT_SYNC		0x04	/* fdatasync, fsync */
#define IO_FAULT_FALLOCATE	0x08
#define IO_FAULT_TRUNCATE	0x10

#define IO_FAULT_PATH_MAX 256

struct io_fault_spec {
	uint64_t nth;		/* the nth matching I/O from now fails first (1: the next) */
	unsigned count;		/* so many matching I/Os in a row fail (0 is taken as 1) */
	unsigned kinds;		/* IO_FAULT_* */
	char path[IO_FAULT_PATH_MAX];	/* a part of the file's path; "": any file */
	int err;		/* the positive errno to fail with */
	int short_write;	/* a write lands in part, then ENOSPC (other kinds: ENOSPC) */
};

struct io_fault_status {
	int enabled;		/* io_fault_enable was called */
	int armed;		/* faults still to come */
	struct io_fault_spec spec;	/* the last armed */
	uint64_t seen;		/* matching I/Os since it was armed */
	uint64_t injected;	/* faults since it was armed */
	uint64_t total;		/* faults since the start */
	/* the last fault injected, if total > 0 */
	unsigned last_kind;	/* IO_FAULT_* */
	uint64_t last_offset, last_length;
	char last_path[IO_FAULT_PATH_MAX];
};

/* Installs the observer, disarmed. Start-up only; 0, or -errno. */
int io_fault_enable(void);
/* Arms spec (replacing what was armed). -EINVAL if not enabled. */
int io_fault_arm(const struct io_fault_spec *spec);
/* Nothing more is injected; the status still tells what was armed and done. */
void io_fault_disarm(void);
void io_fault_get_status(struct io_fault_status *st);

/* "read" ... "truncate" for one IO_FAULT_* bit. */
const char *io_fault_kind_name(unsigned kind);
/* Parses "read,write,...": 0 and *kinds, or -EINVAL naming nothing known. */
int io_fault_parse_kinds(const char *list, unsigned *kinds);

#endif
