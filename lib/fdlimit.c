/* The descriptor budget: see fdlimit.h. */
#include "fdlimit.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
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

int
fdlimit_check_open(void)
{
	unsigned long soft = fdlimit_soft();
	unsigned used = fdlimit_in_use();

	if (soft && used + FDLIMIT_RESERVE >= soft)
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
