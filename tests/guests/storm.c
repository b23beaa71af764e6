/*
 * Measures the cost of one port-I/O exit: writes the 16550 scratch register
 * storm.count times (default 100000), then reports and resets.
 */
#include "guest.h"

#define UART_SCR 0x3ff /* COM1 scratch register: no side effect in a 16550 */

void main(const void *bp)
{
	u64 n = cmdline_u64(cmdline(bp), "storm.count", 100000);

	for (u64 i = 0; i < n; i++)
		outb(UART_SCR, (u8)i);
	puts("storm done ");
	put_dec(n);
	putc('\n');
	reset();
}
