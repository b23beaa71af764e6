/*
 * Executes int3 with interrupts off. On hosts where guest code with IF=0
 * runs through KVM's x86 instruction emulator, the emulator cannot handle
 * int3 and KVM_RUN returns KVM_EXIT_INTERNAL_ERROR (suberror 1, emulation
 * failure); the VMM must stop and report it. The IDT has zero limit so a
 * host that does execute int3 natively triple-faults instead of running on.
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
	puts("about to int3\n");
	__asm__ volatile("lidt %0; int3" : : "m"(empty) : "memory");
	puts("after int3\n");
	reset();
}
