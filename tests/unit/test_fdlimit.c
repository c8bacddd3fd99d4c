/* lib/fdlimit: the descriptor count is exact across many directory reads
 * (more fds than one 4 KiB getdents buffer holds), and an open is refused
 * once only the reserve is left. */
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

static void
test_open_refused_when_only_the_reserve_is_left(void **state)
{
	struct rlimit old, rl;
	(void)state;

	assert_int_equal(getrlimit(RLIMIT_NOFILE, &old), 0);
	rl = old;
	rl.rlim_cur = fdlimit_in_use() + FDLIMIT_RESERVE + 2;
	assert_int_equal(setrlimit(RLIMIT_NOFILE, &rl), 0);
	assert_int_equal(fdlimit_check_open(), 0);
	int a = open("/dev/null", O_RDONLY | O_CLOEXEC), b = open("/dev/null", O_RDONLY | O_CLOEXEC);
	assert_true(a >= 0 && b >= 0);
	assert_int_equal(fdlimit_check_open(), -EMFILE);
	close(b);
	assert_int_equal(fdlimit_check_open(), 0);
	close(a);
	assert_int_equal(setrlimit(RLIMIT_NOFILE, &old), 0);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_count_is_exact_over_many_reads),
		cmocka_unit_test(test_open_refused_when_only_the_reserve_is_left),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
