/*
 * The NBD frontend: a UNIX socket per vbd (<state-dir>/nbd<pid>.<minor>,
 * serving the default export) and an optional listener serving every vbd
 * by export name (its minor number).
 *
 * Threads: one nbd_server per loop, used only on that loop. A vbd's socket
 * and connections are on the vbd's loop; the shared listener is on loop 0,
 * and a connection there moves to the loop of the export an option names
 * (GO, INFO, EXPORT_NAME, meta contexts) before that option is processed.
 */
#ifndef TD_NBD_H
#define TD_NBD_H

#include <stddef.h>

struct server;
struct vbd;
struct bufferevent;
struct nbd_server;

struct loop;
struct nbd_server *nbd_server_new(struct server *srv, struct loop *loop);
void nbd_server_free(struct nbd_server *ns);

/* spec: unix:PATH or tcp:HOST:PORT. */
int nbd_listen_global(struct nbd_server *ns, const char *spec, char *err, size_t errlen);
/* Creates the vbd's own socket; it goes away when the vbd closes. */
int nbd_export_vbd(struct nbd_server *ns, struct vbd *vbd, char *err, size_t errlen);
/* A vbd's own NBD socket: <state-dir>/nbd<pid>.<minor> (blktap's naming). */
char *nbd_vbd_path(const struct server *srv, int minor);
/*
 * Lowers ns's per-connection limits (requests in flight, bytes of unsent
 * replies and request buffers, unread option replies, and the write payload
 * size from which a socket's payload is read straight into the request) for
 * connections it accepts from now on: the fuzz target reaches them with
 * short inputs. The enforcing code is the same at any size; 0 means 1.
 */
void nbd_set_limits(struct nbd_server *ns, unsigned max_inflight, size_t max_output,
		    size_t max_hs_output, size_t direct_payload);
/* Stops accepting new connections on ns's loop (shutdown). */
void nbd_stop_listening(struct nbd_server *ns);
/* Connections on every loop. */
unsigned nbd_connection_count(struct server *srv);

/*
 * Serves one client on an existing bufferevent (the fuzz target's entry).
 * vbd: the default export, or NULL to look exports up by name.
 */
void nbd_serve(struct nbd_server *ns, struct bufferevent *bev, struct vbd *vbd);

#endif
