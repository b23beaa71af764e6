/*
 * Drives every virtio-blk device it finds the way Linux's virtio_mmio and
 * virtio_blk drivers do, and reports each step on the serial port, one
 * "blk<N>: ..." line per step.
 *
 * Command line:
 *   discover=cmdline|acpi  find devices through virtio_mmio.device= words
 *                          (default) or the ACPI DSDT (LNRO0005 devices)
 *   blk.test=basic|readonly|bench|loop   the scenario (default basic)
 *   blk.loops=N            loop: rounds (default: forever); each round i
 *                          writes 8 sectors at (i % 64) * 8 with seed i,
 *                          reads them back, checks them and prints
 *                          "blk0: loop i" (the snapshot tests)
 *   blk.seed=N             pattern seed (see pattern())
 *   blk.sector=N blk.sectors=N      range written and read back
 *   blk.discard=N blk.discard_sectors=N    range discarded
 *   blk.zero=N blk.zero_sectors=N  range of the write-zeroes request
 *   blk.mib=N blk.bs=N blk.qd=N blk.ops=N blk.rbs=N   benchmark sizes
 *
 * All the work runs in ring 3 (usermode.h); the run ends with "virtio_blk
 * done" and an i8042 reset.
 */
#include "guest.h"
#include "usermode.h"
#include "virtio.h"

/* virtio-blk (virtio 1.2 §5.2): feature bits, config offsets, requests. */
#define VIRTIO_BLK_ID 2
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_F_DISCARD 13
#define VIRTIO_BLK_F_WRITE_ZEROES 14
#define BLK_CFG_CAPACITY 0
#define BLK_CFG_SEG_MAX 12
#define BLK_CFG_BLK_SIZE 20
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define VIRTIO_BLK_ID_BYTES 20
#define SECTOR_SIZE 512
/* Written before a request: a status the device never returns. */
#define STATUS_NONE 0xff

/* The features this driver understands, as Linux's virtio_blk accepts them. */
#define WANTED_FEATURES                                                                  \
	((1UL << VIRTIO_F_VERSION_1) | (1UL << VIRTIO_BLK_F_SEG_MAX) |                   \
	 (1UL << VIRTIO_BLK_F_RO) | (1UL << VIRTIO_BLK_F_BLK_SIZE) |                     \
	 (1UL << VIRTIO_BLK_F_FLUSH) | (1UL << VIRTIO_BLK_F_DISCARD) |                   \
	 (1UL << VIRTIO_BLK_F_WRITE_ZEROES))

/* Largest benchmark queue depth: three descriptors per request. */
#define MAX_QD 64

struct blk_req_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
};

/* virtio 1.2 §5.2.6: one range of a discard or write-zeroes request. */
struct blk_range {
	u64 sector;
	u32 num_sectors;
	u32 flags;
};

/* One request's driver-side memory: header and status byte. */
struct blk_slot {
	struct blk_req_hdr hdr;
	u8 status;
	u8 pad[15];
};

struct blk {
	int n;
	struct virtio_dev *dev;
	struct virtq q;
	u64 capacity;
	struct blk_slot *slots; /* MAX_QD of them */
	u8 *data;		/* scratch for the functional steps */
	int irq_checked;
};

static const char *cmd;

static void prefix(const struct blk *b)
{
	puts("blk");
	put_dec((u64)b->n);
	puts(": ");
}

static void put_status(u32 status)
{
	switch (status) {
	case VIRTIO_BLK_S_OK: puts("ok"); break;
	case VIRTIO_BLK_S_IOERR: puts("ioerr"); break;
	case VIRTIO_BLK_S_UNSUPP: puts("unsupp"); break;
	case STATUS_NONE: puts("nostatus"); break;
	default: puts("status "); put_dec(status); break;
	}
}

/*
 * The test pattern: the byte at disk offset off. It depends on the sector
 * and the offset inside it, so misplaced sectors are caught too. The host
 * side of the tests computes the same function.
 */
