/*
 * The server: its loops (loop.h), the table of vbds by minor, the frontend
 * kinds; server_new() builds it for tapdiskd and the fuzz targets alike.
 *
 * Threads: the table (minors, closed, each loop's nr_vbds, nr_open) is
 * guarded by srv->lock, taken only off the request path (open, close,
 * lookups by control and the hand-offs). A vbd found in the table may be
 * used only on its own loop (vbd->loop): that loop alone frees it.
 */
#ifndef TD_SERVER_H
#define TD_SERVER_H

#include <sys/queue.h>
#include <pthread.h>
#include <sys/types.h>

#include "vbd.h"

#define SERVER_MAX_MINORS 4096
#define SERVER_MAX_LOOPS 16

struct event_base;
struct control;
struct nbd_server;
struct qos_group;
struct metrics_http;
struct tls_creds;

struct event;

/*
 * A kind of frontend (NBD, ...) as the server core sees it: told of each
 * vbd that opens, so that it can serve it (attaching a vbd_frontend), and
 * asked for its keys in a vbd's description. The core names no frontend: a
 * new one is a file that registers one of these (server_frontend_register).
 * blkif needs neither hook: xenstore, not an open, brings its rings. Both
 * hooks run on the vbd's loop.
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

struct loop;

struct server {
	struct event_base *base;	/* loop 0's: control, metrics, xenstore, signals */
	struct loop *loops[SERVER_MAX_LOOPS];
	unsigned nr_loops;
	char *state_dir;
	pid_t pid;
	unsigned open_flags;	/* TD_OPEN_* added to every open (e.g. NODIRECT) */
	pthread_mutex_t lock;	/* the table: minors, closed, nr_open, loops' nr_vbds */
	struct vbd **minors;	/* SERVER_MAX_MINORS slots: vbds opening, open or closing */
	unsigned char *closed;	/* SERVER_MAX_MINORS: a minor kept after a close (list shows it) */
	/* minors from here on are in neither table: scans stop here (set under lock) */
	_Atomic unsigned minor_end;
	unsigned nr_open;	/* vbds with a chain (open or paused) */
	_Atomic unsigned nr_conns;	/* NBD connections on every loop */
	_Atomic unsigned nr_zombies;	/* force-closed vbds on every loop, I/O still out */
	struct control *ctl;
	LIST_HEAD(, qos_group) qos_groups;
	struct metrics_http *metrics;	/* --metrics-listen, or NULL */
	unsigned nbd_handshake_secs;	/* accept to transmission, at most */
	unsigned metrics_timeout_secs;	/* an HTTP client's idle time and request */
	_Atomic int stopping;	/* read on every loop */
	time_t started;
	struct server_frontend frontends[SERVER_MAX_FRONTENDS];
	unsigned nr_frontends;
	struct tls_creds *tls;	/* --tls-creds/--tls-psk, read-only on every loop; or NULL */
	int tls_mode;		/* enum tls_mode: the shared NBD listener's */
	int nbd_allow_insecure;	/* a non-loopback TCP listener without --tls require */
};

/* What server_new builds. Zero means the default or "none". */
struct server_config {
	const char *state_dir;		/* absolute and existing: NBD sockets go here */
	const char *io_engine;		/* "uring", "threads"; NULL: the best the kernel has */
	unsigned loops;			/* event loops (threads); 0: 1 */
	unsigned open_flags;		/* TD_OPEN_* added to every open */
	size_t pool_cache;		/* bytes of idle buffers each loop's pool keeps (16 MiB) */
	unsigned nbd_handshake_secs;	/* 30 */
	unsigned metrics_timeout_secs;	/* 10 */
	const char *ctl_path;		/* the control socket; NULL: none */
	const char *nbd_listen;		/* --nbd-listen SPEC */
	const char *metrics_listen;	/* --metrics-listen HOST:PORT */
	int metrics_allow_remote;
	const char *tls_creds;		/* --tls-creds DIR (x509) */
	const char *tls_psk;		/* --tls-psk FILE */
	int tls_verify_peer;		/* --tls-verify-peer */
	int tls_mode;			/* enum tls_mode; -1: require with credentials, else off */
	int nbd_allow_insecure;		/* --nbd-allow-insecure */
};

