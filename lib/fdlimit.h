/*
 * The descriptor budget. A vbd holds about three descriptors, so a host
 * with thousands of vbds needs far more than the usual soft limit of 1024:
 * the server raises its soft RLIMIT_NOFILE to the hard limit at start. A
 * vbd open that would leave fewer than FDLIMIT_RESERVE descriptors is
 * refused (EMFILE), so the control socket and the metrics endpoint keep
 * working when opens no longer do. And when accept() fails for want of a
 * descriptor anyway (NBD clients took them), a listener sheds the waiting
 * connection through one spare descriptor instead of firing forever.
 *
 * Threading: the loop thread only. Errors: -errno.
 */
#ifndef TD_FDLIMIT_H
#define TD_FDLIMIT_H

#include <stddef.h>

#define FDLIMIT_RESERVE 16	/* descriptors a vbd open must leave free */

/*
 * Raises the soft limit to the hard one and keeps the spare descriptor.
 * *before and *after get the soft limit as it was and as it is. 0 or
 * -errno (the limit stays as it was; the server runs on).
 */
int fdlimit_init(unsigned long *before, unsigned long *after);
void fdlimit_fini(void);

/* Descriptors open in this process, and the soft limit. */
unsigned fdlimit_in_use(void);
unsigned long fdlimit_soft(void);

/* -EMFILE if a vbd open now would eat into the reserve, else 0. */
int fdlimit_check_open(void);

/* The one line an operator reads when descriptors ran out, for `what`. */
void fdlimit_message(char *buf, size_t len, const char *what);

/*
 * For a listener whose accept() failed with err: if it failed for want of
 * descriptors, gives up the spare one, accepts the waiting connection,
 * writes farewell to it (if not NULL: best effort, the peer is let go
 * anyway), closes it and takes the spare again. 0, or -err when it was
 * not for want of descriptors or no spare is left.
 */
int fdlimit_shed(int listen_fd, int err, const char *farewell);

#endif
