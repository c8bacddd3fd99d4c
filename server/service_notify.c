/* Notifications to the service manager: see service_notify.h. */
#include "service_notify.h"

#include <limits.h>
#include <string.h>

#include <systemd/sd-daemon.h>

#include "log.h"

static void
notify(const char *what, int rc)
{
	/* the service manager waits for READY; a failure to send is worth a line */
	if (rc < 0)
		log_warn("sd_notify %s: %s", what, strerror(-rc));
}

static unsigned last_vbds = UINT_MAX;

void
service_notify_ready(unsigned vbds)
{
	last_vbds = vbds;
	notify("READY", sd_notifyf(0, "READY=1\nSTATUS=serving %u vbd%s", vbds,
				   vbds == 1 ? "" : "s"));
}

void
service_notify_status(unsigned vbds)
{
	if (vbds == last_vbds)
		return;
	last_vbds = vbds;
	notify("STATUS", sd_notifyf(0, "STATUS=serving %u vbd%s", vbds, vbds == 1 ? "" : "s"));
}

void
service_notify_stopping(void)
{
	notify("STOPPING", sd_notify(0, "STOPPING=1\nSTATUS=stopping"));
}
