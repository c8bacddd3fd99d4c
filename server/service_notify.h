/*
 * Telling the service manager (systemd's Type=notify, through libsystemd's
 * sd_notify) how the server is: READY=1 once the control socket answers,
 * STATUS= with the number of vbds whenever it changes, STOPPING=1 when a
 * signal starts the shutdown. Without NOTIFY_SOCKET each call does nothing.
 *
 * Threading: the loop thread (the last STATUS sent is kept, to send only
 * changes).
 */
#ifndef TD_SERVICE_NOTIFY_H
#define TD_SERVICE_NOTIFY_H

void service_notify_ready(unsigned vbds);
void service_notify_status(unsigned vbds);
void service_notify_stopping(void);

#endif
