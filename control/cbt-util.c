/*
 * cbt-util: the offline tool for changed-block-tracking logs
 * (docs/CBT-LOG.md), with blktap's command names, flags and output
 * formats. Stricter than blktap's: a damaged log, a malformed UUID or
 * number is refused, never misread. Every error is one line on stderr,
 * "cbt-util: ...", exit 1 (2 for a bad command line); the command list
 * for no or an unknown command goes to stdout, as blktap's did.
 */
#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uuid/uuid.h>

#include "cbt_file.h"

enum { EXIT_USAGE = 2 };

struct command {
	const char *name;
	int (*fn)(int, char **);
	const char *synopsis;	/* after "cbt-util NAME " */
	const char *options;	/* the option lines of NAME -h */
	const char *help;	/* the one line of the command list */
};

static const struct command *cmd;

/* The one line of an error: a newline in a path or an argument shows as '?'. */
static void __attribute__((format(printf, 2, 3), noreturn))
quit(int status, const char *fmt, ...)
{
	char line[1024];
	va_list ap;

	fflush(stdout);
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	for (char *p = line; *p; p++)
		if ((unsigned char)*p < ' ' || *p == 0x7f)
			*p = '?';
	fprintf(stderr, "cbt-util: %s%s%s\n", cmd ? cmd->name : "", cmd ? ": " : "", line);
	exit(status);
}

#define die(...)	quit(EXIT_FAILURE, __VA_ARGS__)

/* A bad command line: what is wrong and the command's synopsis, on one line. */
static void __attribute__((noreturn))
usage_error(const char *what)
{
	quit(EXIT_USAGE, "%s; usage: cbt-util %s %s", what, cmd->name, cmd->synopsis);
}

/*
 * getopt over a command's arguments with our own messages; returns -1 at
 * the end. -h prints the command's help and exits 0.
 */
static int
next_opt(int argc, char **argv, const char *optstring)
{
	char what[64];
	int c = getopt(argc, argv, optstring);

	if (c == 'h') {
		printf("usage: cbt-util %s %s\n\noptions:\n%s", cmd->name, cmd->synopsis, cmd->options);
		exit(EXIT_SUCCESS);
	}
	if (c == ':') {
		snprintf(what, sizeof(what), "-%c needs an argument", optopt);
		usage_error(what);
	}
	if (c == '?') {
		if (optopt > ' ' && optopt != '-' && optopt < 0x7f)
			snprintf(what, sizeof(what), "unknown option -%c", optopt);
		else
			snprintf(what, sizeof(what), "unknown option (they are single letters)");
		usage_error(what);
	}
	if (c == -1 && optind != argc) {
		snprintf(what, sizeof(what), "unexpected argument '%.40s'", argv[optind]);
		usage_error(what);
	}
	return c;
}

/* A size in bytes: decimal digits only, 1 to CBT_MAX_DISK. */
static uint64_t
parse_size(const char *s)
{
	unsigned long long v = 0;
	char *end = NULL;

	errno = 0;
	if (*s >= '0' && *s <= '9')
		v = strtoull(s, &end, 10);
	if (!end || *end || errno || v == 0 || v > CBT_MAX_DISK)
		die("-s: '%s' is not a disk size (bytes, 1 to %llu)", s,
		    (unsigned long long)CBT_MAX_DISK);
	return v;
}

static void
parse_uuid(const char *s, const char *opt, uint8_t out[16])
{
	if (uuid_parse(s, out) < 0)
		die("%s: '%s' is not a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx, hex)", opt, s);
}

static void
open_log(const char *path, int rdonly, struct cbt_file *f)
{
	char err[512];

	if (cbt_file_open(path, rdonly, f, err, sizeof(err)) < 0)
		die("%s", err);
}

/* Nothing has failed unseen on the way to stdout (a full disk, a closed pipe). */
static void
flush_stdout(void)
{
	if (fflush(stdout) == EOF || ferror(stdout))
		die("writing to standard output: %s", strerror(errno ? errno : EIO));
}

