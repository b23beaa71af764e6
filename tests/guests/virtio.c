/* virtio-mmio discovery, initialization and split virtqueues; see virtio.h. */
#include "virtio.h"
#include "usermode.h"

static const char *last_error = "no error";

const char *virtio_error(void)
{
	return last_error;
}

static int fail(const char *why)
{
	last_error = why;
	return VIRTIO_ERR;
}

/* Full barrier: orders the avail index store before the used flags load. */
static inline void mb(void)
{
	__asm__ volatile("lock; addl $0, (%%rsp)" : : : "memory", "cc");
}

/* Compiler barrier: x86 keeps stores in order, and loads in order. */
static inline void barrier(void)
{
	__asm__ volatile("" : : : "memory");
}

/* ---- Command-line discovery ---- */

static int is_digit(char c)
{
	return c >= '0' && c <= '9';
}

static int hex_value(char c)
{
	if (is_digit(c))
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* An unsigned number, decimal or 0x-hex, as the kernel's simple_strtoull(, 0). */
static int parse_number(const char **s, u64 *out)
{
	const char *p = *s;
	u64 v = 0;
	int digits = 0;

	if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
		p += 2;
		for (int d; (d = hex_value(*p)) >= 0; p++, digits++)
			v = v * 16 + (u64)d;
	} else {
		for (; is_digit(*p); p++, digits++)
			v = v * 10 + (u64)(*p - '0');
	}
	if (!digits)
		return VIRTIO_ERR;
	*s = p;
	*out = v;
	return VIRTIO_OK;
}

static int starts_with(const char *s, const char *prefix)
{
	while (*prefix)
		if (*s++ != *prefix++)
			return 0;
	return 1;
}

int virtio_find_cmdline(const char *cmdline, struct virtio_dev *devs, int max)
{
	static const char key[] = "virtio_mmio.device=";
	const char *p = cmdline;
	int n = 0;

	if (!p)
		return 0;
	while (*p) {
		u64 size, base, irq;

		while (*p == ' ')
			p++;
		if (!starts_with(p, key)) {
			while (*p && *p != ' ')
				p++;
			continue;
		}
		p += sizeof(key) - 1;
		/* <size>[KMG]@<base>:<irq>[:<id>] (Linux virtio_mmio.c, vm_cmdline_set). */
		if (parse_number(&p, &size))
			return fail("virtio_mmio.device: bad size");
		switch (*p) {
		case 'K': case 'k': size <<= 10; p++; break;
		case 'M': case 'm': size <<= 20; p++; break;
		case 'G': case 'g': size <<= 30; p++; break;
		}
		if (*p++ != '@' || parse_number(&p, &base))
			return fail("virtio_mmio.device: bad base address");
		if (*p++ != ':' || parse_number(&p, &irq))
			return fail("virtio_mmio.device: bad interrupt");
		while (*p && *p != ' ')
			p++;
		if (n < max) {
			memset(&devs[n], 0, sizeof(devs[n]));
			devs[n].base = base;
			devs[n].size = size;
			devs[n].gsi = (u32)irq;
		}
		n++;
	}
	return n < max ? n : max;
}

/* ---- ACPI discovery ---- */

/* Where the RSDP may be (ACPI 6.5 §5.2.5.1): the BIOS read-only area. */
#define RSDP_SEARCH_START 0xe0000UL
#define RSDP_SEARCH_END 0x100000UL
/* Tables must lie in the identity-mapped first GiB and be of sane size. */
#define ACPI_ADDR_LIMIT 0x40000000UL
#define ACPI_MAX_TABLE 0x10000U
#define SDT_HEADER_SIZE 36
/* FADT fields (ACPI 6.5 §5.2.9, table 5.9). */
#define FADT_DSDT 40
#define FADT_X_DSDT 140
/* Resource descriptors (ACPI 6.5 §6.4.3.4 and §6.4.3.6). */
#define ACPI_MEMORY32_FIXED 0x86
#define ACPI_MEMORY32_FIXED_LEN 9
#define ACPI_EXTENDED_IRQ 0x89
/* How far after the _HID string its _CRS may start. */
#define HID_CRS_WINDOW 128

