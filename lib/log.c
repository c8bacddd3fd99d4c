/* Logging: level filter, stderr or syslog sink, per-source rate limits. */
#include "log.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <syslog.h>
#include <time.h>

static const char *log_ident = "tapdiskd";
static int log_syslog;
static enum log_level log_level = LOG_LVL_INFO;

static const char *const level_names[] = { "error", "warning", "info", "debug" };
static const int syslog_prio[] = { LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG };

void
log_init(const char *ident, int use_syslog, enum log_level level)
{
	log_ident = ident;
	log_syslog = use_syslog;
	log_level = level;
	if (use_syslog)
		openlog(ident, LOG_PID | LOG_NDELAY, LOG_DAEMON);
}

int
log_parse_level(const char *s, enum log_level *out)
{
	for (unsigned i = 0; i < sizeof(level_names) / sizeof(level_names[0]); i++) {
		if (strcasecmp(s, level_names[i]) == 0 ||
		    (i == LOG_LVL_WARN && strcasecmp(s, "warn") == 0) ||
		    (i == LOG_LVL_ERR && strcasecmp(s, "err") == 0)) {
			*out = (enum log_level)i;
			return 0;
		}
	}
	return -1;
}

static void
log_vmsg(enum log_level lvl, const char *fmt, va_list ap)
{
	if (lvl > log_level)
		return;
	if (log_syslog) {
		vsyslog(syslog_prio[lvl], fmt, ap);
		return;
	}
	char msg[1024];
	vsnprintf(msg, sizeof(msg), fmt, ap);
	fprintf(stderr, "%s: %s%s%s\n", log_ident,
		lvl <= LOG_LVL_WARN ? level_names[lvl] : "",
		lvl <= LOG_LVL_WARN ? ": " : "", msg);
}

void
log_msg(enum log_level lvl, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	log_vmsg(lvl, fmt, ap);
	va_end(ap);
}

static uint64_t
now_sec(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec;
}

void
log_limited(struct log_ratelimit *rl, enum log_level lvl, const char *fmt, ...)
{
	/* a message below the level would print nothing: it must not use up the burst */
	if (lvl > log_level)
		return;
	uint64_t now = now_sec();
	if (now - rl->window_start >= rl->interval) {
		if (rl->suppressed)
			log_msg(lvl, "%u similar messages suppressed", rl->suppressed);
		rl->window_start = now;
		rl->printed = 0;
		rl->suppressed = 0;
	}
	if (rl->printed >= rl->burst) {
		rl->suppressed++;
		return;
	}
	rl->printed++;
	va_list ap;
	va_start(ap, fmt);
	log_vmsg(lvl, fmt, ap);
	va_end(ap);
}
