/*
 * Drives the virtio-balloon device the way Linux's virtio_balloon driver
 * does: touches balloon.touch MiB of its memory, then follows the target
 * the host sets in the configuration space (num_pages), giving those pages
 * to the host on the inflate queue and taking them back on the deflate
 * queue, and writing what it holds to `actual`. Statistics go to the host
 * on the statistics queue, refilled each time the host returns the buffer.
 *
 * Command line:
 *   balloon.touch=N   MiB to touch and to offer to the balloon (default 64)
 *   balloon.once=1    end as soon as the first target is reached (default:
 *                     end when the target is back to 0 after an inflate)
 *   balloon.polls=N   give up after N polls of the target (default 2000000)
 *
 * Lines on the serial port: "balloon: touched N MiB", "balloon: inflated
 * P", "balloon: deflated to P zero Z of D" (Z of the D pages taken back
 * read zero: the host released them), "balloon: stats sent N", and
 * "virtio_balloon done" before the i8042 reset.
 */
#include "guest.h"
#include "usermode.h"
#include "virtio.h"

/* virtio-balloon (virtio 1.2 §5.5): device ID 5. */
#define VIRTIO_BALLOON_ID 5
#define F_STATS_VQ 1
#define F_DEFLATE_ON_OOM 2
#define PFNS_PER_CHAIN 256
/* Chains posted before one kick. */
#define BATCH 16
/* Statistics the guest reports (Linux's VIRTIO_BALLOON_S_* tags). */
#define S_MINFLT 3
#define S_MEMFREE 4
#define S_MEMTOT 5
/* The free memory the guest claims, for the host to find in its API. */
#define CLAIMED_FREE 0x1234000UL

struct balloon {
	struct virtio_dev *dev;
	struct virtq inflate, deflate, stats;
	int has_stats;
	u32 *pfns[BATCH];
	u8 *stat_buf;
	u64 stats_sent;
	u8 *region;	/* the touched memory, page by page */
	u64 pages;	/* its size in 4 KiB pages */
	u64 held;	/* pages in the balloon: region[0 .. held) */
	u64 mem_bytes;
};

static void fail(const char *what)
{
	puts("balloon: ");
	puts(what);
	puts(" failed: ");
	puts(virtio_error());
	putc('\n');
	puts("virtio_balloon done\n");
	reset();
}

static void put_stat(u8 *p, u16 tag, u64 val)
{
	p[0] = (u8)tag;
	p[1] = (u8)(tag >> 8);
	for (int i = 0; i < 8; i++)
		p[2 + i] = (u8)(val >> (8 * i));
}

/* Fills the statistics buffer and gives it to the device. */
static void send_stats(struct balloon *b)
{
	struct virtq_buf buf = { (u64)b->stat_buf, 30, 0 };

	put_stat(b->stat_buf, S_MEMFREE, CLAIMED_FREE);
	put_stat(b->stat_buf + 10, S_MEMTOT, b->mem_bytes);
	put_stat(b->stat_buf + 20, S_MINFLT, b->stats_sent);
	if (virtq_add(&b->stats, &buf, 1) < 0)
		fail("stats add");
	virtq_kick(&b->stats);
	b->stats_sent++;
}

/* The host returned the statistics buffer: it wants fresh numbers. */
static void poll_stats(struct balloon *b)
{
	u32 len;

	if (!b->has_stats)
		return;
	if (virtq_get_used(&b->stats, &len) >= 0)
		send_stats(b);
}

/*
 * Sends the PFNs of region pages [first, first + count) on queue q, in
 * chains of PFNS_PER_CHAIN, BATCH chains per kick, and waits for them.
 */
static void send_pfns(struct balloon *b, struct virtq *q, u64 first, u64 count)
{
	while (count) {
		int chains = 0;

		while (count && chains < BATCH) {
			u64 n = count < PFNS_PER_CHAIN ? count : PFNS_PER_CHAIN;
			struct virtq_buf buf = { (u64)b->pfns[chains], (u32)(n * 4), 0 };

			for (u64 i = 0; i < n; i++)
				b->pfns[chains][i] = (u32)(((u64)b->region >> 12) + first + i);
			if (virtq_add(q, &buf, 1) < 0)
				fail("pfn add");
			first += n;
			count -= n;
			chains++;
		}
		virtq_kick(q);
		for (int i = 0; i < chains; i++) {
			u32 len;

			if (virtq_wait_used(q, &len) < 0)
				fail("pfn wait");
		}
	}
}

static void set_actual(struct balloon *b)
{
	virtio_write32(b->dev, VIRTIO_MMIO_CONFIG + 4, (u32)b->held);
}

static void touch(struct balloon *b, u64 first, u64 count)
{
	for (u64 i = first; i < first + count; i++)
		*(volatile u64 *)(b->region + i * 4096) = 0x5a5a000000000000UL | i;
}

