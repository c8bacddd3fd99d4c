/* The backlog every listening socket asks for: the system's maximum. */
#ifndef TD_BACKLOG_H
#define TD_BACKLOG_H

/*
 * /proc/sys/net/core/somaxconn, read once per process; SOMAXCONN where it
 * cannot be read. Never less than SOMAXCONN.
 */
int listen_backlog(void);

#endif