static void
synced(const char *path, int rc)
{
	if (rc < 0)
		die("%s: %s", path, strerror(-rc));
}

/* ---- create ---- */

static int
cmd_create(int argc, char **argv)
{
	const char *name = NULL;
	uint64_t size = 0;
	char err[512];
	int c;

	while ((c = next_opt(argc, argv, ":n:s:h")) != -1) {
		switch (c) {
		case 'n': name = optarg; break;
		case 's': size = parse_size(optarg); break;
		}
	}
	if (!name || !size)
		usage_error(!name ? "-n LOG is required" : "-s SIZE is required");
	if (cbt_file_create(name, size, err, sizeof(err)) < 0)
		die("%s", err);
	return 0;
}

/* ---- get ---- */

static int
cmd_get(int argc, char **argv)
{
	const char *name = NULL;
	char text[37];
	int what = 0, many = 0, c;
	struct cbt_file f;

	while ((c = next_opt(argc, argv, ":n:pcfsbh")) != -1) {
		if (c == 'n') {
			name = optarg;
			continue;
		}
		many |= what && what != c;
		what = c;
	}
	if (!name)
		usage_error("-n LOG is required");
	if (!what || many)
		usage_error("give exactly one of -p, -c, -f, -s, -b");
	open_log(name, 1, &f);
	switch (what) {
	case 'p':
	case 'c':
		uuid_unparse_lower(what == 'p' ? f.h.parent : f.h.child, text);
		printf("%s\n", text);
		break;
	case 'f':
		printf("%d\n", (int)f.h.consistent);
		break;
	case 's':
		printf("%llu\n", (unsigned long long)f.h.size);
		break;
	case 'b':
		fwrite(f.bitmap, 1, cbt_bitmap_bytes(f.h.size), stdout);
		break;
	}
	cbt_file_close(&f);
	flush_stdout();
	return 0;
}

/* ---- set ---- */

static int
cmd_set(int argc, char **argv)
{
	const char *name = NULL, *parent = NULL, *child = NULL, *flag = NULL, *size_s = NULL;
	struct cbt_file f;
	char err[512];
	int c;

	while ((c = next_opt(argc, argv, ":n:p:c:f:s:h")) != -1) {
		switch (c) {
		case 'n': name = optarg; break;
		case 'p': parent = optarg; break;
		case 'c': child = optarg; break;
		case 'f': flag = optarg; break;
		case 's': size_s = optarg; break;
		}
	}
	if (!name)
		usage_error("-n LOG is required");
	if (!parent && !child && !flag && !size_s)
		usage_error("give at least one of -p, -c, -f, -s");
	/* every argument checked before the log is touched */
	struct cbt_header h = { 0 };
	if (parent)
		parse_uuid(parent, "-p", h.parent);
	if (child)
		parse_uuid(child, "-c", h.child);
	if (flag && strcmp(flag, "0") && strcmp(flag, "1"))
		die("-f: '%s' is not 0 or 1", flag);
	uint64_t size = size_s ? parse_size(size_s) : 0;

	open_log(name, 0, &f);
	if (size && size < f.h.size) {
		cbt_file_close(&f);
		die("%s: size smaller than current size %llu", name, (unsigned long long)f.h.size);
	}
	if (parent)
		memcpy(f.h.parent, h.parent, sizeof(h.parent));
	if (child)
		memcpy(f.h.child, h.child, sizeof(h.child));
	if (flag)
		f.h.consistent = flag[0] - '0';
	/* a growth writes the header, new fields and all, once the bitmap is durable */
	if (size) {
		if (cbt_file_grow(&f, size, err, sizeof(err)) < 0)
			die("%s: %s", name, err);
	} else {
		int rc = cbt_file_write_header(&f);
		synced(name, rc ? rc : cbt_file_sync(&f));
	}
	cbt_file_close(&f);
	return 0;
}

/* ---- coalesce ---- */