static u8 pattern(u64 seed, u64 off)
{
	return (u8)(seed + (off >> 9) * 13 + (off & 511) * 7);
}

/*
 * Submits one request in slot 0 and waits for it: header (device-readable),
 * an optional data buffer, the status byte (device-writable). Returns the
 * status, STATUS_NONE if the device wrote none, or -1 on a queue failure.
 */
static int request(struct blk *b, u32 type, u64 sector, void *data, u32 len, int device_writes)
{
	struct blk_slot *s = &b->slots[0];
	struct virtq_buf bufs[3];
	int n = 0, head;
	u32 used_len;

	s->hdr.type = type;
	s->hdr.reserved = 0;
	s->hdr.sector = sector;
	s->status = STATUS_NONE;
	bufs[n++] = (struct virtq_buf){ (u64)&s->hdr, sizeof(s->hdr), 0 };
	if (len)
		bufs[n++] = (struct virtq_buf){ (u64)data, len, device_writes };
	bufs[n++] = (struct virtq_buf){ (u64)&s->status, 1, 1 };
	head = virtq_add(&b->q, bufs, n);
	if (head < 0)
		return -1;
	virtq_kick(&b->q);
	if (virtq_wait_used(&b->q, &used_len) != head)
		return -1;
	if (!b->irq_checked) {
		/*
		 * The device raised a used-buffer interrupt (the irqfd); with the
		 * IOAPIC pin masked it is only visible in InterruptStatus. Ack it
		 * as Linux's vm_interrupt() does, and check the ack cleared it.
		 */
		u32 before = virtio_ack_interrupt(b->dev);
		u32 after = virtio_read32(b->dev, VIRTIO_MMIO_INTERRUPT_STATUS);

		b->irq_checked = 1;
		prefix(b);
		puts("interrupt status ");
		put_hex(before);
		puts(" after ack ");
		put_hex(after);
		putc('\n');
	}
	return *(volatile u8 *)&s->status;
}

static void report(struct blk *b, const char *what, u64 sector, u64 count, int status)
{
	prefix(b);
	puts(what);
	if (count) {
		putc(' ');
		put_dec(sector);
		putc('+');
		put_dec(count);
	}
	putc(' ');
	if (status < 0) {
		puts("failed: ");
		puts(virtio_error());
	} else {
		put_status((u32)status);
	}
}

static void fill_pattern(u8 *buf, u64 seed, u64 sector, u64 count)
{
	u64 base = sector * SECTOR_SIZE;

	for (u64 i = 0; i < count * SECTOR_SIZE; i++)
		buf[i] = pattern(seed, base + i);
}

/* Index of the first byte that differs from the pattern, or -1. */
static long check_pattern(const u8 *buf, u64 seed, u64 sector, u64 count)
{
	u64 base = sector * SECTOR_SIZE;

	for (u64 i = 0; i < count * SECTOR_SIZE; i++)
		if (buf[i] != pattern(seed, base + i))
			return (long)i;
	return -1;
}

static long check_zero(const u8 *buf, u64 count)
{
	for (u64 i = 0; i < count * SECTOR_SIZE; i++)
		if (buf[i])
			return (long)i;
	return -1;
}

/* Reads sectors and reports "read S+N <status> match|zero|mismatch at X". */
static void read_and_check(struct blk *b, u64 sector, u64 count, u64 seed, int want_zero)
{
	int st;
	long bad;

	memset(b->data, 0xa5, count * SECTOR_SIZE);
	st = request(b, VIRTIO_BLK_T_IN, sector, b->data, (u32)(count * SECTOR_SIZE), 1);
	report(b, "read", sector, count, st);
	if (st == VIRTIO_BLK_S_OK) {
		bad = want_zero ? check_zero(b->data, count)
				: check_pattern(b->data, seed, sector, count);
		if (bad < 0) {
			puts(want_zero ? " zero" : " match");
		} else {
			puts(" mismatch at ");
			put_dec((u64)bad);
		}
	}
	putc('\n');
}