static u32 get16(const u8 *p)
{
	return (u32)p[0] | (u32)p[1] << 8;
}

static u32 get32(const u8 *p)
{
	return get16(p) | get16(p + 2) << 16;
}

static u64 get64(const u8 *p)
{
	return (u64)get32(p) | (u64)get32(p + 4) << 32;
}

static u8 checksum(const u8 *p, u32 len)
{
	u8 sum = 0;

	while (len--)
		sum = (u8)(sum + *p++);
	return sum;
}

static int bytes_eq(const u8 *a, const char *b, u32 n)
{
	for (u32 i = 0; i < n; i++)
		if (a[i] != (u8)b[i])
			return 0;
	return 1;
}

static const u8 *fail_table(const char *why)
{
	last_error = why;
	return 0;
}

/* A system description table at addr with signature sig, or NULL. */
static const u8 *sdt_at(u64 addr, const char *sig, u32 *len)
{
	const u8 *t;

	if (!addr || addr >= ACPI_ADDR_LIMIT - ACPI_MAX_TABLE)
		return fail_table("ACPI table pointer outside the first GiB");
	t = (const u8 *)addr;
	if (!bytes_eq(t, sig, 4))
		return fail_table("ACPI table signature mismatch");
	*len = get32(t + 4);
	if (*len < SDT_HEADER_SIZE || *len > ACPI_MAX_TABLE)
		return fail_table("ACPI table length out of range");
	if (checksum(t, *len))
		return fail_table("ACPI table checksum is wrong");
	return t;
}

static const u8 *find_rsdp(void)
{
	for (u64 a = RSDP_SEARCH_START; a < RSDP_SEARCH_END; a += 16) {
		const u8 *p = (const u8 *)a;

		/* ACPI 6.5 §5.2.5.3: v1 checksum over 20 bytes, extended over all 36. */
		if (bytes_eq(p, "RSD PTR ", 8) && !checksum(p, 20) && p[15] >= 2 &&
		    !checksum(p, 36))
			return p;
	}
	return 0;
}

/* Decodes the _CRS after the _HID string at aml[hid]: base, size and GSI. */
static int decode_crs(const u8 *aml, u32 len, u32 from, struct virtio_dev *d)
{
	u32 end = from + HID_CRS_WINDOW < len ? from + HID_CRS_WINDOW : len;
	int have_mem = 0;

	for (u32 i = from; i + 3 <= end; i++) {
		if (!have_mem && aml[i] == ACPI_MEMORY32_FIXED &&
		    get16(aml + i + 1) == ACPI_MEMORY32_FIXED_LEN && i + 12 <= len) {
			/* tag, length, info, base (le32), size (le32) */
			d->base = get32(aml + i + 4);
			d->size = get32(aml + i + 8);
			have_mem = 1;
			i += 11;
		} else if (have_mem && aml[i] == ACPI_EXTENDED_IRQ && get16(aml + i + 1) >= 6 &&
			   i + 9 <= len && aml[i + 4] >= 1) {
			/* tag, length, flags, count, first interrupt number (le32) */
			d->gsi = get32(aml + i + 5);
			return VIRTIO_OK;
		}
	}
	return fail("LNRO0005 device without Memory32Fixed and extended interrupt");
}

