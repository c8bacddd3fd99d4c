/* The descriptor budget: see fdlimit.h. */
#include "fdlimit.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static int spare_fd = -1;
/* every loop's listeners may shed at once: one spare, taken by one at a time */
static pthread_mutex_t spare_lock = PTHREAD_MUTEX_INITIALIZER;

static void
spare_take(void)
{
	if (spare_fd < 0)
		spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
}

int
fdlimit_init(unsigned long *before, unsigned long *after)
{
	struct rlimit rl;
	int rc = 0;

	if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
		return -errno;
	*before = (unsigned long)rl.rlim_cur;
	if (rl.rlim_cur < rl.rlim_max) {
		rlim_t old = rl.rlim_cur;
		rl.rlim_cur = rl.rlim_max;
		if (setrlimit(RLIMIT_NOFILE, &rl) < 0) {
			rc = -errno;
			rl.rlim_cur = old;
		}
	}
	*after = (unsigned long)rl.rlim_cur;
	spare_take();
	return rc;
}

void
fdlimit_fini(void)
{
	if (spare_fd >= 0)
		close(spare_fd);
	spare_fd = -1;
}

unsigned long
fdlimit_soft(void)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
		return 0;
	return (unsigned long)rl.rlim_cur;
}

/*
 * Exact, and cheap enough for every open: the directory read straight into
 * a stack buffer (opendir would allocate 32 KiB per call); a few
 * microseconds per thousand fds.
 */
unsigned
fdlimit_in_use(void)
{
	char buf[4096] __attribute__((aligned(8)));
	int fd = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	unsigned n = 0;
	long got;

	if (fd < 0)	/* no descriptor left even for this: all are in use */
		return errno == EMFILE ? (unsigned)fdlimit_soft() : 0;
	while ((got = syscall(SYS_getdents64, fd, buf, sizeof(buf))) > 0) {
		for (long off = 0; off < got; ) {
			struct dirent64 *de = (struct dirent64 *)(buf + off);
			if (de->d_name[0] != '.')
				n++;
			off += de->d_reclen;
		}
	}
	close(fd);
	return n ? n - 1 : 0;	/* the directory's own descriptor */
}

/*
 * Are the FDLIMIT_RESERVE + 1 highest numbers under the soft limit all
 * free? Then at least that many descriptors are, and an open leaves the
 * reserve: the kernel hands out the lowest free number, so that top stays
 * free until the table is nearly full. One poll() over those numbers (a
 * number that is not open comes back POLLNVAL), whatever the count of
 * descriptors; counting them took a /proc/self/fd read, tens of
 * microseconds for a few descriptors and milliseconds for thousands, on
 * every open.
 */
static int
top_is_free(unsigned long soft)
{
	struct pollfd p[FDLIMIT_RESERVE + 1];
	const int n = FDLIMIT_RESERVE + 1;

	if (soft <= (unsigned long)n || soft > INT_MAX)
		return 0;
	for (int i = 0; i < n; i++) {
		p[i].fd = (int)soft - 1 - i;
		p[i].events = 0;
		p[i].revents = 0;
	}
	if (poll(p, n, 0) != n)
		return 0;
	for (int i = 0; i < n; i++)
		if (p[i].revents != POLLNVAL)
			return 0;
	return 1;
}

int
fdlimit_check_open(void)
{
	unsigned long soft = fdlimit_soft();

	/* near the limit, or a descriptor up there (a dup2): count them */
	if (!soft || top_is_free(soft))
		return 0;
	if (fdlimit_in_use() + FDLIMIT_RESERVE >= soft)
		return -EMFILE;
	return 0;
}

void
fdlimit_message(char *buf, size_t len, const char *what)
{
	snprintf(buf, len,
		 "%s: out of file descriptors (%u in use of %lu, the last %u kept for control "
		 "clients): raise LimitNOFILE= (ulimit -n) or close vbds",
		 what, fdlimit_in_use(), fdlimit_soft(), FDLIMIT_RESERVE);
}

int
fdlimit_shed(int listen_fd, int err, const char *farewell)
{
	int fd;

	if (err != EMFILE && err != ENFILE)
		return -err;
	pthread_mutex_lock(&spare_lock);
	if (spare_fd < 0) {
		pthread_mutex_unlock(&spare_lock);
		return -err;
	}
	close(spare_fd);
	spare_fd = -1;
	fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
	if (fd >= 0) {
		if (farewell) {
			ssize_t w = write(fd, farewell, strlen(farewell));
			(void)w;
		}
		close(fd);
	}
	spare_take();
	pthread_mutex_unlock(&spare_lock);
	return 0;
}
