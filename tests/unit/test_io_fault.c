/* lib/io_fault: the nth matching I/O fails (by kind and path), count in a
 * row, with an errno or as a short write whose first part lands; the
 * status counts what matched and what was injected. Through the blocking
 * file calls, as a driver's open or close makes them. */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "file_calls.h"
#include "io_fault.h"

static char path[64], other[64];
static int fd = -1, ofd = -1;
static char buf[8192];

static void
arm(uint64_t nth, unsigned count, unsigned kinds, const char *part, int err, int short_write)
{
	struct io_fault_spec sp = { .nth = nth, .count = count, .kinds = kinds, .err = err,
				    .short_write = short_write };
	snprintf(sp.path, sizeof(sp.path), "%s", part);
	assert_int_equal(io_fault_arm(&sp), 0);
}

static void
test_refused_until_enabled(void **state)
{
	struct io_fault_spec sp = { .nth = 1, .err = EIO };
	struct io_fault_status st;
	(void)state;
	assert_int_equal(io_fault_arm(&sp), -EINVAL);
	io_fault_get_status(&st);
	assert_false(st.enabled);
	assert_int_equal(io_fault_enable(), 0);
	io_fault_get_status(&st);
	assert_true(st.enabled);
	assert_false(st.armed);
}

static void
test_nth_write_of_a_path_fails_once(void **state)
{
	struct io_fault_status st;
	(void)state;
	arm(2, 1, IO_FAULT_WRITE, "faultunit-a", EIO, 0);
	assert_int_equal(fc_pread_full(fd, buf, 512, 0), 0);		/* not a write */
	assert_int_equal(fc_pwrite_full(ofd, buf, 512, 0), 0);	/* not that file */
	assert_int_equal(fc_pwrite_full(fd, buf, 512, 0), 0);		/* the first */
	assert_int_equal(fc_pwrite_full(fd, buf, 512, 1024), -EIO);	/* the second */
	assert_int_equal(fc_pwrite_full(fd, buf, 512, 0), 0);		/* once only */
	io_fault_get_status(&st);
	assert_false(st.armed);
	assert_int_equal(st.seen, 2);
	assert_int_equal(st.injected, 1);
	assert_int_equal(st.total, 1);
	assert_int_equal(st.last_kind, IO_FAULT_WRITE);
	assert_int_equal(st.last_offset, 1024);
	assert_int_equal(st.last_length, 512);
	assert_non_null(strstr(st.last_path, "faultunit-a"));
}

static void
test_transient_errors_in_a_row(void **state)
{
	struct io_fault_status st;
	(void)state;
	arm(1, 3, IO_FAULT_SYNC | IO_FAULT_TRUNCATE, "", EAGAIN, 0);
	assert_int_equal(fc_pwrite_full(fd, buf, 512, 0), 0);
	assert_int_equal(fc_fdatasync(fd), -EAGAIN);
	assert_int_equal(fc_ftruncate(fd, 8192), -EAGAIN);
	assert_int_equal(fc_fsync(fd), -EAGAIN);
	assert_int_equal(fc_fdatasync(fd), 0);
	io_fault_get_status(&st);
	assert_int_equal(st.injected, 3);
	assert_int_equal(st.total, 4);
}

static void
test_short_write_lands_its_first_half(void **state)
{
	char back[8192];
	(void)state;
	memset(buf, 'o', sizeof(buf));
	assert_int_equal(fc_pwrite_full(fd, buf, sizeof(buf), 0), 0);
	arm(1, 1, IO_FAULT_WRITE, "faultunit-a", 0, 1);
	memset(buf, 'n', sizeof(buf));
	assert_int_equal(fc_pwrite_full(fd, buf, sizeof(buf), 0), -ENOSPC);
	assert_int_equal(pread(fd, back, sizeof(back), 0), (ssize_t)sizeof(back));
	for (size_t i = 0; i < sizeof(back); i++)
		assert_int_equal(back[i], i < 4096 ? 'n' : 'o');
	/* a sector or less cannot be cut: nothing lands */
	arm(1, 1, IO_FAULT_WRITE, "faultunit-a", 0, 1);
	memset(buf, 'x', 512);
	assert_int_equal(fc_pwrite_full(fd, buf, 512, 0), -ENOSPC);
	assert_int_equal(pread(fd, back, 512, 0), 512);
	assert_int_equal(back[0], 'n');
}

static void
test_disarm_keeps_the_status(void **state)
{
	struct io_fault_status st;
	(void)state;
	arm(5, 1, 0, "", ENOSPC, 0);
	assert_int_equal(fc_fdatasync(fd), 0);
	io_fault_disarm();
	for (int i = 0; i < 10; i++)
		assert_int_equal(fc_fdatasync(fd), 0);
	io_fault_get_status(&st);
	assert_false(st.armed);
	assert_int_equal(st.seen, 1);
	assert_int_equal(st.spec.nth, 5);
	assert_int_equal(st.spec.err, ENOSPC);
}

static void
test_kinds_parse(void **state)
{
	unsigned k;
	(void)state;
	assert_int_equal(io_fault_parse_kinds("read,sync", &k), 0);
	assert_int_equal(k, IO_FAULT_READ | IO_FAULT_SYNC);
	assert_int_equal(io_fault_parse_kinds("fallocate,truncate,write", &k), 0);
	assert_int_equal(k, IO_FAULT_FALLOCATE | IO_FAULT_TRUNCATE | IO_FAULT_WRITE);
	assert_int_equal(io_fault_parse_kinds("read,bogus", &k), -EINVAL);
	assert_int_equal(io_fault_parse_kinds("", &k), -EINVAL);
	assert_string_equal(io_fault_kind_name(IO_FAULT_SYNC), "sync");
}

int
main(void)
{
	snprintf(path, sizeof(path), "/tmp/faultunit-a.XXXXXX");
	snprintf(other, sizeof(other), "/tmp/faultunit-b.XXXXXX");
	fd = mkstemp(path);
	ofd = mkstemp(other);
	if (fd < 0 || ofd < 0 || pwrite(fd, buf, sizeof(buf), 0) != (ssize_t)sizeof(buf))
		return 1;
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_refused_until_enabled),
		cmocka_unit_test(test_nth_write_of_a_path_fails_once),
		cmocka_unit_test(test_transient_errors_in_a_row),
		cmocka_unit_test(test_short_write_lands_its_first_half),
		cmocka_unit_test(test_disarm_keeps_the_status),
		cmocka_unit_test(test_kinds_parse),
	};
	int rc = cmocka_run_group_tests(tests, NULL, NULL);
	unlink(path);
	unlink(other);
	return rc;
}
