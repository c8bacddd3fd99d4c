/* Whole-file VHD operations with plain blocking I/O. */
#include "vhd_file.h"

#include "file_io.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int
vhd_file_exists(const char *path)
{
	return access(path, F_OK) == 0;
}

/* An absolute path without resolving the last component's symlinks. */
static char *
absolute(const char *path)
{
	char cwd[PATH_MAX], *out;
	if (path[0] == '/')
		return strdup(path);
	if (!getcwd(cwd, sizeof(cwd)))
		return NULL;
	if (asprintf(&out, "%s/%s", cwd, path) < 0)
		return NULL;
	return out;
}

int
vhd_file_open(struct vhd_file *vf, const char *path, int rdwr, struct td_error *err)
{
	struct stat st;
	char dir[PATH_MAX];

	memset(vf, 0, sizeof(*vf));
	vf->fd = open(path, (rdwr ? O_RDWR : O_RDONLY) | O_CLOEXEC);
	if (vf->fd < 0)
		return td_error_set(err, errno, "%s", strerror(errno));
	if (fstat(vf->fd, &st) < 0 || !(vf->path = absolute(path))) {
		td_error_set(err, errno ? errno : ENOMEM, "%s", strerror(errno ? errno : ENOMEM));
		goto fail;
	}
	if (S_ISDIR(st.st_mode)) {
		td_error_set(err, EISDIR, "%s", strerror(EISDIR));
		goto fail;
	}
	snprintf(dir, sizeof(dir), "%s", vf->path);
	char *slash = strrchr(dir, '/');
	if (slash == dir)
		dir[1] = '\0';
	else if (slash)
		*slash = '\0';
	off_t size = lseek(vf->fd, 0, SEEK_END);
	if (size < 0) {
		td_error_set(err, errno, "%s", strerror(errno));
		goto fail;
	}
	if (vhd_meta_load(&vf->m, td_pread_full, &vf->fd, (uint64_t)size, dir, vhd_file_exists, err) < 0)
		goto fail;
	return 0;
fail:
	close(vf->fd);
	free(vf->path);
	vf->fd = -1;
	vf->path = NULL;
	return -err->code;
}

void
vhd_file_close(struct vhd_file *vf)
{
	if (vf->fd >= 0)
		close(vf->fd);
	vhd_meta_free(&vf->m);
	free(vf->path);
	vf->fd = -1;
	vf->path = NULL;
}

struct create_arg {
	const char *path;
	struct vhd_create *c;
};

static int
create_fill(int fd, void *arg, struct td_error *err)
{
	struct create_arg *a = arg;
	struct vhd_create *c = a->c;
	char *abs = absolute(a->path);
	const char *saved = c->child_path;
	int rc;

	if (!c->child_path)
		c->child_path = abs;
	rc = abs ? vhd_create_write(c, td_pwrite_full, &fd, err)
		 : td_error_set(err, ENOMEM, "out of memory");
	c->child_path = saved;
	free(abs);
	if (rc == 0 && c->type == VHD_TYPE_FIXED &&
	    (rc = fc_ftruncate(fd, c->size + VHD_FOOTER_SIZE)) < 0)
		rc = td_error_set(err, -rc, "%s", strerror(-rc));
	return rc;
}

int
vhd_file_create(const char *path, struct vhd_create *c, struct td_error *err)
{
	struct create_arg a = { path, c };
	return td_file_create(path, create_fill, &a, err);
}

int
vhd_file_snapshot(const char *child, const char *parent, int raw_parent, uint64_t size,
		  struct td_error *err)
{
	struct vhd_create c = { .type = VHD_TYPE_DIFF };
	struct stat st;
	struct vhd_file pf;
	uint8_t uuid[16];
	char *pabs = realpath(parent, NULL);
	int rc;

	if (!pabs)
		return td_error_set(err, errno, "parent %s: %s", parent, strerror(errno));
	if (stat(pabs, &st) < 0) {
		rc = td_error_set(err, errno, "parent %s: %s", parent, strerror(errno));
		goto out;
	}
	if (raw_parent) {
		int fd = open(pabs, O_RDONLY | O_CLOEXEC);
		off_t end = fd >= 0 ? lseek(fd, 0, SEEK_END) : -1;
		if (fd >= 0)
			close(fd);
		if (end < 0) {
			rc = td_error_set(err, errno, "parent %s: %s", parent, strerror(errno));
			goto out;
		}
		c.size = (uint64_t)end / VHD_SECTOR * VHD_SECTOR;
	} else {
		rc = vhd_file_open(&pf, pabs, 0, err);
		if (rc < 0) {
			char why[sizeof(err->msg)];
			snprintf(why, sizeof(why), "%s", err->msg);
			td_error_set(err, err->code, "parent %s: %s", parent, why);
			goto out;
		}
		c.size = pf.m.footer.curr_size;
		memcpy(uuid, pf.m.footer.uuid, 16);
		c.parent_uuid = uuid;
		vhd_file_close(&pf);
	}
	if (size > c.size)
		c.size = size;
	if (!c.size) {
		rc = td_error_set(err, EINVAL, "parent %s is empty", parent);
		goto out;
	}
	c.parent_path = pabs;
	c.parent_ts = vhd_time((uint64_t)st.st_mtime);
	rc = vhd_file_create(child, &c, err);
out:
	free(pabs);
	return rc;
}

int
vhd_file_depth(const char *path, int *depth, struct td_error *err)
{
	struct vhd_file vf;
	char *cur = strdup(path);
	int raw = 0;

	*depth = 0;
	while (cur) {
		if (++*depth > 256) {
			free(cur);
			return td_error_set(err, ELOOP, "chain deeper than 256 images");
		}
		if (raw)
			break;
		if (vhd_file_open(&vf, cur, 0, err) < 0) {
			free(cur);
			return -err->code;
		}
		free(cur);
		cur = vf.m.parent_path ? strdup(vf.m.parent_path) : NULL;
		raw = vf.m.parent_raw;
		vhd_file_close(&vf);
	}
	free(cur);
	return 0;
}

uint64_t
vhd_end_of_data(const struct vhd_meta *m)
{
	/* the loader's meta_end already covers every metadata region and block */
	return m->footer.type == VHD_TYPE_FIXED ? m->footer.curr_size : m->meta_end;
}
