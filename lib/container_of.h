/* The structure that embeds a member, from a pointer to the member. */
#ifndef TD_CONTAINER_OF_H
#define TD_CONTAINER_OF_H

#include <stddef.h>

#define container_of(ptr, type, member) \
	((type *)(void *)((char *)(ptr) - offsetof(type, member)))

#endif