/*
 * Builds a server: its loops (each with its I/O engine, buffer pool and
 * NBD state; every loop but 0 on a thread of its own, started here), and
 * the listeners the config names. NULL with err set (one line, naming the
 * part that failed) if any part fails; nothing is left behind. The caller
 * runs srv->base (loop 0, on its own thread) and adds signals, xenstore
 * and vbds.
 */
struct server *server_new(const struct server_config *cfg, char *err, size_t errlen);
/*
 * Stops the loops' threads, then frees what server_new built and every vbd
 * left in the table. A loop's I/O engine stays allocated if zombies still
 * own I/O in the kernel.
 */
void server_free(struct server *srv);

/*
 * The vbd at minor, or NULL. Only on the vbd's own loop may the result be
 * used: elsewhere, use server_vbd_loop and post to it.
 */
struct vbd *server_vbd(struct server *srv, int minor);
/* The loop minor's vbd lives on, or NULL if there is none. */
struct loop *server_vbd_loop(struct server *srv, int minor);
/* A minor closed and kept (tapdisk's "allocated" minor): list shows it. */
int server_minor_closed(struct server *srv, int minor);
/* Lets a closed minor go (destroy): 0, or -ENOENT if it is not a closed one. */
int server_release_closed(struct server *srv, int minor);
int server_free_minor(struct server *srv);	/* lowest free minor, or -1 */
/* srv->lock held: minor is now in a table (a vbd, or closed and kept). */
void server_minor_used_locked(struct server *srv, int minor);
/* srv->lock held: a minor left both tables; minor_end comes down past free ones. */
void server_minor_freed_locked(struct server *srv);
unsigned server_vbd_count(struct server *srv);	/* open or paused */
unsigned server_vbds_left(struct server *srv);	/* in the table, whatever their state */
/* Where a new vbd goes: the loop with the fewest vbds, lowest index on a tie. */
struct loop *server_place(struct server *srv);
/* The loop numbered index, or NULL. */
struct loop *server_loop(struct server *srv, int index);
/* A vbd opened or closed: the service manager's STATUS follows. */
void server_vbds_changed(struct server *srv);
/*
 * Every open vbd's document, made on its own loop (no torn counters): done
 * gets {"vbds": [...]} in minor order, on the calling loop. doc makes one
 * vbd's document on the vbd's loop (NULL: leave the vbd out); 0 or -ENOMEM.
 */
typedef json_t *(*server_doc_fn)(struct vbd *vbd, void *arg);
int server_gather(struct server *srv, server_doc_fn doc, void *doc_arg,
		  void (*done)(json_t *all, void *arg), void *arg);
/* server_gather's doc for stats; arg: NULL, or non-NULL to reset after. */
json_t *server_stats_doc(struct vbd *vbd, void *arg);
/* Adds a frontend kind; -ENOSPC past SERVER_MAX_FRONTENDS. */
int server_frontend_register(struct server *srv, const struct frontend_class *cls, void *state);

/* How server_open_vbd opens a vbd, beyond its params. */
struct vbd_open_opts {
	unsigned flags;		/* VBD_OPEN_* */
	unsigned timeout;	/* seconds a request may take, or 0: VBD_DEFAULT_TIMEOUT */
	const char *cbt_log;	/* track changed blocks in this CBT log, or NULL */
};

/*
 * Opens a vbd on loop (NULL: placed by server_place), as opts says (NULL:
 * the defaults), and tells every
 * frontend kind (NBD makes its socket). done runs on the vbd's loop once it
 * serves (or failed), and may use the vbd there (server_vbd). -EBUSY at once
 * if the minor is taken, -EMFILE if the open would eat into the descriptors
 * kept for control clients (fdlimit.h).
 */
int server_open_vbd(struct server *srv, int minor, struct loop *loop, const char *params,
		    const struct vbd_open_opts *opts, vbd_done_fn done, void *arg);

/*
 * Runs op(vbd, done', arg') on the loop of minor's vbd; done(arg, err, msg)
 * then runs on the calling loop (ENOENT if the minor has no open vbd by
 * then). op_arg goes to op. 0 or -ENOMEM.
 */
typedef void (*server_vbd_op_fn)(struct vbd *vbd, void *op_arg, vbd_done_fn done, void *arg);
int server_vbd_op(struct server *srv, int minor, server_vbd_op_fn op, void *op_arg,
		  vbd_done_fn done, void *arg);

#endif
