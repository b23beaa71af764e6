/*
 * Shared support for the Ember test guests: port I/O, the 16550 console,
 * number printing, Linux boot_params access, command-line parameters and
 * the i8042 reset that ends every run.
 */
#ifndef EMBER_GUEST_H
#define EMBER_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef unsigned long size_t;

/* Linux boot protocol, Documentation/arch/x86/zero-page.rst and boot.rst. */
#define BP_E820_ENTRIES 0x1e8 /* u8: number of entries in e820_table */
#define BP_CMD_LINE_PTR 0x228 /* u32: physical address of the command line */
#define BP_CMDLINE_SIZE 0x238 /* u32: maximum command line size */
#define BP_E820_TABLE 0x2d0   /* struct boot_e820_entry[128] */
#define BP_E820_MAX 128

/* One entry of boot_params.e820_table: packed, 20 bytes. */
struct e820_entry {
	u64 addr;
	u64 size;
	u32 type;
} __attribute__((packed));

static inline void outb(u16 port, u8 val)
{
	__asm__ volatile("outb %0, %1" : : "a"(val), "Nd"(port) : "memory");
}

static inline u8 inb(u16 port)
{
	u8 val;
	__asm__ volatile("inb %1, %0" : "=a"(val) : "Nd"(port) : "memory");
	return val;
}

/* Serial console (16550 at COM1, the port Linux's earlycon uses). */
void putc(char c);
void puts(const char *s);
void put_hex(u64 v);
void put_dec(u64 v);

/* Command line of the boot_params at bp (NULL if the pointer is 0). */
const char *cmdline(const void *bp);
/*
 * Value of "key=value" on the command line as an unsigned decimal number;
 * def if the key is absent or its value is not a number.
 */
u64 cmdline_u64(const char *cmdline, const char *key, u64 def);
/*
 * Value of "key=value" on the command line: its first character, with its
 * length in *len; NULL if the key is absent.
 */
const char *cmdline_value(const char *cmdline, const char *key, size_t *len);
/* 1 if the command line has "key=value" with exactly this value, else 0. */
int cmdline_is(const char *cmdline, const char *key, const char *value);

/* Resets through the i8042 controller; never returns. */
void reset(void) __attribute__((noreturn));

/* gcc may emit calls to these even in freestanding code. */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);

#endif
