/*
 * vhd-util: the offline VHD tool, with blktap's command names, flags and
 * output formats. It works on files directly; coalesce writes into the
 * parent through the same driver code the server uses.
 */
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <getopt.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

#include "driver.h"
#include "file_io.h"
#include "io.h"
#include "vhd_file.h"
#include "vhd_format.h"

static const char *cmd_name = "";

static void __attribute__((format(printf, 1, 2), noreturn))
die(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "vhd-util %s: ", cmd_name);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static void __attribute__((noreturn))
usage(const char *text)
{
	fprintf(stderr, "usage: vhd-util %s\n", text);
	exit(2);
}

static uint64_t
parse_mb(const char *s, const char *what)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || !*s || *end || v == 0 || v > (VHD_MAX_SIZE >> 20))
		die("%s must be a number of MB between 1 and %llu, not '%s'", what,
		    (unsigned long long)(VHD_MAX_SIZE >> 20), s);
	return (uint64_t)v << 20;
}

static void
open_or_die(struct vhd_file *vf, const char *name, int rdwr)
{
	struct td_error err;
	if (vhd_file_open(vf, name, rdwr, &err) < 0)
		die("%s: %s", name, err.msg);
}

/* ---- create ---- */

static int
cmd_create(int argc, char **argv)
{
	const char *use = "create -n NAME -s SIZE_MB [-r] [-S MAX_MB]";
	const char *name = NULL;
	uint64_t size = 0, max = 0;
	int fixed = 0, c;
	struct td_error err;

	while ((c = getopt(argc, argv, "n:s:S:rh")) != -1) {
		switch (c) {
		case 'n': name = optarg; break;
		case 's': size = parse_mb(optarg, "-s"); break;
		case 'S': max = parse_mb(optarg, "-S"); break;
		case 'r': fixed = 1; break;
		default: usage(use);
		}
	}
	if (!name || !size || optind != argc)
		usage(use);
	if (max && max < size)
		die("<-S size> must be greater than <-s size>");
	/* blktap's sizes: whole 2 MiB blocks */
	size = (size + VHD_BLOCK_DEFAULT - 1) / VHD_BLOCK_DEFAULT * VHD_BLOCK_DEFAULT;
	struct vhd_create cr = { .size = size, .max_size = max,
				 .type = fixed ? VHD_TYPE_FIXED : VHD_TYPE_DYNAMIC };
	if (vhd_file_create(name, &cr, &err) < 0)
		die("%s: %s", name, err.msg);
	return 0;
}

/* ---- snapshot ---- */

static int
cmd_snapshot(int argc, char **argv)
{
	const char *use = "snapshot -n CHILD -p PARENT [-m] [-S MAX_MB] [-l LIMIT] [-e]";
	const char *name = NULL, *parent = NULL;
	int raw = 0, limit = 0, c;
	uint64_t size = 0;
	struct td_error err;

	while ((c = getopt(argc, argv, "n:p:mS:l:eh")) != -1) {
		switch (c) {
		case 'n': name = optarg; break;
		case 'p': parent = optarg; break;
		case 'm': raw = 1; break;
		case 'S': size = parse_mb(optarg, "-S"); break;
		case 'l': limit = atoi(optarg); break;
		case 'e': break;	/* we always link to the given parent */
		default: usage(use);
		}
	}
	if (!name || !parent || optind != argc)
		usage(use);
	if (limit > 0 && !raw) {
		int depth;
		if (vhd_file_depth(parent, &depth, &err) < 0)
			die("%s: %s", parent, err.msg);
		if (depth + 1 > limit)
			die("snapshot depth exceeded: current depth: %d, limit: %d", depth, limit);
	}
	if (vhd_file_snapshot(name, parent, raw, size, &err) < 0)
		die("%s: %s", name, err.msg);
	return 0;
}

/* ---- query ---- */

static uint32_t
allocated_blocks(const struct vhd_meta *m)
{
	uint32_t n = 0;
	if (m->footer.type == VHD_TYPE_FIXED)
		return (uint32_t)((m->footer.curr_size + VHD_BLOCK_DEFAULT - 1) / VHD_BLOCK_DEFAULT);
	for (uint32_t i = 0; i < m->header.max_bat; i++)
		if (m->bat[i] != VHD_BAT_UNUSED)
			n++;
	return n;
}

