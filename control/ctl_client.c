/* Control socket client: blocking, which is right for a command-line tool. */
#include "ctl_client.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define CTL_MAX_RESPONSE (64 << 20)

const char *
ctl_state_dir(const char *explicit_dir)
{
	const char *env = getenv("TAPDISKD_STATE_DIR");
	if (explicit_dir)
		return explicit_dir;
	return env && *env ? env : CTL_DEFAULT_STATE_DIR;
}

int
ctl_connect(const char *state_dir, char *err, size_t errlen)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd;

	if ((size_t)snprintf(sa.sun_path, sizeof(sa.sun_path), "%s/ctl.sock", state_dir) >=
	    sizeof(sa.sun_path)) {
		snprintf(err, errlen, "%s/ctl.sock: path too long", state_dir);
		return -1;
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		snprintf(err, errlen, "socket: %s", strerror(errno));
		return -1;
	}
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int e = errno;
		snprintf(err, errlen, "cannot reach tapdiskd at %s: %s%s", sa.sun_path,
			 strerror(e), (e == ENOENT || e == ECONNREFUSED) ?
			 " (is tapdiskd running? -S or TAPDISKD_STATE_DIR choose its state dir)" : "");
		close(fd);
		return -1;
	}
	return fd;
}

static int
write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

/*
 * Reads up to the first newline; returns the line without it (malloc'd).
 * Peeks first so that nothing past the newline is consumed, a chunk at a
 * time: tap-ctl top reads large stats replies every second.
 */
static char *
read_line(int fd, char *err, size_t errlen)
{
	size_t len = 0, cap = 4096;
	char *buf = malloc(cap);

	while (buf) {
		if (len + 1 >= cap) {
			if (cap >= CTL_MAX_RESPONSE) {
				snprintf(err, errlen, "response too long");
				break;
			}
			char *nb = realloc(buf, cap * 2);
			if (!nb)
				break;
			buf = nb;
			cap *= 2;
		}
		ssize_t n = recv(fd, buf + len, cap - len - 1, MSG_PEEK);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			snprintf(err, errlen, "tapdiskd closed the connection%s%s",
				 n < 0 ? ": " : " without answering", n < 0 ? strerror(errno) : "");
			break;
		}
		char *nl = memchr(buf + len, '\n', (size_t)n);
		size_t take = nl ? (size_t)(nl - (buf + len)) + 1 : (size_t)n;
		if (recv(fd, buf + len, take, 0) != (ssize_t)take) {
			snprintf(err, errlen, "reading from tapdiskd: %s", strerror(errno));
			break;
		}
		len += take;
		if (nl) {
			buf[len - 1] = '\0';
			return buf;
		}
	}
	free(buf);
	return NULL;
}

json_t *
ctl_call(int fd, const char *cmd, json_t *args, char **raw, char *err, size_t errlen)
{
	json_t *req = json_pack("{s:i, s:s, s:o}", "id", 1, "cmd", cmd,
				"args", args ? args : json_object());
	char *s = req ? json_dumps(req, JSON_COMPACT) : NULL;
	json_t *resp = NULL;
	json_error_t jerr;

	json_decref(req);
	if (!s) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	if (write_all(fd, s, strlen(s)) < 0 || write_all(fd, "\n", 1) < 0) {
		snprintf(err, errlen, "cannot send to tapdiskd: %s", strerror(errno));
		free(s);
		return NULL;
	}
	free(s);
	char *line = read_line(fd, err, errlen);
	if (!line)
		return NULL;
	resp = json_loads(line, 0, &jerr);
	if (!resp || !json_is_object(resp)) {
		snprintf(err, errlen, "tapdiskd sent an invalid response: %s", jerr.text);
		json_decref(resp);
		free(line);
		return NULL;
	}
	if (raw)
		*raw = line;
	else
		free(line);
	return resp;
}
