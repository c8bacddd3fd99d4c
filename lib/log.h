/* Logging: one line per event, to stderr (foreground) or syslog. */
#ifndef TD_LOG_H
#define TD_LOG_H

#include <stdarg.h>
#include <stdint.h>

enum log_level { LOG_LVL_ERR, LOG_LVL_WARN, LOG_LVL_INFO, LOG_LVL_DEBUG };

void log_init(const char *ident, int use_syslog, enum log_level level);
int log_parse_level(const char *s, enum log_level *out);
void log_msg(enum log_level lvl, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

#define log_err(...) log_msg(LOG_LVL_ERR, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_LVL_WARN, __VA_ARGS__)
#define log_info(...) log_msg(LOG_LVL_INFO, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_LVL_DEBUG, __VA_ARGS__)

/*
 * A rate limit for messages a peer can provoke (a bad client, a bad guest):
 * at most `burst` lines per `interval` seconds, then one summary line.
 */
struct log_ratelimit {
	unsigned interval, burst;
	uint64_t window_start;
	unsigned printed, suppressed;
};
#define LOG_RATELIMIT_INIT { 5, 10, 0, 0, 0 }

void log_limited(struct log_ratelimit *rl, enum log_level lvl,
		 const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