static void setup(struct balloon *b, u64 touch_mib)
{
	u64 wanted = 1UL << VIRTIO_F_VERSION_1 | 1UL << F_STATS_VQ | 1UL << F_DEFLATE_ON_OOM;

	if (virtio_negotiate(b->dev, wanted))
		fail("negotiate");
	puts("balloon: features offered ");
	put_hex(b->dev->offered);
	puts(" accepted ");
	put_hex(b->dev->accepted);
	putc('\n');
	b->has_stats = (b->dev->accepted >> F_STATS_VQ) & 1;
	if (virtq_setup(&b->inflate, b->dev, 0, VIRTQ_MAX_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT) ||
	    virtq_setup(&b->deflate, b->dev, 1, VIRTQ_MAX_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT))
		fail("queue setup");
	if (b->has_stats &&
	    virtq_setup(&b->stats, b->dev, 2, VIRTQ_MAX_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT))
		fail("stats queue setup");
	if (virtio_driver_ok(b->dev))
		fail("driver ok");
	for (int i = 0; i < BATCH; i++) {
		b->pfns[i] = page_alloc(4096);
		if (!b->pfns[i])
			fail("pfn page");
	}
	b->stat_buf = page_alloc(4096);
	b->pages = touch_mib * 256;
	b->region = page_alloc(b->pages * 4096);
	if (!b->stat_buf || !b->region)
		fail("region");
	/* As Linux does: the first statistics go with the queue set up. */
	if (b->has_stats)
		send_stats(b);
	touch(b, 0, b->pages);
	puts("balloon: touched ");
	put_dec(touch_mib);
	puts(" MiB\n");
}

static void follow(struct balloon *b, int once, u64 polls)
{
	int inflated_once = 0;
	u64 reported = ~0UL;

	for (u64 poll = 0; poll < polls; poll++) {
		u64 target = virtio_config_read32(b->dev, 0);

		poll_stats(b);
		if (target > b->pages)
			target = b->pages;
		if (target > b->held) {
			send_pfns(b, &b->inflate, b->held, target - b->held);
			b->held = target;
			set_actual(b);
			puts("balloon: inflated ");
			put_dec(b->held);
			putc('\n');
			inflated_once = 1;
			reported = target;
			if (once)
				return;
		} else if (target < b->held) {
			u64 from = target, n = b->held - target, zero = 0;

			send_pfns(b, &b->deflate, from, n);
			b->held = target;
			set_actual(b);
			/* Released pages come back as zero pages. */
			for (u64 i = from; i < from + n; i++)
				zero += *(volatile u64 *)(b->region + i * 4096) == 0;
			touch(b, from, n);
			puts("balloon: deflated to ");
			put_dec(b->held);
			puts(" zero ");
			put_dec(zero);
			puts(" of ");
			put_dec(n);
			putc('\n');
			reported = target;
		} else if (target != reported) {
			reported = target;
		}
		if (inflated_once && b->held == 0)
			return;
		/* About a millisecond between polls. */
		for (u64 t = rdtsc(); rdtsc() - t < 2000000;)
			;
	}
	puts("balloon: gave up waiting for the target\n");
}

static u64 ram_bytes(const void *bp)
{
	const u8 *p = bp;
	u8 n = p[BP_E820_ENTRIES];
	u64 total = 0;

	for (u8 i = 0; i < n; i++) {
		const struct e820_entry *e = (const void *)(p + BP_E820_TABLE + 20UL * i);

		if (e->type == 1)
			total += e->size;
	}
	return total;
}

static void run(const void *bp)
{
	static struct virtio_dev devs[VIRTIO_MAX_DEVICES];
	static struct balloon b;
	const char *cmd = cmdline(bp);
	u64 touch_mib = cmdline_u64(cmd, "balloon.touch", 64);
	int n = virtio_find_cmdline(cmd, devs, VIRTIO_MAX_DEVICES);

	b.mem_bytes = ram_bytes(bp);
	if (n < 0)
		fail("discovery");
	for (int i = 0; i < n; i++) {
		if (virtio_probe(&devs[i]) || devs[i].device_id != VIRTIO_BALLOON_ID)
			continue;
		puts("balloon: device at ");
		put_hex(devs[i].base);
		putc('\n');
		b.dev = &devs[i];
		setup(&b, touch_mib);
		follow(&b, (int)cmdline_u64(cmd, "balloon.once", 0),
		       cmdline_u64(cmd, "balloon.polls", 2000000));
		puts("balloon: stats sent ");
		put_dec(b.stats_sent);
		putc('\n');
		break;
	}
	if (!b.dev)
		puts("balloon: no device\n");
	puts("virtio_balloon done\n");
	reset();
}

void main(const void *bp)
{
	usermode_run(run, bp);
}
