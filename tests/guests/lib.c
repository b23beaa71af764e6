/* Shared support for the Ember test guests; see guest.h. */
#include "guest.h"

/* 16550 UART registers (PC16550D datasheet), COM1 base as on a PC. */
#define COM1 0x3f8
#define UART_THR 0         /* transmit holding register (write) */
#define UART_LSR 5         /* line status register */
#define UART_LSR_THRE 0x20 /* THR empty: may write the next byte */

/* i8042 keyboard controller command port and its "pulse reset line" command. */
#define I8042_COMMAND 0x64
#define I8042_RESET 0xfe

void putc(char c)
{
	/*
	 * Poll THRE before each byte, exactly as Linux's 8250 earlycon does
	 * (serial8250_early_out / wait_for_xmitr), so the VMM sees the same
	 * register traffic a real kernel produces.
	 */
	while (!(inb(COM1 + UART_LSR) & UART_LSR_THRE))
		;
	outb(COM1 + UART_THR, (u8)c);
}

void puts(const char *s)
{
	while (*s)
		putc(*s++);
}

void put_hex(u64 v)
{
	char buf[19];
	int i = sizeof(buf) - 1;

	buf[i] = 0;
	do {
		u64 d = v & 0xf;
		buf[--i] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v >>= 4;
	} while (v && i > 2);
	buf[--i] = 'x';
	buf[--i] = '0';
	puts(&buf[i]);
}

void put_dec(u64 v)
{
	char buf[21];
	int i = sizeof(buf) - 1;

	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v && i > 0);
	puts(&buf[i]);
}

const char *cmdline(const void *bp)
{
	u32 ptr = *(const volatile u32 *)((const u8 *)bp + BP_CMD_LINE_PTR);

	return ptr ? (const char *)(u64)ptr : (const char *)0;
}

u64 cmdline_u64(const char *s, const char *key, u64 def)
{
	if (!s)
		return def;
	while (*s) {
		const char *k = key;
		const char *p = s;

		while (*p == ' ')
			p++;
		s = p;
		while (*k && *p == *k) {
			p++;
			k++;
		}
		if (!*k && *p == '=') {
			u64 v = 0;
			int digits = 0;

			for (p++; *p >= '0' && *p <= '9'; p++, digits++)
				v = v * 10 + (u64)(*p - '0');
			if (digits && (*p == ' ' || *p == 0))
				return v;
			return def;
		}
		/* Not this parameter: skip to the next space-separated word. */
		while (*s && *s != ' ')
			s++;
	}
	return def;
}

void reset(void)
{
	outb(I8042_COMMAND, I8042_RESET);
	/* The VMM stops the VM on the reset; never run past it. */
	for (;;)
		__asm__ volatile("cli; hlt");
}

void *memset(void *dst, int c, size_t n)
{
	volatile u8 *d = dst;

	while (n--)
		*d++ = (u8)c;
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	volatile u8 *d = dst;
	const u8 *s = src;

	while (n--)
		*d++ = *s++;
	return dst;
}

const char *cmdline_value(const char *s, const char *key, size_t *len)
{
	if (!s)
		return (const char *)0;
	while (*s) {
		const char *k = key;
		const char *p;

		while (*s == ' ')
			s++;
		p = s;
		while (*k && *p == *k) {
			p++;
			k++;
		}
		/* Skip this word whether or not it matched. */
		while (*s && *s != ' ')
			s++;
		if (!*k && *p == '=') {
			p++;
			*len = (size_t)(s - p);
			return p;
		}
	}
	return (const char *)0;
}

int cmdline_is(const char *s, const char *key, const char *value)
{
	size_t len, i;
	const char *v = cmdline_value(s, key, &len);

	if (!v)
		return 0;
	for (i = 0; i < len; i++)
		if (value[i] != v[i])
			return 0;
	return value[len] == 0;
}
