/*
 * Reads the UART's receive buffer the way a polling Linux driver does
 * (LSR bit 0, data ready, then RBR) and echoes each line it receives as
 * "echo: <line>", until a line "quit", then resets. Shows that host stdin
 * reaches the guest through the 16550A.
 */
#include "guest.h"

#define COM1 0x3f8
#define LSR_DATA_READY 0x01

static char getc_polled(void)
{
	while (!(inb(COM1 + 5) & LSR_DATA_READY))
		;
	return (char)inb(COM1);
}

void main(const void *bp)
{
	char line[128];
	(void)bp;
	puts("echo ready\n");
	for (;;) {
		unsigned n = 0;
		char c;
		while ((c = getc_polled()) != '\n') {
			if (n < sizeof(line) - 1)
				line[n++] = c;
		}
		line[n] = 0;
		if (n == 4 && line[0] == 'q' && line[1] == 'u' && line[2] == 'i' && line[3] == 't')
			break;
		puts("echo: ");
		puts(line);
		puts("\n");
	}
	reset();
}
