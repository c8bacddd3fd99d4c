/* Client side of the control socket: connect, one request, one response. */
#ifndef TD_CTL_CLIENT_H
#define TD_CTL_CLIENT_H

#include <stddef.h>

#include <jansson.h>

#define CTL_DEFAULT_STATE_DIR "/run/tapdiskd"

/* The state dir: explicit, else $TAPDISKD_STATE_DIR, else the default. */
const char *ctl_state_dir(const char *explicit_dir);
/* Returns a connected fd or -1 with err set. */
int ctl_connect(const char *state_dir, char *err, size_t errlen);
/*
 * Sends {"id":1,"cmd":cmd,"args":args} (args stolen, may be NULL) and reads
 * the response line. Returns the parsed response, or NULL with err set.
 * *raw, if given, gets the response line as received (malloc'd).
 */
json_t *ctl_call(int fd, const char *cmd, json_t *args, char **raw, char *err,
		 size_t errlen);

#endif
