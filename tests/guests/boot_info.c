/*
 * Reports what the VMM handed over at the 64-bit boot entry: the command
 * line and e820 map from boot_params, the paging control registers and the
 * boot_params pointer itself (RSI), one "name: value" per line.
 */
#include "guest.h"

static u64 read_cr0(void)
{
	u64 v;
	__asm__ volatile("mov %%cr0, %0" : "=r"(v));
	return v;
}

static u64 read_cr3(void)
{
	u64 v;
	__asm__ volatile("mov %%cr3, %0" : "=r"(v));
	return v;
}

static u64 read_cr4(void)
{
	u64 v;
	__asm__ volatile("mov %%cr4, %0" : "=r"(v));
	return v;
}

void main(const void *bp)
{
	const u8 *base = bp;
	const char *cmd = cmdline(bp);
	u8 n = base[BP_E820_ENTRIES];
	const struct e820_entry *e820 = (const void *)(base + BP_E820_TABLE);

	puts("cmdline: ");
	if (cmd)
		puts(cmd);
	putc('\n');
	if (n > BP_E820_MAX)
		n = BP_E820_MAX;
	for (u8 i = 0; i < n; i++) {
		puts("e820: ");
		put_hex(e820[i].addr);
		putc(' ');
		put_hex(e820[i].size);
		putc(' ');
		put_dec(e820[i].type);
		putc('\n');
	}
	puts("cr0: ");
	put_hex(read_cr0());
	puts("\ncr3: ");
	put_hex(read_cr3());
	puts("\ncr4: ");
	put_hex(read_cr4());
	puts("\nrsi: ");
	put_hex((u64)bp);
	putc('\n');
	reset();
}
