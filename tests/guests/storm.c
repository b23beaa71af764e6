/*
 * Measures the cost of one port-I/O exit: writes the 16550 scratch register
 * storm.count times (default 100000), then reports and resets.
 *
 * The loop is written in assembly so that the instructions between two
 * exits are fixed: `out`, `dec`, `jnz`. The benchmark's raw KVM_RUN loop
 * runs these very bytes (it finds them in this ELF), at the same address
 * and in the same mode, so the two per-exit costs compare like for like.
 * That matters on hosts where guest code running with IF=0 is emulated by
 * KVM instruction by instruction: every extra instruction in the loop
 * would add to the cost of an exit.
 */
#include "guest.h"

#define UART_SCR 0x3ff /* COM1 scratch register: no side effect in a 16550 */

void main(const void *bp)
{
	u64 n = cmdline_u64(cmdline(bp), "storm.count", 100000);
	u64 left = n;

	/* dec/jnz would wrap around on a count of zero: skip the loop then. */
	if (left)
		__asm__ volatile("1:\n\t"
				 "outb %%al, %%dx\n\t"
				 "decq %%rcx\n\t"
				 "jnz 1b"
				 : "+c"(left)
				 : "a"((u8)0x5a), "d"((u16)UART_SCR)
				 : "memory", "cc");
	puts("storm done ");
	put_dec(n);
	putc('\n');
	reset();
}
