/* A cache of equal-size objects: see freelist.h. */
#include "freelist.h"

#include <stdlib.h>
#include <string.h>

void *
freelist_get(struct freelist *fl, size_t size)
{
	if (size < sizeof(void *))
		size = sizeof(void *);
	if (fl->size != size)
		freelist_drain(fl);	/* another size now: the old objects go */
	fl->size = size;
	if (!fl->head)
		return calloc(1, size);
	void *obj = fl->head;
	memcpy(&fl->head, obj, sizeof(void *));
	fl->count--;
	memset(obj, 0, size);
	return obj;
}

void
freelist_put(struct freelist *fl, void *obj, size_t size)
{
	if (size < sizeof(void *))
		size = sizeof(void *);
	if (!obj)
		return;
	if (size != fl->size || fl->count >= fl->max) {
		free(obj);
		return;
	}
	memcpy(obj, &fl->head, sizeof(void *));
	fl->head = obj;
	fl->count++;
}

void
freelist_drain(struct freelist *fl)
{
	while (fl->head) {
		void *obj = fl->head;
		memcpy(&fl->head, obj, sizeof(void *));
		free(obj);
	}
	fl->count = 0;
}
