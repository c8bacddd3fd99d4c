/* Whole-file qcow2 operations with plain blocking I/O. */
#include "qcow2_file.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "file_io.h"

/* A dirty image this large is left to qemu-img check -r all. */
#define QCOW2_REPAIR_MAX_CLUSTERS (1ULL << 26)
/* Refcount blocks read, at most, to find the end of the used clusters. */
#define QCOW2_USED_END_TRIES 64

static uint64_t
div_up(uint64_t v, uint64_t d)
{
	return v / d + (v % d != 0);
}

static int
create_fill(int fd, void *arg, struct td_error *err)
{
	return qcow2_create_write(arg, td_pwrite_full, &fd, err);
}

int
qcow2_file_create(const char *path, const struct qcow2_create *c, struct td_error *err)
{
	return td_file_create(path, create_fill, (void *)(uintptr_t)c, err);
}

static off_t
file_size(int fd)
{
	return lseek(fd, 0, SEEK_END);
}

static int
reload(int fd, struct qcow2_meta *m, struct td_error *err)
{
	off_t size = file_size(fd);
	qcow2_meta_free(m);
	if (size < 0)
		return td_error_set(err, errno, "%s", strerror(errno));
	return qcow2_meta_load(m, td_pread_full, &fd, (uint64_t)size, 0, err);
}

int
qcow2_file_repair(int fd, struct qcow2_meta *m, struct td_error *err)
{
	uint64_t n = div_up(m->file_size, m->cluster_size), table;
	uint32_t clusters, *counts;
	uint8_t hdr[32];
	int rc;

	if (n > QCOW2_REPAIR_MAX_CLUSTERS)
		return td_error_set(err, EFBIG, "the image is dirty and too large to repair here "
				    "(qemu-img check -r all repairs it)");
	if (!(counts = calloc(n ? n : 1, sizeof(*counts))))
		return td_error_set(err, ENOMEM, "out of memory");
	rc = qcow2_count_refs(m, td_pread_full, &fd, counts, n, err);
	if (rc == 0)
		rc = qcow2_refcounts_write(m, counts, n, n, td_pwrite_full, &fd, &table, &clusters,
					   err);
	free(counts);
	if (rc < 0)
		return rc;
	if ((rc = fc_fdatasync(fd)) < 0)
		return td_error_set(err, -rc, "%s", strerror(-rc));
	/* bytes 48..79: the refcount table, the snapshots (unchanged), the features */
	qcow2_put64(hdr, table);
	qcow2_put32(hdr + 8, clusters);
	memset(hdr + 12, 0, 4);		/* no snapshots: qcow2_count_refs refuses them */
	qcow2_put64(hdr + 16, m->h.snapshots_offset);
	qcow2_put64(hdr + 24, m->h.incompatible_features & ~QCOW2_INCOMPAT_DIRTY);
	if ((rc = td_pwrite_full(&fd, hdr, sizeof(hdr), 48)) < 0)
		return td_error_set(err, -rc, "cannot write the header: %s", strerror(-rc));
	if ((rc = fc_fdatasync(fd)) < 0)
		return td_error_set(err, -rc, "%s", strerror(-rc));
	return reload(fd, m, err);
}

int
qcow2_file_clear_autoclear(int fd, struct qcow2_meta *m, struct td_error *err)
{
	uint8_t zero[8] = { 0 };
	int rc = td_pwrite_full(&fd, zero, sizeof(zero), 88);

	if (rc < 0)
		return td_error_set(err, -rc, "cannot write the header: %s", strerror(-rc));
	if ((rc = fc_fdatasync(fd)) < 0)
		return td_error_set(err, -rc, "%s", strerror(-rc));
	m->h.autoclear_features = 0;
	return 0;
}

int
qcow2_file_used_end(int fd, const struct qcow2_meta *m, uint64_t *end, struct td_error *err)
{
	uint8_t *block = malloc(m->cluster_size);
	unsigned tries = 0;
	int rc = 0;

	*end = 0;
	if (!block)
		return td_error_set(err, ENOMEM, "out of memory");
	for (uint32_t ri = m->reftable_entries; ri-- > 0 && !*end;) {
		if (!m->reftable[ri])
			continue;
		if (++tries > QCOW2_USED_END_TRIES) {
			rc = td_error_set(err, EUCLEAN, "too many empty refcount blocks");
			break;
		}
		if ((rc = td_pread_full(&fd, block, m->cluster_size, m->reftable[ri])) < 0) {
			td_error_set(err, -rc, "cannot read a refcount block: %s", strerror(-rc));
			break;
		}
		for (uint64_t i = m->rb_entries; i-- > 0;) {
			if (qcow2_rc_get(block, i, m->refcount_bits)) {
				*end = (((uint64_t)ri << m->rb_bits) + i + 1) << m->cluster_bits;
				break;
			}
		}
	}
	free(block);
	return rc < 0 ? -err->code : 0;
}

const char *
qcow2_probe_format(const char *path)
{
	uint8_t head[512], tail[512];
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	const char *fmt = "aio";

	if (fd < 0)
		return fmt;	/* the open that follows says why */
	off_t size = file_size(fd);
	if (size >= 512 && td_pread_full(&fd, head, sizeof(head), 0) == 0 &&
	    td_pread_full(&fd, tail, sizeof(tail), (uint64_t)size - 512) == 0) {
		if (!memcmp(head, "QFI\xfb", 4))
			fmt = "qcow2";
		else if (!memcmp(head, "conectix", 8) || !memcmp(tail, "conectix", 8))
			fmt = "vhd";
		else if (!memcmp(head, "KDMV", 4) || !memcmp(head, "# Disk DescriptorFile", 21))
			fmt = "vmdk";
	}
	close(fd);
	return fmt;
}

int
qcow2_create_child(const char *parent_path, const char *child_path, char **params,
		   struct td_error *err)
{
	struct qcow2_meta m;
	struct qcow2_create c = { .backing = parent_path, .backing_fmt = "qcow2" };
	char why[sizeof(err->msg)];
	int fd = open(parent_path, O_RDONLY | O_CLOEXEC);
	int rc;

	if (fd < 0)
		return td_error_set(err, errno, "%s: %s", parent_path, strerror(errno));
	off_t size = file_size(fd);
	rc = size < 0 ? td_error_set(err, errno, "%s", strerror(errno))
		      : qcow2_meta_load(&m, td_pread_full, &fd, (uint64_t)size, 1, err);
	close(fd);
	if (rc < 0) {
		snprintf(why, sizeof(why), "%s", err->msg);
		return td_error_set(err, err->code, "%s: %s", parent_path, why);
	}
	c.size = m.h.size;
	qcow2_meta_free(&m);
	if ((rc = qcow2_file_create(child_path, &c, err)) < 0) {
		snprintf(why, sizeof(why), "%s", err->msg);
		return td_error_set(err, err->code, "%s: %s", child_path, why);
	}
	if (asprintf(params, "qcow2:%s", child_path) < 0) {
		*params = NULL;
		unlink(child_path);
		return td_error_set(err, ENOMEM, "out of memory");
	}
	return 0;
}