static void get_id(struct blk *b)
{
	char id[VIRTIO_BLK_ID_BYTES + 1];
	int st;

	memset(b->data, 0, VIRTIO_BLK_ID_BYTES);
	st = request(b, VIRTIO_BLK_T_GET_ID, 0, b->data, VIRTIO_BLK_ID_BYTES, 1);
	report(b, "get_id", 0, 0, st);
	if (st == VIRTIO_BLK_S_OK) {
		/* virtio 1.2 §5.2.6: NUL-terminated unless all 20 bytes are used. */
		memcpy(id, b->data, VIRTIO_BLK_ID_BYTES);
		id[VIRTIO_BLK_ID_BYTES] = 0;
		puts(" id ");
		puts(id);
	}
	putc('\n');
}

static void range_request(struct blk *b, u32 type, const char *what, u64 sector, u64 count)
{
	struct blk_range *r = (struct blk_range *)b->data;
	int st;

	r->sector = sector;
	r->num_sectors = (u32)count;
	r->flags = 0;
	st = request(b, type, 0, r, sizeof(*r), 0);
	report(b, what, sector, count, st);
	putc('\n');
}

static int has(const struct blk *b, int bit)
{
	return (b->dev->accepted >> bit) & 1;
}

static void basic(struct blk *b, int read_only)
{
	u64 seed = cmdline_u64(cmd, "blk.seed", 1);
	u64 sector = cmdline_u64(cmd, "blk.sector", 64);
	u64 count = cmdline_u64(cmd, "blk.sectors", 16);
	u64 dsector = cmdline_u64(cmd, "blk.discard", 1024);
	u64 dcount = cmdline_u64(cmd, "blk.discard_sectors", 256);
	u64 zsector = cmdline_u64(cmd, "blk.zero", 2048);
	u64 zcount = cmdline_u64(cmd, "blk.zero_sectors", 256);
	int st;

	if (count > 256)
		count = 256;
	if (dcount > 256)
		dcount = 256;
	if (zcount > 256)
		zcount = 256;

	get_id(b);
	if (read_only) {
		/* The host wrote the pattern; reading works, writing must not. */
		read_and_check(b, sector, count, seed, 0);
		fill_pattern(b->data, seed + 1, sector, count);
		st = request(b, VIRTIO_BLK_T_OUT, sector, b->data, (u32)(count * SECTOR_SIZE), 0);
		report(b, "write", sector, count, st);
		putc('\n');
		read_and_check(b, sector, count, seed, 0);
	} else {
		fill_pattern(b->data, seed, sector, count);
		st = request(b, VIRTIO_BLK_T_OUT, sector, b->data, (u32)(count * SECTOR_SIZE), 0);
		report(b, "write", sector, count, st);
		putc('\n');
		read_and_check(b, sector, count, seed, 0);
	}
	if (has(b, VIRTIO_BLK_F_FLUSH)) {
		st = request(b, VIRTIO_BLK_T_FLUSH, 0, 0, 0, 0);
		report(b, "flush", 0, 0, st);
		putc('\n');
	}
	if (has(b, VIRTIO_BLK_F_DISCARD)) {
		range_request(b, VIRTIO_BLK_T_DISCARD, "discard", dsector, dcount);
		read_and_check(b, dsector, dcount, 0, 1);
	}
	if (has(b, VIRTIO_BLK_F_WRITE_ZEROES)) {
		range_request(b, VIRTIO_BLK_T_WRITE_ZEROES, "write_zeroes", zsector, zcount);
		read_and_check(b, zsector, zcount, 0, 1);
	}
	/* Eight sectors from four before the end: must fail, not be cut short. */
	if (b->capacity >= 4) {
		st = request(b, VIRTIO_BLK_T_IN, b->capacity - 4, b->data, 8 * SECTOR_SIZE, 1);
		report(b, "read_past_end", b->capacity - 4, 8, st);
		putc('\n');
	}
}

/* ---- Benchmark ---- */

