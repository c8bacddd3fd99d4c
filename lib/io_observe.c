/* The list of installed I/O observers and the calls into them. */
#include "io_observe.h"

#include <errno.h>

int io_observed;
static struct io_observer *observers[IO_MAX_OBSERVERS];
static int nr_observers;
static uint64_t next_id;

int
io_observer_add(struct io_observer *o)
{
	if (nr_observers == IO_MAX_OBSERVERS)
		return -ENOSPC;
	observers[nr_observers++] = o;
	io_observed = 1;
	return 0;
}

int
io_obs_begin(struct io_obs_event *ev)
{
	int short_len = 0;

	ev->id = __atomic_add_fetch(&next_id, 1, __ATOMIC_RELAXED);
	for (int i = 0; i < nr_observers; i++) {
		int rc = observers[i]->begin ? observers[i]->begin(observers[i], ev) : 0;
		if (rc < 0) {
			/* the ones already asked see the call end as it will */
			for (int j = 0; j <= i; j++)
				if (observers[j]->end)
					observers[j]->end(observers[j], ev, rc);
			return rc;
		}
		/* a short write only means something for a write it shortens */
		if (rc > 0 && ev->kind == IO_OBS_WRITE && (uint64_t)rc < ev->length &&
		    (!short_len || rc < short_len))
			short_len = rc;
	}
	return short_len;
}

void
io_obs_end(const struct io_obs_event *ev, int res)
{
	for (int i = 0; i < nr_observers; i++)
		if (observers[i]->end)
			observers[i]->end(observers[i], ev, res);
}