int virtio_find_acpi(struct virtio_dev *devs, int max, u64 *rsdp_addr)
{
	const u8 *rsdp = find_rsdp();
	const u8 *xsdt, *fadt = 0, *dsdt;
	u32 xsdt_len, fadt_len = 0, dsdt_len;
	u64 dsdt_addr;
	int n = 0;

	if (!rsdp)
		return fail("no ACPI 2.0+ RSDP with valid checksums in 0xE0000-0xFFFFF");
	*rsdp_addr = (u64)rsdp;
	/* RSDP XsdtAddress at offset 24 (ACPI 6.5 table 5.3). */
	xsdt = sdt_at(get64(rsdp + 24), "XSDT", &xsdt_len);
	if (!xsdt)
		return VIRTIO_ERR;
	for (u32 off = SDT_HEADER_SIZE; off + 8 <= xsdt_len && !fadt; off += 8) {
		u64 entry = get64(xsdt + off);

		if (entry && entry < ACPI_ADDR_LIMIT && bytes_eq((const u8 *)entry, "FACP", 4))
			fadt = sdt_at(entry, "FACP", &fadt_len);
	}
	if (!fadt)
		return fail("no valid FADT (FACP) in the XSDT");
	dsdt_addr = fadt_len >= FADT_X_DSDT + 8 ? get64(fadt + FADT_X_DSDT) : 0;
	if (!dsdt_addr)
		dsdt_addr = get32(fadt + FADT_DSDT);
	dsdt = sdt_at(dsdt_addr, "DSDT", &dsdt_len);
	if (!dsdt)
		return VIRTIO_ERR;
	for (u32 i = SDT_HEADER_SIZE; i + 8 <= dsdt_len; i++) {
		if (!bytes_eq(dsdt + i, "LNRO0005", 8))
			continue;
		if (n < max) {
			memset(&devs[n], 0, sizeof(devs[n]));
			if (decode_crs(dsdt, dsdt_len, i + 8, &devs[n]))
				return VIRTIO_ERR;
		}
		n++;
		i += 7;
	}
	return n < max ? n : max;
}

/* ---- Device initialization ---- */

int virtio_probe(struct virtio_dev *d)
{
	if (virtio_read32(d, VIRTIO_MMIO_MAGIC_VALUE) != VIRTIO_MMIO_MAGIC)
		return fail("bad MagicValue");
	if (virtio_read32(d, VIRTIO_MMIO_VERSION) != VIRTIO_MMIO_VERSION_2)
		return fail("Version is not 2");
	d->device_id = virtio_read32(d, VIRTIO_MMIO_DEVICE_ID);
	if (!d->device_id)
		return fail("DeviceID 0: no device in this slot");
	return VIRTIO_OK;
}

void virtio_reset(struct virtio_dev *d)
{
	virtio_write32(d, VIRTIO_MMIO_STATUS, 0);
	/* virtio 1.2 §4.2.3.1: wait until Status reads back 0. */
	while (virtio_read32(d, VIRTIO_MMIO_STATUS))
		;
}

static void add_status(struct virtio_dev *d, u32 bits)
{
	virtio_write32(d, VIRTIO_MMIO_STATUS, virtio_read32(d, VIRTIO_MMIO_STATUS) | bits);
}

int virtio_negotiate(struct virtio_dev *d, u64 wanted)
{
	u64 offered;

	virtio_reset(d);
	add_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
	add_status(d, VIRTIO_STATUS_DRIVER);
	virtio_write32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	offered = (u64)virtio_read32(d, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
	virtio_write32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	offered |= virtio_read32(d, VIRTIO_MMIO_DEVICE_FEATURES);
	d->offered = offered;
	d->accepted = offered & wanted;
	if (!(d->accepted & (1UL << VIRTIO_F_VERSION_1))) {
		add_status(d, VIRTIO_STATUS_FAILED);
		return fail("device does not offer VIRTIO_F_VERSION_1");
	}
	virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)(d->accepted >> 32));
	virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)d->accepted);
	add_status(d, VIRTIO_STATUS_FEATURES_OK);
	/* virtio 1.2 §3.1.1 step 6: re-read; the device may refuse the subset. */
	if (!(virtio_read32(d, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK)) {
		add_status(d, VIRTIO_STATUS_FAILED);
		return fail("device refused FEATURES_OK");
	}
	return VIRTIO_OK;
}

