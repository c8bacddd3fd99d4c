/* The server: one event loop, its I/O engine, the table of vbds by minor;
 * server_new() builds it for tapdiskd and the fuzz targets alike. */
#ifndef TD_SERVER_H
#define TD_SERVER_H

#include <sys/queue.h>
#include <sys/types.h>

#include "vbd.h"

#define SERVER_MAX_MINORS 4096

struct event_base;
struct control;
struct nbd_server;
struct qos_group;
struct metrics_http;

struct event;

/*
 * A kind of frontend (NBD, ...) as the server core sees it: told of each
 * vbd that opens, so that it can serve it (attaching a vbd_frontend), and
 * asked for its keys in a vbd's description. The core names no frontend: a
 * new one is a file that registers one of these (server_frontend_register).
 * blkif needs neither hook: xenstore, not an open, brings its rings.
 */
struct frontend_class {
	const char *name;
	/* Optional. A vbd opened: serve it. 0, or -errno with err (the open fails). */
	int (*vbd_opened)(void *state, struct vbd *vbd, char *err, size_t errlen);
	/* Optional. Adds its keys to the vbd's description (list, open's reply). */
	void (*vbd_info)(void *state, const struct vbd *vbd, json_t *info);
};
#define SERVER_MAX_FRONTENDS 4

struct server_frontend {
	const struct frontend_class *cls;
	void *state;
};

struct server {
	struct event_base *base;
	struct io_engine *io;
	struct bufpool *pool;
	char *state_dir;
	pid_t pid;
	unsigned open_flags;	/* TD_OPEN_* added to every open (e.g. NODIRECT) */
	struct vbd **minors;	/* SERVER_MAX_MINORS slots */
	struct vbd *zombies;	/* force-closed, waiting for their last I/O */
	struct nbd_server *nbd;
	struct control *ctl;
	LIST_HEAD(, qos_group) qos_groups;
	struct metrics_http *metrics;	/* --metrics-listen, or NULL */
	unsigned nbd_handshake_secs;	/* accept to transmission, at most */
	unsigned metrics_timeout_secs;	/* an HTTP client's idle time and request */
	int stopping;
	time_t started;
	struct event *idle_tick;	/* gives idle buffers back to the system */
	struct server_frontend frontends[SERVER_MAX_FRONTENDS];
	unsigned nr_frontends;
};

/* What server_new builds. Zero means the default or "none". */
struct server_config {
	const char *state_dir;		/* absolute and existing: NBD sockets go here */
	const char *io_engine;		/* "uring", "threads"; NULL: the best the kernel has */
	unsigned open_flags;		/* TD_OPEN_* added to every open */
	size_t pool_cache;		/* bytes of idle buffers the pool keeps (16 MiB) */
	unsigned nbd_handshake_secs;	/* 30 */
	unsigned metrics_timeout_secs;	/* 10 */
	const char *ctl_path;		/* the control socket; NULL: none */
	const char *nbd_listen;		/* --nbd-listen SPEC */
	const char *metrics_listen;	/* --metrics-listen HOST:PORT */
	int metrics_allow_remote;
};

/*
 * Builds a server on a new event loop: its I/O engine, buffer pool, NBD
 * server and the listeners the config names. NULL with err set (one line,
 * naming the part that failed) if any part fails; nothing is left behind.
 * The caller runs srv->base and adds signals, xenstore and vbds.
 */
struct server *server_new(const struct server_config *cfg, char *err, size_t errlen);
/*
 * Frees what server_new built and every vbd left in the table. The I/O
 * engine stays allocated if zombies still own I/O in the kernel.
 */
void server_free(struct server *srv);

struct vbd *server_vbd(struct server *srv, int minor);
int server_free_minor(struct server *srv);	/* lowest free minor, or -1 */
unsigned server_vbd_count(struct server *srv);
/* A vbd opened or closed: the service manager's STATUS follows. */
void server_vbds_changed(struct server *srv);
/* Every open vbd's statistics, {"vbds": [...]}: `stats` without a minor, GET /stats. */
json_t *server_stats_json(struct server *srv);
/* Adds a frontend kind; -ENOSPC past SERVER_MAX_FRONTENDS. */
int server_frontend_register(struct server *srv, const struct frontend_class *cls, void *state);

/*
 * Opens a vbd and tells every frontend kind (NBD makes its socket). done gets the
 * vbd's minor through the vbd table once it serves. -EMFILE at once if the
 * open would eat into the descriptors kept for control clients (fdlimit.h).
 */
int server_open_vbd(struct server *srv, int minor, const char *params,
		    unsigned flags, vbd_done_fn done, void *arg);

#endif
