/*
 * Triple-faults on purpose: with a zero-limit IDT, the #UD from ud2 cannot
 * be delivered (#GP), neither can that (#DF), and the CPU shuts down
 * (Intel SDM vol. 3A, 6.15 "Interrupt 8 - Double Fault Exception").
 */
#include "guest.h"

struct idt_ptr {
	u16 limit;
	u64 base;
} __attribute__((packed));

void main(const void *bp)
{
	static const struct idt_ptr empty = { 0, 0 };

	(void)bp;
	puts("about to fault\n");
	__asm__ volatile("lidt %0; ud2" : : "m"(empty) : "memory");
	puts("after fault\n");
	reset();
}