struct bench {
	struct blk *b;
	u32 type;
	u64 reqs;	 /* requests to complete */
	u32 bs;		 /* bytes per request */
	int random;	 /* LCG offsets instead of sequential */
	u64 span;	 /* sectors the offsets cover */
	u64 next_seq;	 /* next sequential sector */
	u64 lcg;	 /* random state */
	u8 *buf[MAX_QD]; /* one data buffer per slot */
	int slot_of[VIRTQ_MAX_SIZE];
	u64 errors;
};

static u64 next_sector(struct bench *w)
{
	u64 per = w->bs / SECTOR_SIZE;
	u64 blocks = w->span / per;
	u64 s;

	if (w->random) {
		/* Knuth's MMIX LCG; the high bits are the random ones. */
		w->lcg = w->lcg * 6364136223846793005UL + 1442695040888963407UL;
		return ((w->lcg >> 33) % blocks) * per;
	}
	s = w->next_seq;
	w->next_seq += per;
	if (w->next_seq + per > blocks * per)
		w->next_seq = 0;
	return s;
}

static int post(struct bench *w, int slot)
{
	struct blk_slot *s = &w->b->slots[slot];
	struct virtq_buf bufs[3];
	int head;

	s->hdr.type = w->type;
	s->hdr.reserved = 0;
	s->hdr.sector = next_sector(w);
	s->status = STATUS_NONE;
	bufs[0] = (struct virtq_buf){ (u64)&s->hdr, sizeof(s->hdr), 0 };
	bufs[1] = (struct virtq_buf){ (u64)w->buf[slot], w->bs, w->type == VIRTIO_BLK_T_IN };
	bufs[2] = (struct virtq_buf){ (u64)&s->status, 1, 1 };
	head = virtq_add(&w->b->q, bufs, 3);
	if (head < 0)
		return -1;
	w->slot_of[head] = slot;
	return 0;
}

/*
 * Keeps qd requests in flight until w->reqs complete: post, one kick per
 * batch, poll the used ring, re-post each finished slot. Returns TSC ticks.
 */
static u64 run_bench(struct bench *w, int qd)
{
	struct virtq *q = &w->b->q;
	u64 issued = 0, done = 0, start;
	int slot = 0;

	start = rdtsc();
	for (; slot < qd && issued < w->reqs; slot++, issued++)
		if (post(w, slot))
			return 0;
	virtq_kick(q);
	while (done < w->reqs) {
		u32 len;
		int head = virtq_get_used(q, &len);

		if (head < 0) {
			if (rdtsc() - start > VIRTQ_TIMEOUT_TSC * 4)
				return 0;
			__asm__ volatile("pause");
			continue;
		}
		slot = w->slot_of[head];
		if (w->b->slots[slot].status != VIRTIO_BLK_S_OK)
			w->errors++;
		done++;
		if (issued < w->reqs) {
			if (post(w, slot))
				return 0;
			issued++;
		}
		/* Publish once the completions seen so far are all re-posted. */
		if (q->used->idx == q->last_used)
			virtq_kick(q);
	}
	return rdtsc() - start;
}

static void bench_phase(struct bench *w, const char *name, int qd)
{
	u64 notifies = w->b->q.notifies, skipped = w->b->q.kicks_skipped;
	u64 ticks;

	w->errors = 0;
	prefix(w->b);
	puts("bench ");
	puts(name);
	puts(" start\n");
	ticks = run_bench(w, qd);
	prefix(w->b);
	puts("bench ");
	puts(name);
	puts(" reqs ");
	put_dec(w->reqs);
	puts(" bytes ");
	put_dec(w->reqs * w->bs);
	puts(" qd ");
	put_dec((u64)qd);
	puts(" tsc ");
	put_dec(ticks);
	puts(" notifies ");
	put_dec(w->b->q.notifies - notifies);
	puts(" suppressed ");
	put_dec(w->b->q.kicks_skipped - skipped);
	puts(" errors ");
	put_dec(w->errors);
	puts(ticks ? "\n" : " timeout\n");
}

