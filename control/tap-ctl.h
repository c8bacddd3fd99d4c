/*
 * What tap-ctl's commands share: the command line's state and the helpers
 * that print one error line and exit. Commands in their own file (top.c)
 * include this.
 */
#ifndef TD_TAP_CTL_H
#define TD_TAP_CTL_H

#include <getopt.h>

#include <jansson.h>

struct cli {
	const char *state_dir;
	int json;		/* print raw responses */
	long pid;		/* -p: must match the server's, or -1 */
	int fd;
};

void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
void usage_die(const char *usage) __attribute__((noreturn));
long parse_int(const char *s, const char *what);
void cli_connect(struct cli *cli);
/* Runs one command; exits on error. Returns the result (a reference). */
json_t *cli_call(struct cli *cli, const char *cmd, json_t *args);
void check_pid(struct cli *cli);
/* getopt_long over a command's own arguments (longopts may be NULL); -p is common to all. */
int next_opt(struct cli *cli, int argc, char **argv, const char *opts,
	     const struct option *longopts);

int cmd_top(struct cli *cli, int argc, char **argv);

#endif
