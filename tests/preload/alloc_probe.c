/*
 * LD_PRELOAD probe of a process's heap calls, for make bench and the tests:
 * - counts calls to malloc, calloc, realloc and posix_memalign/aligned_alloc,
 *   and writes the total ("allocs N\n") to the file named by
 *   ALLOC_COUNT_FILE each time the process gets SIGUSR2: allocations per
 *   request, measured from outside;
 * - SIGUSR1 toggles failing every one of them (ENOMEM) until the next
 *   SIGUSR1: how the process behaves when memory runs out. With
 *   ALLOC_FAIL_MIN=N only those of N bytes or more fail (large data
 *   buffers, while small objects still come).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static atomic_ulong count;
static atomic_int failing;
static size_t fail_min;		/* ALLOC_FAIL_MIN */
static void *(*real_malloc)(size_t);
static void *(*real_calloc)(size_t, size_t);
static void *(*real_realloc)(void *, size_t);
static int (*real_posix_memalign)(void **, size_t, size_t);
static void *(*real_aligned_alloc)(size_t, size_t);

/* dlsym itself may calloc: serve that from a small static arena */
static char arena[4096];
static size_t arena_used;
static int resolving;

static void *
arena_alloc(size_t n)
{
	n = (n + 15) & ~(size_t)15;
	if (arena_used + n > sizeof(arena))
		return NULL;
	void *p = arena + arena_used;
	arena_used += n;
	return p;
}

static void
on_usr2(int sig)
{
	char buf[64] = "allocs ";
	char num[24];
	int n = 0;
	unsigned long v = atomic_load(&count);
	(void)sig;
	do {
		num[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	size_t len = 7;
	while (n)
		buf[len++] = num[--n];
	buf[len++] = '\n';
	const char *path = getenv("ALLOC_COUNT_FILE");
	if (!path)
		return;
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd >= 0) {
		ssize_t w = write(fd, buf, len);
		(void)w;
		close(fd);
	}
}

static void
on_usr1(int sig)
{
	(void)sig;
	atomic_store(&failing, !atomic_load(&failing));
}

static void
resolve(void)
{
	if (real_malloc || resolving)
		return;
	resolving = 1;
	real_malloc = dlsym(RTLD_NEXT, "malloc");
	real_calloc = dlsym(RTLD_NEXT, "calloc");
	real_realloc = dlsym(RTLD_NEXT, "realloc");
	real_posix_memalign = dlsym(RTLD_NEXT, "posix_memalign");
	real_aligned_alloc = dlsym(RTLD_NEXT, "aligned_alloc");
	resolving = 0;
}

/* Not from the first malloc: under ASan that comes before its interceptors are ready. */
__attribute__((constructor)) static void
install_handlers(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr2;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR2, &sa, NULL);
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	const char *min = getenv("ALLOC_FAIL_MIN");
	if (min)
		fail_min = strtoull(min, NULL, 10);
}

/* An allocation that is to fail now (counted all the same). */
static int
fail_now(size_t n)
{
	atomic_fetch_add(&count, 1);
	if (!atomic_load(&failing) || n < fail_min)
		return 0;
	errno = ENOMEM;
	return 1;
}

void *
malloc(size_t n)
{
	resolve();
	if (!real_malloc)
		return arena_alloc(n);
	return fail_now(n) ? NULL : real_malloc(n);
}

void *
calloc(size_t a, size_t b)
{
	resolve();
	if (!real_calloc)
		return arena_alloc(a * b);	/* zeroed: static storage */
	return fail_now(a * b) ? NULL : real_calloc(a, b);
}

void *
realloc(void *p, size_t n)
{
	resolve();
	return fail_now(n) ? NULL : real_realloc(p, n);
}

int
posix_memalign(void **p, size_t a, size_t n)
{
	resolve();
	return fail_now(n) ? ENOMEM : real_posix_memalign(p, a, n);
}

void *
aligned_alloc(size_t a, size_t n)
{
	resolve();
	return fail_now(n) ? NULL : real_aligned_alloc(a, n);
}

void
free(void *p)
{
	static void (*real_free)(void *);
	if ((char *)p >= arena && (char *)p < arena + sizeof(arena))
		return;
	if (!real_free)
		real_free = dlsym(RTLD_NEXT, "free");
	real_free(p);
}
