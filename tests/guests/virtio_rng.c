/*
 * Drives every virtio-rng (entropy) device it finds the way Linux's
 * virtio_mmio and virtio_rng drivers do, reads random bytes from it and
 * reports what it got on the serial port, one "rng<N>: ..." line per step.
 *
 * Command line:
 *   discover=cmdline|acpi  find devices through virtio_mmio.device= words
 *                          (default) or the ACPI DSDT (LNRO0005 devices)
 *   rng.reads=N            requests in the basic scenario (default 4, at
 *                          most MAX_READS)
 *   rng.size=N             bytes per request (default 4096, at most
 *                          MAX_SIZE)
 *   rng.total=N            bytes to read in total in the throughput step
 *                          (default 0: no such step), rng.size at a time
 *
 * All the work runs in ring 3 (usermode.h); the run ends with "virtio_rng
 * done" and an i8042 reset.
 */
#include "guest.h"
#include "usermode.h"
#include "virtio.h"

/* virtio-rng (virtio 1.2 §5.4): device ID 4, one queue, no feature bits. */
#define VIRTIO_RNG_ID 4
#define MAX_READS 16
#define MAX_SIZE (64 * 1024)

struct rng {
	int n;
	struct virtio_dev *dev;
	struct virtq q;
	u8 *buf[MAX_READS];
	u8 *guard; /* device-readable buffer, must stay untouched */
};

static const char *cmd;

static void prefix(const struct rng *r)
{
	puts("rng");
	put_dec((u64)r->n);
	puts(": ");
}

static void fail(const struct rng *r, const char *what)
{
	prefix(r);
	puts(what);
	puts(" failed: ");
	puts(virtio_error());
	putc('\n');
}

/*
 * Posts one chain of n buffers and waits for it. Returns the used length,
 * or -1 on a queue failure.
 */
static long request(struct rng *r, const struct virtq_buf *bufs, int n)
{
	u32 len;
	int head = virtq_add(&r->q, bufs, n);

	if (head < 0)
		return -1;
	virtq_kick(&r->q);
	if (virtq_wait_used(&r->q, &len) != head)
		return -1;
	return (long)len;
}

static u64 count_zero(const u8 *b, u64 len)
{
	u64 z = 0;

	for (u64 i = 0; i < len; i++)
		z += b[i] == 0;
	return z;
}

static int same(const u8 *a, const u8 *b, u64 len)
{
	for (u64 i = 0; i < len; i++)
		if (a[i] != b[i])
			return 0;
	return 1;
}

static int setup(struct rng *r, u64 size)
{
	u64 wanted = 1UL << VIRTIO_F_VERSION_1;

	if (virtio_negotiate(r->dev, wanted))
		return -1;
	prefix(r);
	puts("features offered ");
	put_hex(r->dev->offered);
	puts(" accepted ");
	put_hex(r->dev->accepted);
	putc('\n');
	/* A polling driver: no used-buffer interrupts. */
	if (virtq_setup(&r->q, r->dev, 0, VIRTQ_MAX_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT))
		return -1;
	if (virtio_driver_ok(r->dev))
		return -1;
	prefix(r);
	puts("queue 0 size ");
	put_dec(r->q.size);
	puts(" status ");
	put_hex(virtio_read32(r->dev, VIRTIO_MMIO_STATUS));
	putc('\n');
	for (int i = 0; i < MAX_READS; i++) {
		r->buf[i] = page_alloc(size);
		if (!r->buf[i])
			return -1;
	}
	r->guard = page_alloc(4096);
	return r->guard ? 0 : -1;
}

/*
 * Reads `reads` buffers of `size` bytes, each filled with 0xa5 first, and
 * reports each read, then a summary: bytes, zero bytes, whether every
 * buffer differs from every other one.
 */
