/* Prints a fixed greeting and resets: the smallest complete boot. */
#include "guest.h"

void main(const void *bp)
{
	(void)bp;
	puts("Hello from the Ember test guest\n");
	reset();
}
