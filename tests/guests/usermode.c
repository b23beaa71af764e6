/* Ring-3 execution for the test guests; see usermode.h. */
#include "usermode.h"

/* Page table entry bits (Intel SDM vol. 3A, 4.5, tables 4-15 to 4-20). */
#define PTE_P (1UL << 0)   /* present */
#define PTE_RW (1UL << 1)  /* writable */
#define PTE_US (1UL << 2)  /* user-accessible */
#define PTE_PWT (1UL << 3) /* write-through */
#define PTE_PCD (1UL << 4) /* cache disabled */
#define PTE_PS (1UL << 7)  /* 2 MiB page (in a PDE), 1 GiB page (in a PDPTE) */
#define PTE_ADDR 0x000ffffffffff000UL
#define PAGE_2M (1UL << 21)
/* PDPTE index of the 3-4 GiB range. */
#define PDPT_MMIO_GAP 3

/* Selectors of the GDT below (Intel SDM vol. 3A, 3.4.2). */
#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define TSS_SEL 0x28

/*
 * Segment descriptors (Intel SDM vol. 3A, 3.4.5): flat 64-bit code (L=1)
 * and data, DPL 0 and DPL 3.
 */
#define DESC_KERNEL_CODE 0x00af9a000000ffffUL
#define DESC_KERNEL_DATA 0x00cf92000000ffffUL
#define DESC_USER_CODE 0x00affa000000ffffUL
#define DESC_USER_DATA 0x00cff2000000ffffUL
/* Available 64-bit TSS, present (SDM vol. 3A, 8.2.3, table 3-2 type 9). */
#define DESC_TSS_ACCESS 0x89UL

/* IDT: 64-bit interrupt gate, present, DPL 0 (SDM vol. 3A, 6.14.1). */
#define GATE_INTERRUPT 0x8e
/* Vectors given an entry: the 32 exceptions and the 16 legacy PIC lines. */
#define IDT_VECTORS 48
#define STUB_SIZE 16

/* The 8259 interrupt mask registers (OCW1). */
#define PIC1_DATA 0x21
#define PIC2_DATA 0xa1

/* Ports 0 to IO_PORTS - 1 are opened to ring 3 by the TSS I/O bitmap. */
#define IO_PORTS 0x400

#define KERNEL_STACK_SIZE 8192
#define USER_STACK_SIZE (256 * 1024)

/* 64-bit TSS (SDM vol. 3A, 8.7, figure 8-11) and its I/O permission bitmap. */
struct tss {
	u32 reserved0;
	u64 rsp[3];
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
	/* One bit per port, 0 = allowed; then the all-ones terminator byte. */
	u8 iomap[IO_PORTS / 8 + 1];
} __attribute__((packed));

struct gate {
	u16 offset_low;
	u16 selector;
	u8 ist;
	u8 type;
	u16 offset_mid;
	u32 offset_high;
	u32 reserved;
} __attribute__((packed));

struct table_ptr {
	u16 limit;
	u64 base;
} __attribute__((packed));

extern char exception_stubs[];
extern char __bss_end[];
void enter_user(void (*fn)(const void *), const void *arg, void *stack_top)
	__attribute__((noreturn));
void usermode_exception(const u64 *frame) __attribute__((noreturn));

static u64 next_free;

void *page_alloc(size_t bytes)
{
	u64 start;

	if (!next_free)
		next_free = ((u64)__bss_end + 4095) & ~4095UL;
	start = next_free;
	bytes = (bytes + 4095) & ~4095UL;
	if (bytes > PAGE_ALLOC_LIMIT || start > PAGE_ALLOC_LIMIT - bytes)
		return (void *)0;
	next_free = start + bytes;
	return (void *)start;
}

static u64 read_cr3(void)
{
	u64 v;
	__asm__ volatile("mov %%cr3, %0" : "=r"(v));
	return v;
}

/*
 * Opens the VMM's identity map of the first GiB to ring 3 and maps 3-4 GiB
 * uncached, then flushes the TLB by reloading CR3.
 */
