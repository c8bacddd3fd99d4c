/* lib/fdlimit: the descriptor count is exact across many directory reads
 * (more fds than one 4 KiB getdents buffer holds), and an open is refused
 * once only the reserve is left, whether the table fills from the bottom
 * (the free top answers without a count) or a descriptor sits up high. */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cmocka.h>

#include "fdlimit.h"

#define MANY 700	/* about 17 KiB of dirents: several getdents calls */

static void
test_count_is_exact_over_many_reads(void **state)
{
	int fds[MANY];
	unsigned before = fdlimit_in_use();
	(void)state;

	assert_true(before >= 3);
	for (int i = 0; i < MANY; i++)
		assert_true((fds[i] = open("/dev/null", O_RDONLY | O_CLOEXEC)) >= 0);
	assert_int_equal(fdlimit_in_use(), before + MANY);
	for (int i = 0; i < MANY; i += 2)
		close(fds[i]);
	assert_int_equal(fdlimit_in_use(), before + MANY / 2);
	for (int i = 1; i < MANY; i += 2)
		close(fds[i]);
	assert_int_equal(fdlimit_in_use(), before);
}

/*
 * Lowers the soft limit to the descriptors in use + extra + the reserve + 2
 * (room for extra more, then one open, then one more) and returns it; *old
 * keeps the limit as it was.
 */
static int
limit_lower(unsigned extra, struct rlimit *old)
{
	struct rlimit rl;

	assert_int_equal(getrlimit(RLIMIT_NOFILE, old), 0);
	rl = *old;
	rl.rlim_cur = fdlimit_in_use() + extra + FDLIMIT_RESERVE + 2;
	assert_int_equal(setrlimit(RLIMIT_NOFILE, &rl), 0);
	return (int)rl.rlim_cur;
}

static int
open_null(void)
{
	int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	assert_true(fd >= 0);
	return fd;
}

static void
test_open_refused_when_only_the_reserve_is_left(void **state)
{
	struct rlimit old;
	(void)state;

	int high = limit_lower(0, &old) - 1;
	assert_int_equal(fdlimit_check_open(), 0);
	int a = open_null(), b = open_null();
	assert_int_equal(fdlimit_check_open(), -EMFILE);
	close(b);
	assert_int_equal(fdlimit_check_open(), 0);
	/* one up high instead (a dup2): the top is not free, so they are counted */
	assert_int_equal(dup2(0, high), high);
	assert_int_equal(fdlimit_check_open(), -EMFILE);
	close(a);
	assert_int_equal(fdlimit_check_open(), 0);
	close(high);
	assert_int_equal(fdlimit_check_open(), 0);
	assert_int_equal(setrlimit(RLIMIT_NOFILE, &old), 0);
}

/* Hundreds of descriptors, the limit just past them and the reserve: the free top decides. */
static void
test_many_descriptors_below_the_reserve(void **state)
{
	struct rlimit old;
	int fds[MANY];
	(void)state;

	limit_lower(MANY, &old);
	for (int i = 0; i < MANY; i++)
		fds[i] = open_null();
	assert_int_equal(fdlimit_check_open(), 0);
	int a = open_null(), b = open_null();
	assert_int_equal(fdlimit_check_open(), -EMFILE);
	close(a);
	close(b);
	for (int i = 0; i < MANY; i++)
		close(fds[i]);
	assert_int_equal(setrlimit(RLIMIT_NOFILE, &old), 0);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_count_is_exact_over_many_reads),
		cmocka_unit_test(test_open_refused_when_only_the_reserve_is_left),
		cmocka_unit_test(test_many_descriptors_below_the_reserve),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