static int
cmd_query(int argc, char **argv)
{
	const char *use = "query -n NAME [-v] [-s] [-p] [-f] [-m] [-d] [-S] [-a]";
	const char *name = NULL;
	int v = 0, s = 0, p = 0, f = 0, mk = 0, d = 0, S = 0, a = 0, c;
	struct vhd_file vf;
	struct td_error err;

	while ((c = getopt(argc, argv, "n:vspfmdSah")) != -1) {
		switch (c) {
		case 'n': name = optarg; break;
		case 'v': v = 1; break;
		case 's': s = 1; break;
		case 'p': p = 1; break;
		case 'f': f = 1; break;
		case 'm': mk = 1; break;
		case 'd': d = 1; break;
		case 'S': S = 1; break;
		case 'a': a = 1; break;
		default: usage(use);
		}
	}
	if (!name || optind != argc || !(v || s || p || f || mk || d || S || a))
		usage(use);
	open_or_die(&vf, name, 0);
	const struct vhd_meta *m = &vf.m;
	if (v)
		printf("%llu\n", (unsigned long long)(m->footer.curr_size >> 20));
	if (s)
		printf("%llu\n", (unsigned long long)(vhd_end_of_data(m) + VHD_FOOTER_SIZE));
	if (p) {
		if (m->footer.type != VHD_TYPE_DIFF)
			printf("%s has no parent\n", name);
		else
			printf("%s\n", m->parent_path);
	}
	if (f)
		printf("hidden: %d\n", m->footer.hidden);
	if (mk)
		printf("marker: %d\n", m->has_batmap ? m->batmap_hdr.marker : 0);
	if (d) {
		int depth;
		if (vhd_file_depth(name, &depth, &err) < 0)
			die("%s: %s", name, err.msg);
		printf("chain depth: %d\n", depth);
	}
	if (S)
		printf("%llu\n", (unsigned long long)(m->footer.type == VHD_TYPE_FIXED ?
			m->footer.curr_size >> 20 :
			(uint64_t)m->header.max_bat * m->header.block_size >> 20));
	if (a)
		printf("%u\n", allocated_blocks(m));
	vhd_file_close(&vf);
	return 0;
}

/* ---- check ---- */

static int
is_nil(const uint8_t *u)
{
	for (int i = 0; i < 16; i++)
		if (u[i])
			return 0;
	return 1;
}

