/*
 * Waits for Ctrl+Alt+Del from the host (the API's SendCtrlAltDel action).
 *
 * Polls the i8042 status register until the output buffer is full (bit 0),
 * reads the byte from the data port and prints it; once the set-2 scan
 * codes of Ctrl, Alt and Delete (0x14, 0x11, 0xe0 0x71) have arrived in
 * order, it resets through the i8042, as a guest OS does on Ctrl+Alt+Del.
 * Polling keeps the guest independent of interrupt delivery (it runs with
 * IF=0 and no IDT of its own).
 */
#include "guest.h"

#define I8042_DATA 0x60	  /* output buffer (read) */
#define I8042_STATUS 0x64 /* status register (read) */
#define I8042_STR_OBF 0x01 /* output buffer full: a byte waits at 0x60 */

void main(const void *bp)
{
	static const u8 want[] = { 0x14, 0x11, 0xe0, 0x71 };
	size_t seen = 0;

	(void)bp;
	puts("ctrl_alt_del: waiting\n");
	while (seen < sizeof(want)) {
		u8 b;

		if (!(inb(I8042_STATUS) & I8042_STR_OBF))
			continue;
		b = inb(I8042_DATA);
		puts("key ");
		put_hex(b);
		putc('\n');
		if (b == want[seen])
			seen++;
		else
			seen = (b == want[0]);
	}
	puts("ctrl_alt_del: reset\n");
	reset();
}
