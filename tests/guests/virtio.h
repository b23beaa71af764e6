/*
 * A minimal virtio-mmio driver for the test guests: device discovery (the
 * kernel command line or the ACPI DSDT, as Linux's virtio_mmio does), the
 * virtio-mmio version 2 register interface, feature negotiation and split
 * virtqueues, polled by the driver.
 *
 * References: virtio 1.2 §2.7 (split virtqueues), §3.1 (device
 * initialization), §4.2 (virtio over MMIO); Linux
 * drivers/virtio/virtio_mmio.c and drivers/virtio/virtio_ring.c.
 *
 * The register windows sit at 0xC000_1000+: call it from a guest running
 * under usermode_run(), which maps that range.
 */
#ifndef EMBER_VIRTIO_H
#define EMBER_VIRTIO_H

#include "guest.h"

/* virtio-mmio registers (virtio 1.2 §4.2.2, table 4.1). */
#define VIRTIO_MMIO_MAGIC_VALUE 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_VENDOR_ID 0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100

/* "virt" in little-endian (virtio 1.2 §4.2.2). */
#define VIRTIO_MMIO_MAGIC 0x74726976
/* The non-legacy register layout. */
#define VIRTIO_MMIO_VERSION_2 2

/* Device status bits (virtio 1.2 §2.1). */
#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 64
#define VIRTIO_STATUS_FAILED 128

/* Transport feature bits (virtio 1.2 §6). */
#define VIRTIO_F_INDIRECT_DESC 28
#define VIRTIO_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32

/* InterruptStatus bits (virtio 1.2 §4.2.2). */
#define VIRTIO_MMIO_INT_VRING 1
#define VIRTIO_MMIO_INT_CONFIG 2

/* Split virtqueue flags (virtio 1.2 §2.7.5, §2.7.6, §2.7.8). */
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY 1

/* Largest queue this driver sets up (every Ember device offers 256). */
#define VIRTQ_MAX_SIZE 256
/* Devices virtio_find_* report at most. */
#define VIRTIO_MAX_DEVICES 16
/* Polling budget of virtq_wait_used, in TSC ticks (seconds on any host). */
#define VIRTQ_TIMEOUT_TSC (30UL * 1000 * 1000 * 1000)

/* One virtio-mmio device: where it is and what the driver learned. */
struct virtio_dev {
	u64 base;	 /* register window, guest-physical = virtual */
	u64 size;	 /* window size */
	u32 gsi;	 /* interrupt line */
	u32 device_id;	 /* DeviceID register, once probed */
	u64 offered;	 /* DeviceFeatures, once negotiated */
	u64 accepted;	 /* DriverFeatures written */
};

struct virtq_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct virtq_avail {
	u16 flags;
	u16 idx;
	u16 ring[];
};

struct virtq_used_elem {
	u32 id;
	u32 len;
};

struct virtq_used {
	u16 flags;
	u16 idx;
	struct virtq_used_elem ring[];
};

/* A split virtqueue and the driver's view of it. */
struct virtq {
	struct virtio_dev *dev;
	u16 index;
	u16 size;
	volatile struct virtq_desc *desc;
	volatile struct virtq_avail *avail;
	volatile struct virtq_used *used;
	u16 free_head;	   /* first free descriptor */
	u16 num_free;	   /* free descriptors */
	u16 avail_shadow;  /* next avail->idx to publish */
	u16 avail_pub;	   /* avail->idx last published */
	u16 last_used;	   /* used ring entries consumed */
	u64 notifies;	   /* QueueNotify writes */
	u64 kicks_skipped; /* kicks the device said it did not need */
	/*
	 * VIRTIO_F_EVENT_IDX was negotiated: virtq_kick() then follows the
	 * device's avail_event instead of VIRTQ_USED_F_NO_NOTIFY (virtio 1.2
	 * §2.7.10). Set by the driver after virtq_setup().
	 */
	int event_idx;
};

/* One buffer of a descriptor chain. */
struct virtq_buf {
	u64 addr;
	u32 len;
	int device_writes; /* VIRTQ_DESC_F_WRITE */
};

