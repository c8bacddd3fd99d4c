/* Unit-test helpers: run an event loop until a flag is set. */
#ifndef TD_TEST_LOOP_H
#define TD_TEST_LOOP_H

#include <event2/event.h>

/* Runs base until *flag becomes non-zero (or about 10 s pass). */
static inline int
loop_until(struct event_base *base, volatile int *flag)
{
	for (int i = 0; i < 100000 && !*flag; i++) {
		struct timeval tv = { 0, 100 };
		event_base_loopexit(base, &tv);
		event_base_loop(base, EVLOOP_ONCE);
	}
	return *flag;
}

#endif
