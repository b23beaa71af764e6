/*
 * Running a test guest's work in ring 3.
 *
 * On hosts where KVM is the nested PVM hypervisor, guest code at CPL 0 runs
 * through KVM's x86 instruction emulator (about 1.5 us per instruction),
 * while CPL 3 code runs natively: a busy driver loop is some 10,000 times
 * faster in ring 3. usermode_run() therefore builds the minimum a ring-3
 * program needs and jumps there for good:
 *
 * - paging: the VMM's identity map of the first GiB (2 MiB pages) gets the
 *   U/S bit, and a new page directory maps 3-4 GiB (the 32-bit MMIO gap
 *   with the virtio-mmio slots at 0xC000_1000+) with 2 MiB pages, uncached
 *   (PCD|PWT), also user-accessible; CR3 is reloaded;
 * - a GDT with 64-bit ring-0 and ring-3 code and data segments and a TSS
 *   whose I/O permission bitmap opens ports 0-0x3ff (16550 at 0x3f8, the
 *   i8042 at 0x64), because this host ignores IOPL=3 set through IRETQ;
 * - an IDT whose first 48 vectors report the exception (or interrupt) on
 *   the serial port and reset: a ring-3 guest has no other way to say it
 *   crashed;
 * - the legacy 8259 PICs masked: ring 3 runs with IF=1, and no interrupt
 *   may reach the IDT.
 *
 * Software interrupts from ring 3 raise #UD on this host, so there is no
 * way back to ring 0: the ring-3 function ends the run with reset(), which
 * works from ring 3 through the I/O bitmap.
 */
#ifndef EMBER_USERMODE_H
#define EMBER_USERMODE_H

#include "guest.h"

/* First address of the 3-4 GiB range usermode_run() maps uncached. */
#define MMIO_GAP_START 0xc0000000UL
/* page_alloc() hands out memory below this: the end of the VMM's identity map. */
#define PAGE_ALLOC_LIMIT 0x40000000UL

/*
 * Whole 4 KiB pages of guest RAM above the guest image (after .bss), for
 * page tables, rings and I/O buffers; never freed, not zeroed (fresh guest
 * RAM reads as zeroes). NULL once PAGE_ALLOC_LIMIT would be crossed: the
 * caller must also keep within the RAM size it configured.
 */
void *page_alloc(size_t bytes);

/*
 * Sets up paging, GDT, TSS, IDT and the PICs as described above and calls
 * fn(arg) in ring 3 on a stack of its own. Never returns: fn must end the
 * run with reset().
 */
void usermode_run(void (*fn)(const void *arg), const void *arg) __attribute__((noreturn));

#endif