/* Appends the problems of one image to out; returns how many. */
static int
check_one(const char *name, int parents, char *out, size_t outlen)
{
	struct vhd_file vf;
	struct td_error err;
	int problems = 0;
	size_t used = strlen(out);
	uint8_t raw[VHD_FOOTER_SIZE];

#define PROBLEM(...) do { \
		problems++; \
		int n_ = snprintf(out + used, used < outlen ? outlen - used : 0, __VA_ARGS__); \
		if (n_ > 0 && used + (size_t)n_ < outlen) used += (size_t)n_; \
	} while (0)

	if (vhd_file_open(&vf, name, 0, &err) < 0) {
		PROBLEM("%s: %s\n", name, err.msg);
		return problems;
	}
	const struct vhd_meta *m = &vf.m;
	const struct vhd_footer *f = &m->footer;
	if (f->features & ~3u)
		PROBLEM("%s: footer has unknown features %#x\n", name, f->features);
	if (f->timestamp > vhd_time((uint64_t)time(NULL)) + 1800)
		PROBLEM("%s: footer timestamp is in the future\n", name);
	if (f->saved > 1 || f->hidden > 1)
		PROBLEM("%s: footer saved/hidden flags are not 0 or 1\n", name);
	if (is_nil(f->uuid))
		PROBLEM("%s: footer uuid is nil\n", name);
	if (td_pread_full(&vf.fd, raw, sizeof(raw), m->footer_offset) == 0)
		for (unsigned i = 86; i < VHD_FOOTER_SIZE; i++)
			if (raw[i]) {
				PROBLEM("%s: footer reserved bytes are not zero\n", name);
				break;
			}
	if (f->type != VHD_TYPE_FIXED) {
		uint8_t backup[VHD_FOOTER_SIZE];
		if (td_pread_full(&vf.fd, backup, sizeof(backup), 0) < 0 ||
		    memcmp(backup, raw, sizeof(raw)))
			PROBLEM("%s: the backup footer at offset 0 differs from the footer "
				"(vhd-util repair rewrites it)\n", name);
		char buf[4096];
		buf[0] = '\0';
		problems += vhd_meta_check_blocks(m, td_pread_full, &vf.fd, buf, sizeof(buf));
		for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
			int n = snprintf(out + used, used < outlen ? outlen - used : 0, "%s: %s\n",
					 name, line);
			if (n > 0 && used + (size_t)n < outlen)
				used += (size_t)n;
		}
	}
	if (f->type == VHD_TYPE_DIFF) {
		char pname[1024];
		const char *base = strrchr(m->parent_path, '/');
		base = base ? base + 1 : m->parent_path;
		size_t nlen = 0;
		while (nlen + 1 < sizeof(m->header.parent_name) &&
		       (m->header.parent_name[nlen] || m->header.parent_name[nlen + 1]))
			nlen += 2;
		if (vhd_utf16_to_utf8(m->header.parent_name, nlen, 1, pname, sizeof(pname)) < 0 ||
		    strcmp(pname, base))
			PROBLEM("%s: header parent name does not match the locator (%s)\n", name, base);
		if (!m->parent_raw) {
			struct vhd_file pf;
			if (vhd_file_open(&pf, m->parent_path, 0, &err) < 0) {
				PROBLEM("%s: parent %s: %s\n", name, m->parent_path, err.msg);
			} else {
				if (memcmp(pf.m.footer.uuid, m->header.parent_uuid, 16))
					PROBLEM("%s: parent %s has another uuid than the child expects\n",
						name, m->parent_path);
				vhd_file_close(&pf);
			}
			if (parents) {
				out[used] = '\0';
				problems += check_one(m->parent_path, 1, out, outlen);
				used = strlen(out);
			}
		} else if (access(m->parent_path, R_OK) < 0) {
			PROBLEM("%s: raw parent %s: %s\n", name, m->parent_path, strerror(errno));
		}
	}
	vhd_file_close(&vf);
	out[used < outlen ? used : outlen - 1] = '\0';
	return problems;
#undef PROBLEM
}

static int
cmd_check(int argc, char **argv)
{
	const char *use = "check -n NAME [-p] [-i] [-I] [-t] [-b] [-B] [-s]";
	const char *name = NULL;
	int parents = 0, c;
	char out[8192] = "";

	while ((c = getopt(argc, argv, "n:piItbBsh")) != -1) {
		switch (c) {
		case 'n': name = optarg; break;
		case 'p': parents = 1; break;
		case 'i': case 'I': case 't': case 'b': case 'B': case 's':
			break;	/* blktap's relaxations: every rule is always checked */
		default: usage(use);
		}
	}
	if (!name || optind != argc)
		usage(use);
	if (check_one(name, parents, out, sizeof(out)) == 0) {
		printf("%s is valid\n", name);
		return 0;
	}
	fputs(out, stdout);
	printf("%s appears invalid\n", name);
	return 1;
}

/* ---- repair ---- */

