/*
 * The listen() backlog. A burst of connections (a host starting many
 * guests, each opening its disks) must wait in the kernel's queue, not be
 * refused: 128 filled at once. The kernel caps a backlog at somaxconn, so
 * asking for somaxconn itself takes the most the system allows.
 */
#include "backlog.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#define SOMAXCONN_PATH "/proc/sys/net/core/somaxconn"

static int
read_somaxconn(void)
{
	char buf[32];
	int fd = open(SOMAXCONN_PATH, O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = '\0';
	char *end;
	long v = strtol(buf, &end, 10);
	if (end == buf || v <= 0 || v > 0x7fffffff)
		return -1;
	return (int)v;
}

int
listen_backlog(void)
{
	/* once: sockets are made at every vbd open; loops may race here harmlessly */
	static _Atomic int cached;
	int v = cached;

	if (!v) {
		v = read_somaxconn();
		if (v < SOMAXCONN)
			v = SOMAXCONN;
		cached = v;
	}
	return v;
}
