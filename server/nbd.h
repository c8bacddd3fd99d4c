/*
 * The NBD frontend: a UNIX socket per vbd (<state-dir>/nbd<pid>.<minor>,
 * serving the default export) and an optional listener serving every vbd
 * by export name (its minor number).
 */
#ifndef TD_NBD_H
#define TD_NBD_H

#include <stddef.h>

struct server;
struct vbd;
struct bufferevent;
struct nbd_server;

struct nbd_server *nbd_server_new(struct server *srv);
void nbd_server_free(struct nbd_server *ns);

/* spec: unix:PATH or tcp:HOST:PORT. */
int nbd_listen_global(struct nbd_server *ns, const char *spec, char *err, size_t errlen);
/* Creates the vbd's own socket; it goes away when the vbd closes. */
int nbd_export_vbd(struct nbd_server *ns, struct vbd *vbd, char *err, size_t errlen);
/* A vbd's own NBD socket: <state-dir>/nbd<pid>.<minor> (blktap's naming). */
char *nbd_vbd_path(const struct server *srv, int minor);
/* Stops accepting new connections everywhere (shutdown). */
void nbd_stop_listening(struct nbd_server *ns);
unsigned nbd_connection_count(const struct nbd_server *ns);

/*
 * Serves one client on an existing bufferevent (the fuzz target's entry).
 * vbd: the default export, or NULL to look exports up by name.
 */
void nbd_serve(struct nbd_server *ns, struct bufferevent *bev, struct vbd *vbd);

#endif
