/* Listening UNIX stream sockets at a path (control socket, NBD sockets). */
#ifndef TD_UNIXSOCK_H
#define TD_UNIXSOCK_H

#include <stddef.h>
#include <sys/types.h>

/* Returns a non-blocking listening fd bound to path with mode, or -errno. */
int unixsock_listen(const char *path, mode_t mode, char *err, size_t errlen);
/* Credentials of a connected peer: 0 or -errno. */
int unixsock_peer_uid(int fd, uid_t *uid, pid_t *pid);

#endif
