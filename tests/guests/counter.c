/*
 * Prints an increasing counter on the serial port, one line per value:
 * "count 0", "count 1", ... for counter.limit values (default: forever),
 * then "counter done" and a reset. The pause tests check that no line
 * appears while the VM is paused and that the count goes on after a resume
 * exactly where it stopped.
 */
#include "guest.h"

void main(const void *bp)
{
	u64 limit = cmdline_u64(cmdline(bp), "counter.limit", 0);

	for (u64 i = 0; limit == 0 || i < limit; i++) {
		puts("count ");
		put_dec(i);
		putc('\n');
	}
	puts("counter done\n");
	reset();
}
