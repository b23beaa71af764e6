/*
 * Executes CPUID for the leaves CPU templates change and prints each
 * answer as "cpuid LEAF SUBLEAF EAX EBX ECX EDX" (hexadecimal), then reads
 * IA32_PAT and prints "msr 0x277 VALUE", then resets: what the guest sees of
 * the CPU, for the test to compare with a template. It runs in ring 0, so
 * on this host both instructions go through KVM's emulator and answer from
 * the CPUID and MSR values the VMM set.
 */
#include "guest.h"

static void cpuid(u32 leaf, u32 subleaf)
{
	u32 a, b, c, d;

	__asm__ volatile("cpuid"
			 : "=a"(a), "=b"(b), "=c"(c), "=d"(d)
			 : "a"(leaf), "c"(subleaf));
	puts("cpuid ");
	put_hex(leaf);
	putc(' ');
	put_hex(subleaf);
	putc(' ');
	put_hex(a);
	putc(' ');
	put_hex(b);
	putc(' ');
	put_hex(c);
	putc(' ');
	put_hex(d);
	putc('\n');
}

static void rdmsr(u32 index)
{
	u32 lo, hi;

	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(index));
	puts("msr ");
	put_hex(index);
	putc(' ');
	put_hex(((u64)hi << 32) | lo);
	putc('\n');
}

void main(const void *bp)
{
	(void)bp;
	cpuid(0x0, 0);
	cpuid(0x1, 0);
	cpuid(0x7, 0);
	cpuid(0xd, 0);
	cpuid(0xd, 1);
	cpuid(0x80000001, 0);
	cpuid(0x80000008, 0);
	rdmsr(0x277);
	puts("cpuid done\n");
	reset();
}
