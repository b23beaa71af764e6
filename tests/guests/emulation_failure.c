/*
 * Executes int3 with interrupts off. On hosts where guest code with IF=0
 * runs through KVM's x86 instruction emulator, the emulator cannot handle
 * int3 and KVM_RUN returns KVM_EXIT_INTERNAL_ERROR (suberror 1, emulation
 * failure); the VMM must stop and report it. The guest first prints the
 * address of the int3 so the test can match the RIP the VMM reports. The
 * IDT has zero limit so a host that does execute int3 natively
 * triple-faults instead of running on.
 */
#include "guest.h"

struct idt_ptr {
	u16 limit;
	u64 base;
} __attribute__((packed));

/* do_int3(idtr): loads the IDT register, then int3 at int3_insn. */
void do_int3(const struct idt_ptr *idtr);
extern const char int3_insn[];
__asm__(".text\n"
	".globl do_int3\n"
	"do_int3:\n"
	"	lidt (%rdi)\n"
	".globl int3_insn\n"
	"int3_insn:\n"
	"	int3\n"
	"	ret\n");

void main(const void *bp)
{
	static const struct idt_ptr empty = { 0, 0 };

	(void)bp;
	puts("about to int3 at ");
	put_hex((u64)int3_insn);
	putc('\n');
	do_int3(&empty);
	puts("after int3\n");
	reset();
}