static int
cmd_repair(int argc, char **argv)
{
	const char *use = "repair -n NAME";
	const char *name = NULL;
	int c, fd;
	uint8_t buf[VHD_FOOTER_SIZE], back[VHD_FOOTER_SIZE];
	struct vhd_footer f;
	char why[128];

	while ((c = getopt(argc, argv, "n:h")) != -1) {
		if (c != 'n')
			usage(use);
		name = optarg;
	}
	if (!name || optind != argc)
		usage(use);
	fd = open(name, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		die("%s: %s", name, strerror(errno));
	off_t size = lseek(fd, 0, SEEK_END);
	int primary_ok = size >= VHD_FOOTER_SIZE &&
			 td_pread_full(&fd, buf, sizeof(buf), (uint64_t)size - VHD_FOOTER_SIZE) == 0 &&
			 vhd_footer_decode(buf, &f, why, sizeof(why)) == 0;
	int backup_ok = td_pread_full(&fd, back, sizeof(back), 0) == 0 &&
			vhd_footer_decode(back, &f, why, sizeof(why)) == 0 &&
			f.type != VHD_TYPE_FIXED;
	if (primary_ok) {
		if (vhd_footer_decode(buf, &f, why, sizeof(why)) == 0 && f.type != VHD_TYPE_FIXED &&
		    memcmp(buf, back, sizeof(buf)) && td_pwrite_full(&fd, buf, sizeof(buf), 0) < 0)
			die("%s: %s", name, strerror(errno));
		fsync(fd);
		close(fd);
		return 0;
	}
	if (!backup_ok)
		die("%s: no valid footer at the end of the file nor at offset 0: cannot repair",
		    name);
	/*
	 * The footer belongs after the last metadata or block. Append the backup
	 * after whatever the file ends with (nothing there is overwritten), load
	 * the metadata through it to find that end, then put the footer there.
	 */
	uint64_t tail = ((uint64_t)size + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR;
	struct vhd_file vf;
	struct td_error err;
	if (td_pwrite_full(&fd, back, sizeof(back), tail) < 0)
		die("%s: %s", name, strerror(errno));
	if (vhd_file_open(&vf, name, 1, &err) < 0)
		die("%s: %s", name, err.msg);
	uint64_t end = vhd_end_of_data(&vf.m);
	vhd_file_close(&vf);
	if (td_pwrite_full(&fd, back, sizeof(back), end) < 0 ||
	    ftruncate(fd, (off_t)(end + VHD_FOOTER_SIZE)) < 0 || fsync(fd) < 0)
		die("%s: %s", name, strerror(errno));
	close(fd);
	return 0;
}

/* ---- read ---- */

static void
print_uuid(const char *label, const uint8_t *u)
{
	printf("%-24s: %02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x\n",
	       label, u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11],
	       u[12], u[13], u[14], u[15]);
}

static const char *
type_name(uint32_t t)
{
	return t == VHD_TYPE_FIXED ? "Fixed hard disk" : t == VHD_TYPE_DYNAMIC ?
	       "Dynamic hard disk" : t == VHD_TYPE_DIFF ? "Differencing hard disk" : "?";
}

static int
cmd_read(int argc, char **argv)
{
	const char *use = "read -p -n NAME";
	const char *name = NULL;
	int headers = 0, c;
	struct vhd_file vf;

	while ((c = getopt(argc, argv, "n:ph")) != -1) {
		switch (c) {
		case 'n': name = optarg; break;
		case 'p': headers = 1; break;
		default: usage(use);
		}
	}
	if (!name || !headers || optind != argc)
		usage(use);
	open_or_die(&vf, name, 0);
	const struct vhd_footer *f = &vf.m.footer;
	printf("VHD Footer Summary:\n-------------------\n");
	printf("%-24s: %.8s\n", "Cookie", f->cookie);
	printf("%-24s: %#010x\n", "Features", f->features);
	printf("%-24s: %u.%u\n", "File format version", f->version >> 16, f->version & 0xffff);
	printf("%-24s: %llu\n", "Data offset", (unsigned long long)f->data_offset);
	printf("%-24s: %u\n", "Timestamp", f->timestamp);
	printf("%-24s: %.4s\n", "Creator Application", f->creator_app);
	printf("%-24s: %u.%u\n", "Creator version", f->creator_version >> 16,
	       f->creator_version & 0xffff);
	printf("%-24s: 0x%08x\n", "Creator OS", f->creator_os);
	printf("%-24s: %llu\n", "Original disk size", (unsigned long long)f->orig_size);
	printf("%-24s: %llu\n", "Current disk size", (unsigned long long)f->curr_size);
	printf("%-24s: cyls %u, heads %u, sectors %u\n", "Geometry", f->cyls, f->heads, f->spt);
	printf("%-24s: %llu\n", "Virtual size", (unsigned long long)vf.m.size);
	printf("%-24s: %s\n", "Disk type", type_name(f->type));
	printf("%-24s: %#010x\n", "Checksum", f->checksum);
	print_uuid("UUID", f->uuid);
	printf("%-24s: %u\n", "Saved state", f->saved);
	printf("%-24s: %u\n", "Hidden", f->hidden);
	if (f->type != VHD_TYPE_FIXED) {
		const struct vhd_header *h = &vf.m.header;
		printf("\nVHD Header Summary:\n-------------------\n");
		printf("%-24s: %.8s\n", "Cookie", h->cookie);
		printf("%-24s: %llu\n", "Table offset", (unsigned long long)h->table_offset);
		printf("%-24s: %u\n", "Max BAT size", h->max_bat);
		printf("%-24s: %u\n", "Block size", h->block_size);
		printf("%-24s: %#010x\n", "Checksum", h->checksum);
		print_uuid("Parent UUID", h->parent_uuid);
		printf("%-24s: %u\n", "Parent timestamp", h->parent_ts);
		if (vf.m.parent_path)
			printf("%-24s: %s%s\n", "Parent", vf.m.parent_path,
			       vf.m.parent_raw ? " (raw)" : "");
		for (int i = 0; i < 8; i++) {
			const struct vhd_locator *l = &h->loc[i];
			if (!l->code)
				continue;
			printf("%-24s: %d: code %.4s, space %u, length %u, offset %llu\n",
			       "Parent locator", i,
			       (char[]){ (char)(l->code >> 24), (char)(l->code >> 16),
					 (char)(l->code >> 8), (char)l->code },
			       l->data_space, l->data_len, (unsigned long long)l->data_offset);
		}
		if (vf.m.has_batmap) {
			printf("\nVHD Batmap Summary:\n-------------------\n");
			printf("%-24s: %llu\n", "Batmap offset",
			       (unsigned long long)vf.m.batmap_hdr.offset);
			printf("%-24s: %u\n", "Batmap size (secs)", vf.m.batmap_hdr.size);
			printf("%-24s: %u.%u\n", "Batmap version", vf.m.batmap_hdr.version >> 16,
			       vf.m.batmap_hdr.version & 0xffff);
			printf("%-24s: %#010x\n", "Checksum", vf.m.batmap_hdr.checksum);
		}
		printf("%-24s: %u of %u\n", "Allocated blocks", allocated_blocks(&vf.m),
		       vf.m.nr_blocks);
	}
	vhd_file_close(&vf);
	return 0;
}

/* ---- scan ---- */

static void
scan_one(const char *path, int full)
{
	struct vhd_file vf;
	struct td_error err;
	struct stat st;
	const char *shown = full ? path : (strrchr(path, '/') ? strrchr(path, '/') + 1 : path);

	if (vhd_file_open(&vf, path, 0, &err) < 0) {
		printf("vhd=%s scan-error=%d error-message='%s'\n", shown, -err.code, err.msg);
		return;
	}
	const char *parent = "none";
	if (vf.m.parent_path)
		parent = full ? vf.m.parent_path : (strrchr(vf.m.parent_path, '/') ?
			    strrchr(vf.m.parent_path, '/') + 1 : vf.m.parent_path);
	printf("vhd=%s capacity=%llu size=%llu hidden=%u parent=%s\n", shown,
	       (unsigned long long)vf.m.footer.curr_size,
	       (unsigned long long)(fstat(vf.fd, &st) == 0 ? (uint64_t)st.st_size : 0),
	       vf.m.footer.hidden, parent);
	vhd_file_close(&vf);
}

static int
cmd_scan(int argc, char **argv)
{
	const char *use = "scan [-m PATTERN] [-v] [-f] [-c] [-p] [-a] FILES...";
	const char *pattern = NULL;
	int full = 0, c;

	while ((c = getopt(argc, argv, "m:vfcpah")) != -1) {
		switch (c) {
		case 'm': pattern = optarg; break;
		case 'v': full = 1; break;
		case 'f': case 'c': case 'p': case 'a': break;
		default: usage(use);
		}
	}
	if (!pattern && optind == argc)
		usage(use);
	if (pattern) {
		glob_t g;
		if (glob(pattern, 0, NULL, &g) == 0) {
			for (size_t i = 0; i < g.gl_pathc; i++)
				scan_one(g.gl_pathv[i], full);
			globfree(&g);
		}
	}
	for (int i = optind; i < argc; i++)
		scan_one(argv[i], full);
	return 0;
}

/* ---- resize ---- */

static void
write_or_die(int fd, const void *buf, size_t len, uint64_t off, const char *name)
{
	if (td_pwrite_full(&fd, buf, len, off) < 0)
		die("%s: %s", name, strerror(errno));
}

static int
cmd_resize(int argc, char **argv)
{
	const char *use = "resize -n NAME -s SIZE_MB [-f] [-j JOURNAL]";
	const char *name = NULL;
	uint64_t size = 0;
	int c;
	struct vhd_file vf;

	while ((c = getopt(argc, argv, "n:s:fj:h")) != -1) {
		switch (c) {
		case 'n': name = optarg; break;
		case 's': size = parse_mb(optarg, "-s"); break;
		case 'f': case 'j': break;	/* every step leaves a valid file */
		default: usage(use);
		}
	}
	if (!name || !size || optind != argc)
		usage(use);
	open_or_die(&vf, name, 1);
	struct vhd_meta *m = &vf.m;
	struct vhd_footer f = m->footer;
	uint8_t fbuf[VHD_FOOTER_SIZE];

	if (size < f.curr_size)
		die("%s: shrinking is not supported (%llu MB now)", name,
		    (unsigned long long)(f.curr_size >> 20));
	if (size == f.curr_size) {
		vhd_file_close(&vf);
		return 0;
	}
	f.curr_size = size;
	vhd_geometry(size, &f.cyls, &f.heads, &f.spt);
	vhd_footer_encode(&f, fbuf);
	if (f.type == VHD_TYPE_FIXED) {
		/* the footer moves out; its old place becomes zeroed data */
		static const uint8_t zero[VHD_FOOTER_SIZE];
		write_or_die(vf.fd, fbuf, sizeof(fbuf), size, name);
		write_or_die(vf.fd, zero, sizeof(zero), m->footer_offset, name);
		if (ftruncate(vf.fd, (off_t)(size + VHD_FOOTER_SIZE)) < 0 || fsync(vf.fd) < 0)
			die("%s: %s", name, strerror(errno));
		vhd_file_close(&vf);
		return 0;
	}
	struct vhd_header h = m->header;
	uint32_t need = (uint32_t)((size + h.block_size - 1) / h.block_size);
	uint64_t end = vhd_end_of_data(m);
	if (need > h.max_bat) {
		/*
		 * The BAT has no room: a bigger one (and batmap) goes after the data,
		 * the footer after it. Each write below leaves a valid file: the old
		 * header still names the old BAT until it is rewritten.
		 */
		uint64_t bat_off = (end + VHD_FOOTER_SIZE + 4095) / 4096 * 4096;
		uint64_t bat_bytes = ((uint64_t)need * 4 + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR;
		uint8_t *bat = malloc(bat_bytes);
		if (!bat)
			die("out of memory");
		memset(bat, 0xff, bat_bytes);
		for (uint32_t i = 0; i < h.max_bat; i++) {
			uint32_t v = m->bat[i];
			bat[4 * i] = (uint8_t)(v >> 24);
			bat[4 * i + 1] = (uint8_t)(v >> 16);
			bat[4 * i + 2] = (uint8_t)(v >> 8);
			bat[4 * i + 3] = (uint8_t)v;
		}
		uint64_t new_end = bat_off + bat_bytes;
		uint8_t *bm = NULL;
		struct vhd_batmap_hdr bh = m->batmap_hdr;
		if (m->has_batmap) {
			uint32_t secs = (uint32_t)(((need + 7) / 8 + VHD_SECTOR - 1) / VHD_SECTOR);
			bm = calloc(1 + secs, VHD_SECTOR);
			if (!bm)
				die("out of memory");
			memcpy(bm + VHD_SECTOR, m->batmap, (size_t)m->batmap_hdr.size * VHD_SECTOR);
			bh.offset = new_end + VHD_SECTOR;
			bh.size = secs;
			bh.version = VHD_BATMAP_VERSION;
			uint64_t sum = ((size >> 24) + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR;
			if (sum < VHD_SECTOR)
				sum = VHD_SECTOR;
			if (sum > (uint64_t)secs * VHD_SECTOR)
				sum = (uint64_t)secs * VHD_SECTOR;
			bh.checksum = vhd_batmap_checksum(bm + VHD_SECTOR, (size_t)sum);
			vhd_batmap_hdr_encode(&bh, bm);
			write_or_die(vf.fd, bm, (size_t)(1 + secs) * VHD_SECTOR, new_end, name);
			new_end += (uint64_t)(1 + secs) * VHD_SECTOR;
		}
		uint8_t old[VHD_FOOTER_SIZE];
		vhd_footer_encode(&m->footer, old);
		write_or_die(vf.fd, bat, bat_bytes, bat_off, name);
		write_or_die(vf.fd, old, sizeof(old), new_end, name);
		if (fsync(vf.fd) < 0)
			die("%s: %s", name, strerror(errno));
		h.table_offset = bat_off;
		h.max_bat = need;
		uint8_t hbuf[VHD_HEADER_SIZE];
		vhd_header_encode(&h, hbuf);
		write_or_die(vf.fd, hbuf, sizeof(hbuf), f.data_offset, name);
		if (fsync(vf.fd) < 0)
			die("%s: %s", name, strerror(errno));
		end = new_end;
		free(bat);
		free(bm);
	}
	write_or_die(vf.fd, fbuf, sizeof(fbuf), end, name);
	if (ftruncate(vf.fd, (off_t)(end + VHD_FOOTER_SIZE)) < 0 || fsync(vf.fd) < 0)
		die("%s: %s", name, strerror(errno));
	write_or_die(vf.fd, fbuf, sizeof(fbuf), 0, name);
	if (fsync(vf.fd) < 0)
		die("%s: %s", name, strerror(errno));
	vhd_file_close(&vf);
	return 0;
}

/* ---- coalesce ---- */

struct sync_io {
	struct event_base *base;
	int done, err;
};

static void
sync_done(struct td_request *req, int err)
{
	struct sync_io *s = req->priv;
	s->err = err;
	s->done = 1;
}

/* Runs one request on an image to completion. */
static int
sync_submit(struct sync_io *s, struct td_image *img, enum td_op op, void *buf,
	    uint64_t off, uint64_t len)
{
	struct iovec iov = { buf, len };
	struct td_request req = { .op = op, .offset = off, .length = len, .iov = &iov,
				  .iovcnt = 1, .done = sync_done, .priv = s };
	s->done = 0;
	td_image_submit(img, &req);
	while (!s->done)
		event_base_loop(s->base, EVLOOP_ONCE);
	return s->err;
}

static int
cmd_coalesce(int argc, char **argv)
{
	const char *use = "coalesce -n CHILD [-s] [-p]";
	const char *name = NULL;
	int c;
	struct vhd_file vf;
	struct td_error err;
	char ebuf[256];

	while ((c = getopt(argc, argv, "n:sph")) != -1) {
		switch (c) {
		case 'n': name = optarg; break;
		case 's': case 'p': break;
		default: usage(use);
		}
	}
	if (!name || optind != argc)
		usage(use);
	open_or_die(&vf, name, 0);
	struct vhd_meta *m = &vf.m;
	if (m->footer.type != VHD_TYPE_DIFF)
		die("%s is not a differencing disk: nothing to coalesce into", name);

	/* the parent opens writable through the driver, as the server would */
	struct sync_io s = { .base = event_base_new() };
	struct io_engine *io = s.base ? io_engine_new(s.base, "threads", ebuf, sizeof(ebuf)) : NULL;
	if (!io)
		die("cannot start I/O: %s", s.base ? ebuf : "out of memory");
	struct td_open_ctx ctx = { .io = io };
	struct td_image *parent;
	char *params;
	if (asprintf(&params, "%s:%s", m->parent_raw ? "aio" : "vhd", m->parent_path) < 0)
		die("out of memory");
	if (td_chain_open(params, 0, &ctx, &parent, &err) < 0)
		die("%s", err.msg);
	uint8_t *map = malloc(m->bitmap_bytes);
	uint8_t *buf = aligned_alloc(4096, m->header.block_size);
	if (!map || !buf)
		die("out of memory");
	unsigned long long sectors = 0;
	int rc = 0;
	for (uint32_t blk = 0; blk < m->nr_blocks && !rc; blk++) {
		if (m->bat[blk] == VHD_BAT_UNUSED)
			continue;
		if (vhd_batmap_test(m, blk))
			memset(map, 0xff, m->bitmap_bytes);
		else if (td_pread_full(&vf.fd, map, m->bitmap_bytes, vhd_block_offset(m, blk)) < 0)
			die("%s: cannot read the bitmap of block %u", name, blk);
		uint64_t base = (uint64_t)blk * m->header.block_size;
		for (uint32_t sct = 0; sct < m->spb && !rc;) {
			if (!vhd_bitmap_test(map, sct)) {
				sct++;
				continue;
			}
			uint32_t e = sct + 1;
			while (e < m->spb && vhd_bitmap_test(map, e))
				e++;
			uint64_t off = base + (uint64_t)sct * VHD_SECTOR;
			uint64_t len = (uint64_t)(e - sct) * VHD_SECTOR;
			if (off >= parent->size)
				break;	/* beyond a smaller parent: nowhere to put it */
			if (off + len > parent->size)
				len = parent->size - off;
			if (td_pread_full(&vf.fd, buf, len, vhd_block_data(m, blk) + (off - base)) < 0)
				die("%s: cannot read block %u", name, blk);
			rc = sync_submit(&s, parent, TD_OP_WRITE, buf, off, len);
			sectors += len / VHD_SECTOR;
			sct = e;
		}
	}
	if (!rc)
		rc = sync_submit(&s, parent, TD_OP_FLUSH, NULL, 0, 0);
	td_chain_close(parent);
	io_engine_free(io);
	event_base_free(s.base);
	free(params);
	free(map);
	free(buf);
	vhd_file_close(&vf);
	if (rc) {
		fprintf(stderr, "vhd-util coalesce: error coalescing: %d (%s)\n", -rc, strerror(rc));
		return 1;
	}
	printf("Coalesced %llu sectors\n", sectors);
	return 0;
}

static const struct {
	const char *name;
	int (*fn)(int, char **);
	const char *help;
} commands[] = {
	{ "create", cmd_create, "create a dynamic (or -r fixed) VHD" },
	{ "snapshot", cmd_snapshot, "create a differencing child on a parent" },
	{ "query", cmd_query, "print sizes, parent, flags, chain depth" },
	{ "check", cmd_check, "check every structural rule" },
	{ "repair", cmd_repair, "restore the footer from the backup at offset 0" },
	{ "coalesce", cmd_coalesce, "merge a child's data into its parent" },
	{ "resize", cmd_resize, "grow a VHD" },
	{ "scan", cmd_scan, "one line per VHD: capacity, size, hidden, parent" },
	{ "read", cmd_read, "print the footer and header (-p)" },
};

int
main(int argc, char **argv)
{
	if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
		FILE *f = argc < 2 ? stderr : stdout;
		fprintf(f, "usage: vhd-util COMMAND [OPTIONS]\n\ncommands:\n");
		for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
			fprintf(f, "  %-9s %s\n", commands[i].name, commands[i].help);
		return argc < 2 ? 2 : 0;
	}
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		if (!strcmp(argv[1], commands[i].name)) {
			cmd_name = commands[i].name;
			optind = 1;
			return commands[i].fn(argc - 1, argv + 1);
		}
	}
	fprintf(stderr, "vhd-util: unknown command '%s'\n", argv[1]);
	return 2;
}