static int
cmd_coalesce(int argc, char **argv)
{
	const char *pname = NULL, *cname = NULL;
	struct cbt_file p, ch;
	int c;

	while ((c = next_opt(argc, argv, ":p:c:h")) != -1) {
		switch (c) {
		case 'p': pname = optarg; break;
		case 'c': cname = optarg; break;
		}
	}
	if (!pname || !cname)
		usage_error(!pname ? "-p PARENT_LOG is required" : "-c CHILD_LOG is required");
	open_log(pname, 1, &p);
	open_log(cname, 0, &ch);
	uint64_t pbytes = cbt_bitmap_bytes(p.h.size), cbytes = cbt_bitmap_bytes(ch.h.size);
	if (pbytes > cbytes)
		die("%s: its bitmap (%llu bytes) is larger than the child's (%s: %llu bytes)",
		    pname, (unsigned long long)pbytes, cname, (unsigned long long)cbytes);
	/*
	 * Only bits of blocks both disks have: the parent's bits past its last
	 * block, or past the child's, are slack (docs/CBT-LOG.md).
	 */
	uint64_t blocks = cbt_blocks(p.h.size < ch.h.size ? p.h.size : ch.h.size);
	for (uint64_t i = 0; i < blocks / 8; i++)
		ch.bitmap[i] |= p.bitmap[i];
	if (blocks % 8)
		ch.bitmap[blocks / 8] |= p.bitmap[blocks / 8] & (uint8_t)((1u << (blocks % 8)) - 1);
	int rc = cbt_file_write_bitmap(&ch, 0, pbytes);
	synced(cname, rc ? rc : cbt_file_sync(&ch));
	cbt_file_close(&p);
	cbt_file_close(&ch);
	return 0;
}

static const struct command commands[] = {
	{ "create", cmd_create, "-n LOG -s SIZE",
	  "  -n LOG    the log file to make (an existing file is replaced)\n"
	  "  -s SIZE   the disk's size in bytes\n"
	  "  -h        this help\n",
	  "a new log: zero UUIDs, flag 0, every block clear" },
	{ "get", cmd_get, "-n LOG -p|-c|-f|-s|-b",
	  "  -n LOG    the log file\n"
	  "  -p        print the parent log's UUID\n"
	  "  -c        print the child log's UUID\n"
	  "  -f        print the consistent flag (0 or 1)\n"
	  "  -s        print the disk's size in bytes\n"
	  "  -b        write the bitmap's bytes to standard output\n"
	  "  -h        this help\n",
	  "print one field of a log" },
	{ "set", cmd_set, "-n LOG [-p UUID] [-c UUID] [-f 0|1] [-s SIZE]",
	  "  -n LOG    the log file\n"
	  "  -p UUID   the parent log's UUID\n"
	  "  -c UUID   the child log's UUID\n"
	  "  -f 0|1    the consistent flag\n"
	  "  -s SIZE   the disk's new size in bytes (grow only)\n"
	  "  -h        this help\n",
	  "change fields of a log; -s grows its bitmap" },
	{ "coalesce", cmd_coalesce, "-p PARENT_LOG -c CHILD_LOG",
	  "  -p PARENT_LOG  the log whose changed blocks are added\n"
	  "  -c CHILD_LOG   the log they are added to\n"
	  "  -h             this help\n",
	  "add the parent log's changed blocks to the child log's" },
};

static void
print_commands(void)
{
	printf("usage: cbt-util COMMAND [OPTIONS]\n\ncommands:\n");
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		printf("  %-9s %s\n", commands[i].name, commands[i].help);
	printf("\ncbt-util COMMAND -h lists a command's options.\n");
}

int
main(int argc, char **argv)
{
	if (argc >= 2 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) {
		print_commands();
		flush_stdout();
		return 0;
	}
	for (size_t i = 0; argc >= 2 && i < sizeof(commands) / sizeof(commands[0]); i++) {
		if (!strcmp(argv[1], commands[i].name)) {
			cmd = &commands[i];
			opterr = 0;
			optind = 1;
			return cmd->fn(argc - 1, argv + 1);
		}
	}
	print_commands();
	if (argc < 2)
		quit(EXIT_USAGE, "no command given");
	quit(EXIT_USAGE, "unknown command '%.40s'", argv[1]);
}