static void bench(struct blk *b)
{
	static struct bench w;
	u64 mib = cmdline_u64(cmd, "blk.mib", 128);
	u64 bs = cmdline_u64(cmd, "blk.bs", 128 * 1024);
	u64 qd = cmdline_u64(cmd, "blk.qd", 32);
	u64 ops = cmdline_u64(cmd, "blk.ops", 8192);
	u64 rbs = cmdline_u64(cmd, "blk.rbs", 4096);
	u64 max_bs = bs > rbs ? bs : rbs;

	if (qd < 1)
		qd = 1;
	if (qd > MAX_QD)
		qd = MAX_QD;
	if (qd * 3 > b->q.size)
		qd = b->q.size / 3;
	if (!bs || bs % SECTOR_SIZE || !rbs || rbs % SECTOR_SIZE || max_bs > (4U << 20) ||
	    b->capacity < max_bs / SECTOR_SIZE) {
		prefix(b);
		puts("bench bad sizes\n");
		return;
	}
	memset(&w, 0, sizeof(w));
	w.b = b;
	w.span = b->capacity;
	for (u64 i = 0; i < qd; i++) {
		w.buf[i] = page_alloc(max_bs);
		if (!w.buf[i]) {
			prefix(b);
			puts("bench out of memory\n");
			return;
		}
		memset(w.buf[i], (int)i, max_bs);
	}

	w.type = VIRTIO_BLK_T_IN;
	w.bs = (u32)bs;
	w.reqs = (mib << 20) / bs;
	w.random = 0;
	w.next_seq = 0;
	bench_phase(&w, "seqread", (int)qd);

	w.type = VIRTIO_BLK_T_OUT;
	w.next_seq = 0;
	bench_phase(&w, "seqwrite", (int)qd);

	w.type = VIRTIO_BLK_T_IN;
	w.bs = (u32)rbs;
	w.reqs = ops;
	w.random = 1;
	w.lcg = cmdline_u64(cmd, "blk.seed", 1);
	bench_phase(&w, "randread", (int)qd);

	w.reqs = ops;
	w.lcg = cmdline_u64(cmd, "blk.seed", 1);
	bench_phase(&w, "randread_qd1", 1);
}

/* ---- Setup ---- */

/* Writes, reads back and checks 8 sectors per round; stops at the first failure. */
static void loop_io(struct blk *b)
{
	u64 limit = cmdline_u64(cmd, "blk.loops", 0);

	for (u64 i = 0; limit == 0 || i < limit; i++) {
		u64 sector = (i % 64) * 8;
		long bad = -1;
		int st;

		fill_pattern(b->data, i, sector, 8);
		st = request(b, VIRTIO_BLK_T_OUT, sector, b->data, 8 * SECTOR_SIZE, 0);
		if (st != VIRTIO_BLK_S_OK) {
			report(b, "loop write", sector, 8, st);
			putc('\n');
			return;
		}
		memset(b->data, 0xa5, 8 * SECTOR_SIZE);
		st = request(b, VIRTIO_BLK_T_IN, sector, b->data, 8 * SECTOR_SIZE, 1);
		if (st == VIRTIO_BLK_S_OK)
			bad = check_pattern(b->data, i, sector, 8);
		if (st != VIRTIO_BLK_S_OK || bad >= 0) {
			report(b, "loop read", sector, 8, st);
			puts(" mismatch\n");
			return;
		}
		prefix(b);
		puts("loop ");
		put_dec(i);
		putc('\n');
	}
}