int virtq_setup(struct virtq *q, struct virtio_dev *d, u16 index, u16 size, u16 avail_flags)
{
	u32 max;
	u64 desc_bytes, avail_bytes, used_bytes;
	u8 *mem;

	virtio_write32(d, VIRTIO_MMIO_QUEUE_SEL, index);
	if (virtio_read32(d, VIRTIO_MMIO_QUEUE_READY))
		return fail("queue already ready");
	max = virtio_read32(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
	if (!max)
		return fail("QueueNumMax is 0: no such queue");
	if (size > max)
		size = (u16)max;
	if (size > VIRTQ_MAX_SIZE)
		size = VIRTQ_MAX_SIZE;
	/* Split rings need a power of two (virtio 1.2 §2.7). */
	while (size & (size - 1))
		size &= (u16)(size - 1);

	/* Layout (virtio 1.2 §2.7, alignments 16/2/4): desc | avail, page | used. */
	desc_bytes = 16UL * size;
	avail_bytes = 6 + 2UL * size;
	used_bytes = 6 + 8UL * size;
	u64 used_off = (desc_bytes + avail_bytes + 4095) & ~4095UL;
	mem = page_alloc(used_off + used_bytes);
	if (!mem)
		return fail("no memory for the virtqueue");
	memset(mem, 0, used_off + used_bytes);

	memset(q, 0, sizeof(*q));
	q->dev = d;
	q->index = index;
	q->size = size;
	q->desc = (volatile struct virtq_desc *)mem;
	q->avail = (volatile struct virtq_avail *)(mem + desc_bytes);
	q->used = (volatile struct virtq_used *)(mem + used_off);
	for (u16 i = 0; i < size; i++)
		q->desc[i].next = (u16)(i + 1);
	q->num_free = size;
	q->avail->flags = avail_flags;

	virtio_write32(d, VIRTIO_MMIO_QUEUE_NUM, size);
	virtio_write32(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(u64)q->desc);
	virtio_write32(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)((u64)q->desc >> 32));
	virtio_write32(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)(u64)q->avail);
	virtio_write32(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (u32)((u64)q->avail >> 32));
	virtio_write32(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)(u64)q->used);
	virtio_write32(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (u32)((u64)q->used >> 32));
	virtio_write32(d, VIRTIO_MMIO_QUEUE_READY, 1);
	if (virtio_read32(d, VIRTIO_MMIO_QUEUE_READY) != 1)
		return fail("QueueReady did not stick");
	return VIRTIO_OK;
}

int virtio_driver_ok(struct virtio_dev *d)
{
	u32 status;

	add_status(d, VIRTIO_STATUS_DRIVER_OK);
	status = virtio_read32(d, VIRTIO_MMIO_STATUS);
	if (status & VIRTIO_STATUS_NEEDS_RESET)
		return fail("device set DEVICE_NEEDS_RESET");
	if (!(status & VIRTIO_STATUS_DRIVER_OK))
		return fail("DRIVER_OK did not stick");
	return VIRTIO_OK;
}

u32 virtio_config_read32(const struct virtio_dev *d, u32 offset)
{
	u32 gen, v;

	/* virtio 1.2 §2.5.1 / §4.2.2: retry until ConfigGeneration is stable. */
	do {
		gen = virtio_read32(d, VIRTIO_MMIO_CONFIG_GENERATION);
		v = virtio_read32(d, VIRTIO_MMIO_CONFIG + offset);
	} while (gen != virtio_read32(d, VIRTIO_MMIO_CONFIG_GENERATION));
	return v;
}

