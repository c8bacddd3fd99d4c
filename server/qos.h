/*
 * Per-vbd QoS: requests wait in per-frontend queues until the vbd's token
 * buckets (and its group's) admit them; frontends of one vbd take turns,
 * and the members of a group share its limits by weight (deficit round
 * robin). A vbd without limits or group has no QoS state at all.
 */
#ifndef TD_QOS_H
#define TD_QOS_H

#include <stddef.h>

#include <jansson.h>

struct server;
struct vbd;
struct vbd_request;

/* The vbd has QoS state: requests go through qos_submit. */
void qos_submit(struct vbd *vbd, struct vbd_request *vr);

/*
 * Sets a vbd's limits, group and weight from obj (merged over the current
 * ones; "group": "" leaves the group). On error nothing changes and err
 * names the field. Queued requests are re-examined at once, never dropped.
 */
int qos_vbd_set(struct vbd *vbd, json_t *obj, char *err, size_t errlen);
/* Only checks obj as qos_vbd_set would take it (open --qos, before opening). */
int qos_vbd_check(json_t *obj, char *err, size_t errlen);
json_t *qos_vbd_get(const struct vbd *vbd);	/* limits, group, weight, stats */
json_t *qos_vbd_stats_json(const struct vbd *vbd);
void qos_vbd_stats_reset(struct vbd *vbd);
/* Pause: the queued requests go back to the vbd's pause queue, oldest first. */
void qos_vbd_requeue(struct vbd *vbd);
/* Close: as requeue, then the vbd's QoS state is freed. */
void qos_vbd_close(struct vbd *vbd);
/* Unpause or reopen: queued requests may go again. */
void qos_vbd_resume(struct vbd *vbd);

int qos_group_set(struct server *srv, const char *name, json_t *obj, char *err, size_t errlen);
/*
 * A group lives on one loop with all its members: qos_vbd_set refuses a
 * vbd on another loop (-EXDEV, and says so). qos_group_set and
 * qos_group_get run on the group's loop (qos_group_loop; a new group is
 * made on the calling loop).
 */
struct loop;
struct loop *qos_group_loop(struct server *srv, const char *name);	/* NULL: none */
/* NULL if there is no such group (on this loop). */
json_t *qos_group_get(struct server *srv, const char *name);
void qos_groups_free(struct server *srv);

#endif