static int setup(struct blk *b)
{
	u64 fmask;

	if (virtio_negotiate(b->dev, WANTED_FEATURES))
		return -1;
	prefix(b);
	puts("features offered ");
	put_hex(b->dev->offered);
	puts(" accepted ");
	put_hex(b->dev->accepted);
	putc('\n');
	/*
	 * A polling driver: the first request leaves interrupts on so that
	 * InterruptStatus can be checked; the benchmark turns them off.
	 */
	if (virtq_setup(&b->q, b->dev, 0, VIRTQ_MAX_SIZE, 0))
		return -1;
	if (virtio_driver_ok(b->dev))
		return -1;
	prefix(b);
	puts("queue 0 size ");
	put_dec(b->q.size);
	puts(" status ");
	put_hex(virtio_read32(b->dev, VIRTIO_MMIO_STATUS));
	putc('\n');

	b->capacity = virtio_config_read64(b->dev, BLK_CFG_CAPACITY);
	prefix(b);
	puts("capacity ");
	put_dec(b->capacity);
	fmask = b->dev->accepted;
	if (fmask & (1UL << VIRTIO_BLK_F_BLK_SIZE)) {
		puts(" blk_size ");
		put_dec(virtio_config_read32(b->dev, BLK_CFG_BLK_SIZE));
	}
	if (fmask & (1UL << VIRTIO_BLK_F_SEG_MAX)) {
		puts(" seg_max ");
		put_dec(virtio_config_read32(b->dev, BLK_CFG_SEG_MAX));
	}
	putc('\n');

	b->slots = page_alloc(MAX_QD * sizeof(struct blk_slot));
	b->data = page_alloc(256 * SECTOR_SIZE);
	if (!b->slots || !b->data)
		return -1;
	return 0;
}

static void run(const void *bp)
{
	static struct virtio_dev devs[VIRTIO_MAX_DEVICES];
	static struct blk blks[VIRTIO_MAX_DEVICES];
	int n, nblk = 0;

	cmd = cmdline(bp);
	puts("cmdline ");
	if (cmd)
		puts(cmd);
	putc('\n');
	if (cmdline_is(cmd, "discover", "acpi")) {
		u64 rsdp = 0;

		n = virtio_find_acpi(devs, VIRTIO_MAX_DEVICES, &rsdp);
		puts("acpi rsdp ");
		put_hex(rsdp);
		putc('\n');
	} else {
		n = virtio_find_cmdline(cmd, devs, VIRTIO_MAX_DEVICES);
	}
	if (n < 0) {
		puts("discovery failed: ");
		puts(virtio_error());
		putc('\n');
		reset();
	}
	puts("virtio-mmio devices ");
	put_dec((u64)n);
	putc('\n');

	for (int i = 0; i < n; i++) {
		struct blk *b = &blks[nblk];

		puts("virtio-mmio ");
		put_hex(devs[i].base);
		puts(" size ");
		put_hex(devs[i].size);
		puts(" gsi ");
		put_dec(devs[i].gsi);
		if (virtio_probe(&devs[i])) {
			puts(" probe failed: ");
			puts(virtio_error());
			putc('\n');
			continue;
		}
		puts(" version 2 device ");
		put_dec(devs[i].device_id);
		puts(" vendor ");
		put_hex(virtio_read32(&devs[i], VIRTIO_MMIO_VENDOR_ID));
		putc('\n');
		if (devs[i].device_id != VIRTIO_BLK_ID)
			continue;
		b->n = nblk++;
		b->dev = &devs[i];
		prefix(b);
		puts("mmio ");
		put_hex(devs[i].base);
		puts(" gsi ");
		put_dec(devs[i].gsi);
		putc('\n');
		if (setup(b)) {
			prefix(b);
			puts("setup failed: ");
			puts(virtio_error());
			putc('\n');
			continue;
		}
		if (cmdline_is(cmd, "blk.test", "bench")) {
			get_id(b);
			/* Polling only: no used-buffer interrupts from here on. */
			b->q.avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
			bench(b);
		} else if (cmdline_is(cmd, "blk.test", "loop")) {
			loop_io(b);
		} else {
			basic(b, cmdline_is(cmd, "blk.test", "readonly"));
		}
		prefix(b);
		puts("done\n");
	}
	puts("virtio_blk done\n");
	reset();
}

void main(const void *bp)
{
	usermode_run(run, bp);
}