u64 virtio_config_read64(const struct virtio_dev *d, u32 offset)
{
	u32 gen, lo, hi;

	do {
		gen = virtio_read32(d, VIRTIO_MMIO_CONFIG_GENERATION);
		lo = virtio_read32(d, VIRTIO_MMIO_CONFIG + offset);
		hi = virtio_read32(d, VIRTIO_MMIO_CONFIG + offset + 4);
	} while (gen != virtio_read32(d, VIRTIO_MMIO_CONFIG_GENERATION));
	return (u64)hi << 32 | lo;
}

u32 virtio_ack_interrupt(const struct virtio_dev *d)
{
	u32 status = virtio_read32(d, VIRTIO_MMIO_INTERRUPT_STATUS);

	if (status)
		virtio_write32(d, VIRTIO_MMIO_INTERRUPT_ACK, status);
	return status;
}

/* ---- Split virtqueue ---- */

int virtq_add(struct virtq *q, const struct virtq_buf *bufs, int n)
{
	u16 head, i, last = 0;

	if (n <= 0 || n > q->num_free)
		return fail("not enough free descriptors");
	head = i = q->free_head;
	for (int k = 0; k < n; k++) {
		volatile struct virtq_desc *d = &q->desc[i];

		d->addr = bufs[k].addr;
		d->len = bufs[k].len;
		d->flags = (u16)((bufs[k].device_writes ? VIRTQ_DESC_F_WRITE : 0) |
				 (k + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
		last = i;
		i = d->next;
	}
	q->free_head = q->desc[last].next;
	q->num_free = (u16)(q->num_free - n);
	q->avail->ring[q->avail_shadow & (q->size - 1)] = head;
	q->avail_shadow++;
	return head;
}

int virtq_kick(struct virtq *q)
{
	u16 old = q->avail_pub;
	int needed;

	if (q->avail_shadow == q->avail_pub)
		return 0;
	/* Descriptors and ring entries before the index (virtio 1.2 §2.7.13). */
	barrier();
	q->avail->idx = q->avail_shadow;
	q->avail_pub = q->avail_shadow;
	/* The index store before the flags load (virtio 1.2 §2.7.13.4). */
	mb();
	if (q->event_idx) {
		/* avail_event follows the used ring (§2.7.8); vring_need_event(). */
		volatile u16 *avail_event = (volatile u16 *)((volatile u8 *)q->used + 4 +
							     8UL * q->size);
		u16 event = *avail_event;

		needed = (u16)(q->avail_shadow - event - 1) < (u16)(q->avail_shadow - old);
	} else {
		needed = !(q->used->flags & VIRTQ_USED_F_NO_NOTIFY);
	}
	if (!needed) {
		q->kicks_skipped++;
		return 0;
	}
	virtio_write32(q->dev, VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
	q->notifies++;
	return 1;
}

int virtq_get_used(struct virtq *q, u32 *len)
{
	volatile struct virtq_used_elem *e;
	u32 id;
	u16 i, n = 1;

	if (q->used->idx == q->last_used)
		return VIRTIO_ERR;
	/* The element after the index that announced it (x86 keeps loads in order). */
	barrier();
	e = &q->used->ring[q->last_used & (q->size - 1)];
	id = e->id;
	*len = e->len;
	q->last_used++;
	if (id >= q->size)
		return fail("used ring returned an out-of-range descriptor id");
	/* Free the chain: find its tail and put the chain on the free list. */
	i = (u16)id;
	while ((q->desc[i].flags & VIRTQ_DESC_F_NEXT) && n < q->size) {
		i = q->desc[i].next;
		n++;
	}
	q->desc[i].next = q->free_head;
	q->free_head = (u16)id;
	q->num_free = (u16)(q->num_free + n);
	return (int)id;
}

int virtq_wait_used(struct virtq *q, u32 *len)
{
	u64 start = rdtsc();

	for (;;) {
		if (q->used->idx != q->last_used)
			return virtq_get_used(q, len);
		if (rdtsc() - start > VIRTQ_TIMEOUT_TSC)
			return fail("timed out waiting for the used ring");
		__asm__ volatile("pause");
	}
}
