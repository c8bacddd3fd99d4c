/*
 * Whole-file VHD operations, synchronous (vhd-util, and the server's live
 * snapshot from a worker thread): open and check a file's metadata, create
 * a new image, snapshot one as the parent of a new differencing child.
 */
#ifndef TD_VHD_FILE_H
#define TD_VHD_FILE_H

#include "vhd_format.h"

struct vhd_file {
	int fd;
	char *path;		/* absolute */
	struct vhd_meta m;
};

/* Opens and loads path. 0, or -errno with err set. */
int vhd_file_open(struct vhd_file *vf, const char *path, int rdwr, struct td_error *err);
void vhd_file_close(struct vhd_file *vf);

int vhd_file_exists(const char *path);	/* for parent lookups */

/* Creates path (it must not exist) from c; the file is synced. */
int vhd_file_create(const char *path, struct vhd_create *c, struct td_error *err);

/*
 * Creates child as a differencing VHD on parent: a VHD, or a raw file when
 * raw_parent (the child's parent uuid is then nil). The child takes the
 * parent's size (or size, if larger).
 */
int vhd_file_snapshot(const char *child, const char *parent, int raw_parent,
		      uint64_t size, struct td_error *err);

/* Chain depth: 1 for an image without parent; a raw parent counts. */
int vhd_file_depth(const char *path, int *depth, struct td_error *err);

/* A VHD child on parent_path (raw_parent: a raw file); "vhd:child" in *params. */
int vhd_create_child(const char *parent_path, const char *child_path, int raw_parent,
		     char **child_params, struct td_error *err);

/* The first byte after all metadata and blocks (where the footer belongs). */
uint64_t vhd_end_of_data(const struct vhd_meta *m);

#endif