static int setup_paging(void)
{
	u64 cr3 = read_cr3();
	volatile u64 *pml4 = (volatile u64 *)(cr3 & PTE_ADDR);
	volatile u64 *pdpt;
	u64 *pd_gap;

	if (!(pml4[0] & PTE_P))
		return -1;
	pml4[0] |= PTE_US;
	pdpt = (volatile u64 *)(pml4[0] & PTE_ADDR);
	if (!(pdpt[0] & PTE_P))
		return -1;
	pdpt[0] |= PTE_US;
	if (!(pdpt[0] & PTE_PS)) {
		volatile u64 *pd = (volatile u64 *)(pdpt[0] & PTE_ADDR);

		for (int i = 0; i < 512; i++)
			if (pd[i] & PTE_P)
				pd[i] |= PTE_US;
	}
	pd_gap = page_alloc(4096);
	if (!pd_gap)
		return -1;
	for (u64 i = 0; i < 512; i++)
		pd_gap[i] = (MMIO_GAP_START + i * PAGE_2M) | PTE_P | PTE_RW | PTE_US | PTE_PWT |
			    PTE_PCD | PTE_PS;
	pdpt[PDPT_MMIO_GAP] = (u64)pd_gap | PTE_P | PTE_RW | PTE_US;
	__asm__ volatile("mov %0, %%cr3" : : "r"(cr3) : "memory");
	return 0;
}

static int setup_descriptors(void)
{
	u64 *gdt = page_alloc(4096);
	struct gate *idt = page_alloc(IDT_VECTORS * sizeof(struct gate));
	struct tss *tss = page_alloc(sizeof(struct tss));
	u8 *kstack = page_alloc(KERNEL_STACK_SIZE);
	struct table_ptr gdtr, idtr;
	u64 t = (u64)tss;

	if (!gdt || !idt || !tss || !kstack)
		return -1;
	memset(tss, 0, sizeof(*tss));
	tss->rsp[0] = (u64)(kstack + KERNEL_STACK_SIZE);
	tss->iomap_base = (u16)((u64)&tss->iomap - t);
	tss->iomap[IO_PORTS / 8] = 0xff;

	gdt[0] = 0;
	gdt[1] = DESC_KERNEL_CODE;
	gdt[2] = DESC_KERNEL_DATA;
	gdt[3] = DESC_USER_CODE;
	gdt[4] = DESC_USER_DATA;
	/* A system descriptor takes two slots in long mode (SDM vol. 3A, 8.2.3). */
	gdt[5] = (sizeof(struct tss) - 1) | ((t & 0xffffff) << 16) | (DESC_TSS_ACCESS << 40) |
		 (((t >> 24) & 0xff) << 56);
	gdt[6] = t >> 32;

	for (int v = 0; v < IDT_VECTORS; v++) {
		u64 h = (u64)exception_stubs + (u64)v * STUB_SIZE;

		idt[v].offset_low = (u16)h;
		idt[v].selector = KERNEL_CS;
		idt[v].ist = 0;
		idt[v].type = GATE_INTERRUPT;
		idt[v].offset_mid = (u16)(h >> 16);
		idt[v].offset_high = (u32)(h >> 32);
		idt[v].reserved = 0;
	}

	gdtr.limit = 7 * 8 - 1;
	gdtr.base = (u64)gdt;
	idtr.limit = IDT_VECTORS * sizeof(struct gate) - 1;
	idtr.base = (u64)idt;
	__asm__ volatile("lgdt %0\n\t"
			 "lidt %1\n\t"
			 /* Reload CS with a far return, then the data segments and TR. */
			 "pushq %2\n\t"
			 "leaq 1f(%%rip), %%rax\n\t"
			 "pushq %%rax\n\t"
			 "lretq\n"
			 "1:\n\t"
			 "movw %w3, %%ax\n\t"
			 "movw %%ax, %%ds\n\t"
			 "movw %%ax, %%es\n\t"
			 "movw %%ax, %%ss\n\t"
			 "movw %w4, %%ax\n\t"
			 "ltr %%ax"
			 :
			 : "m"(gdtr), "m"(idtr), "i"(KERNEL_CS), "i"(KERNEL_DS), "i"(TSS_SEL)
			 : "rax", "memory");
	return 0;
}

void usermode_exception(const u64 *frame)
{
	/* frame: vector, error code, RIP, CS, RFLAGS, RSP, SS (usermode.S). */
	puts("\nguest exception ");
	put_dec(frame[0]);
	puts(" error ");
	put_hex(frame[1]);
	puts(" rip ");
	put_hex(frame[2]);
	puts(" cs ");
	put_hex(frame[3]);
	putc('\n');
	reset();
}

void usermode_run(void (*fn)(const void *arg), const void *arg)
{
	u8 *stack;

	if (setup_paging() || setup_descriptors()) {
		puts("usermode: cannot set up ring 3\n");
		reset();
	}
	stack = page_alloc(USER_STACK_SIZE);
	if (!stack) {
		puts("usermode: no memory for the ring-3 stack\n");
		reset();
	}
	/* Mask every 8259 line: ring 3 runs with IF=1. */
	outb(PIC1_DATA, 0xff);
	outb(PIC2_DATA, 0xff);
	enter_user(fn, arg, stack + USER_STACK_SIZE);
}