static void basic(struct rng *r, u64 reads, u64 size)
{
	u64 total = 0, zeroes = 0;
	int distinct = 1;

	for (u64 i = 0; i < reads; i++) {
		struct virtq_buf b = { (u64)r->buf[i], (u32)size, 1 };
		long len;

		memset(r->buf[i], 0xa5, size);
		len = request(r, &b, 1);
		prefix(r);
		puts("read ");
		put_dec(i);
		if (len < 0) {
			puts(" failed: ");
			puts(virtio_error());
			putc('\n');
			return;
		}
		puts(" len ");
		put_dec((u64)len);
		puts(" zeroes ");
		put_dec(count_zero(r->buf[i], (u64)len));
		putc('\n');
		total += (u64)len;
		zeroes += count_zero(r->buf[i], (u64)len);
	}
	for (u64 i = 0; i < reads; i++)
		for (u64 j = i + 1; j < reads; j++)
			if (same(r->buf[i], r->buf[j], size))
				distinct = 0;
	prefix(r);
	puts("bytes ");
	put_dec(total);
	puts(" zeroes ");
	put_dec(zeroes);
	puts(distinct ? " distinct" : " repeated");
	putc('\n');

	/* One request over two buffers: the device fills both. */
	{
		struct virtq_buf b[2] = {
			{ (u64)r->buf[0], 100, 1 },
			{ (u64)r->buf[1], 60, 1 },
		};
		long len;

		memset(r->buf[0], 0, 100);
		memset(r->buf[1], 0, 60);
		len = request(r, b, 2);
		prefix(r);
		puts("split len ");
		if (len < 0) {
			puts("failed");
		} else {
			put_dec((u64)len);
			puts(" zeroes ");
			put_dec(count_zero(r->buf[0], 100) + count_zero(r->buf[1], 60));
		}
		putc('\n');
	}

	/*
	 * A device-readable buffer: the device must return the chain with
	 * nothing written.
	 */
	{
		struct virtq_buf b = { (u64)r->guard, 64, 0 };
		long len;

		memset(r->guard, 0x5a, 64);
		len = request(r, &b, 1);
		prefix(r);
		puts("readonly len ");
		if (len < 0)
			puts("failed");
		else
			put_dec((u64)len);
		puts(count_zero(r->guard, 64) == 0 && r->guard[0] == 0x5a && r->guard[63] == 0x5a
			     ? " untouched"
			     : " written");
		putc('\n');
	}
}

/* Reads `total` bytes `size` at a time; reports the bytes and TSC ticks. */
static void throughput(struct rng *r, u64 total, u64 size)
{
	u64 got = 0, start = rdtsc();

	while (got < total) {
		struct virtq_buf b = { (u64)r->buf[0], (u32)size, 1 };
		long len = request(r, &b, 1);

		if (len <= 0) {
			fail(r, "throughput read");
			return;
		}
		got += (u64)len;
	}
	prefix(r);
	puts("throughput bytes ");
	put_dec(got);
	puts(" tsc ");
	put_dec(rdtsc() - start);
	putc('\n');
}

/*
 * Reads `size` bytes forever and reports each round ("rngN: loop K len L
 * zeroes Z"): a guest to snapshot while it reads.
 */
static void loop(struct rng *r, u64 size)
{
	for (u64 round = 0;; round++) {
		struct virtq_buf b = { (u64)r->buf[0], (u32)size, 1 };
		long len;

		memset(r->buf[0], 0, size);
		len = request(r, &b, 1);
		if (len < 0) {
			fail(r, "loop read");
			return;
		}
		prefix(r);
		puts("loop ");
		put_dec(round);
		puts(" len ");
		put_dec((u64)len);
		puts(" zeroes ");
		put_dec(count_zero(r->buf[0], (u64)len));
		putc('\n');
	}
}

static void run(const void *bp)
{
	static struct virtio_dev devs[VIRTIO_MAX_DEVICES];
	static struct rng rngs[VIRTIO_MAX_DEVICES];
	int n, nrng = 0;
	u64 reads, size, total;

	cmd = cmdline(bp);
	puts("cmdline ");
	if (cmd)
		puts(cmd);
	putc('\n');
	reads = cmdline_u64(cmd, "rng.reads", 4);
	size = cmdline_u64(cmd, "rng.size", 4096);
	total = cmdline_u64(cmd, "rng.total", 0);
	if (reads < 2)
		reads = 2;
	if (reads > MAX_READS)
		reads = MAX_READS;
	if (size == 0 || size > MAX_SIZE)
		size = 4096;
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
		struct rng *r = &rngs[nrng];

		puts("virtio-mmio ");
		put_hex(devs[i].base);
		puts(" gsi ");
		put_dec(devs[i].gsi);
		if (virtio_probe(&devs[i])) {
			puts(" probe failed: ");
			puts(virtio_error());
			putc('\n');
			continue;
		}
		puts(" device ");
		put_dec(devs[i].device_id);
		putc('\n');
		if (devs[i].device_id != VIRTIO_RNG_ID)
			continue;
		r->n = nrng++;
		r->dev = &devs[i];
		if (setup(r, size)) {
			fail(r, "setup");
			continue;
		}
		if (cmdline_is(cmd, "rng.test", "loop"))
			loop(r, size);
		else if (total)
			throughput(r, total, size);
		else
			basic(r, reads, size);
		prefix(r);
		puts("done\n");
	}
	puts("rng devices ");
	put_dec((u64)nrng);
	putc('\n');
	puts("virtio_rng done\n");
	reset();
}

void main(const void *bp)
{
	usermode_run(run, bp);
}