/* Why a virtio_* call failed; virtio_error() has the details. */
#define VIRTIO_OK 0
#define VIRTIO_ERR (-1)

/* Text of the last failure (static storage, overwritten by the next). */
const char *virtio_error(void);

/* Reads the TSC (user mode may: CR4.TSD is clear). */
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

/*
 * Devices named by `virtio_mmio.device=<size>@<base>:<irq>` words of the
 * command line (Linux's VIRTIO_MMIO_CMDLINE_DEVICES syntax), in order.
 * Returns how many (at most max), or VIRTIO_ERR on a malformed word.
 */
int virtio_find_cmdline(const char *cmdline, struct virtio_dev *devs, int max);

/*
 * Devices described in the ACPI DSDT as _HID "LNRO0005" with a _CRS of one
 * Memory32Fixed and one extended interrupt, in DSDT order: the RSDP is
 * searched in 0xE0000-0xFFFFF, then XSDT -> FADT -> X_DSDT, checking
 * signatures and checksums. *rsdp_addr gets where the RSDP was found.
 * Returns how many devices (at most max), or VIRTIO_ERR.
 */
int virtio_find_acpi(struct virtio_dev *devs, int max, u64 *rsdp_addr);

static inline u32 virtio_read32(const struct virtio_dev *d, u32 reg)
{
	return *(volatile u32 *)(d->base + reg);
}

static inline void virtio_write32(const struct virtio_dev *d, u32 reg, u32 val)
{
	*(volatile u32 *)(d->base + reg) = val;
}

/*
 * Checks MagicValue, Version 2 and a non-zero DeviceID (0 is an empty
 * slot), and stores the DeviceID. VIRTIO_ERR if it is not a device.
 */
int virtio_probe(struct virtio_dev *d);

/*
 * Device initialization up to FEATURES_OK (virtio 1.2 §3.1.1): reset,
 * ACKNOWLEDGE, DRIVER, read both feature words, accept `wanted` & offered
 * (VERSION_1 must be offered and wanted), set FEATURES_OK and read it back.
 */
int virtio_negotiate(struct virtio_dev *d, u64 wanted);

/*
 * Sets up virtqueue `index` with min(size, QueueNumMax) entries in fresh
 * pages and marks it ready. avail_flags goes to the available ring's flags
 * (VIRTQ_AVAIL_F_NO_INTERRUPT: a polling driver needs no interrupts).
 */
int virtq_setup(struct virtq *q, struct virtio_dev *d, u16 index, u16 size, u16 avail_flags);

/* Sets DRIVER_OK and checks the device did not ask for a reset. */
int virtio_driver_ok(struct virtio_dev *d);

/* Writes 0 to Status and waits until it reads back 0. */
void virtio_reset(struct virtio_dev *d);

/* Device configuration reads, consistent across ConfigGeneration. */
u32 virtio_config_read32(const struct virtio_dev *d, u32 offset);
u64 virtio_config_read64(const struct virtio_dev *d, u32 offset);

/* Reads InterruptStatus and acknowledges what it reported; returns it. */
u32 virtio_ack_interrupt(const struct virtio_dev *d);

/*
 * Adds a chain of n buffers (device-readable ones first) to the available
 * ring without publishing it. Returns the head descriptor, or VIRTIO_ERR
 * if fewer than n descriptors are free.
 */
int virtq_add(struct virtq *q, const struct virtq_buf *bufs, int n);

/*
 * Publishes the chains added since the last kick and notifies the device
 * unless it set VIRTQ_USED_F_NO_NOTIFY, or, with event_idx, unless its
 * avail_event lies outside the entries just published. Returns 1 if it
 * wrote QueueNotify.
 */
int virtq_kick(struct virtq *q);

/*
 * Takes the next used element: returns its head (and its length in *len)
 * and frees its descriptors, or VIRTIO_ERR if the used ring has nothing new.
 */
int virtq_get_used(struct virtq *q, u32 *len);

/* virtq_get_used, polling up to VIRTQ_TIMEOUT_TSC. */
int virtq_wait_used(struct virtq *q, u32 *len);

#endif
