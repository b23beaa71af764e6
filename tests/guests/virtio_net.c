/*
 * Drives the first virtio-net device it finds the way Linux's virtio_net
 * driver does without offloads (virtio 1.2 §5.1): one receive queue kept
 * full of buffers, one transmit queue, a 12-byte virtio_net_hdr_v1 before
 * every frame. On top of it, the least of an IPv4 host: it answers ARP
 * requests for its address, resolves the host's address with an ARP request
 * of its own, says hello to the host over UDP and then serves UDP
 * datagrams sent to its port:
 *
 *   payload "!quit"          report the counters on the serial port, reset
 *   payload "!tx N LEN"      send N datagrams of LEN payload bytes (each
 *                            starting with its 8-byte sequence number) back
 *                            to the sender as fast as the queue allows,
 *                            then reply "!txdone N <tsc ticks>"
 *   payload "!rx"            count the datagrams that follow instead of
 *                            echoing them ...
 *   payload "!rxend"         ... and reply "!rxstat <frames> <frame bytes>
 *                            <tsc ticks from the first to the last>"
 *   payload "!reset"         reset the device, set it up again as a
 *                            reloaded driver would, and say hello again
 *   payload "!hold"          stop taking received frames until the device
 *                            has filled every receive buffer (frames that
 *                            arrive meanwhile must wait in the TAP), report
 *                            "net: hold: N of M receive buffers filled",
 *                            then carry on
 *   anything else            echoed back to the sender (addresses and
 *                            ports swapped, IP checksum recomputed, UDP
 *                            checksum 0)
 *
 * Command line:
 *   discover=cmdline|acpi  find devices through virtio_mmio.device= words
 *                          (default) or the ACPI DSDT
 *   net.ip=A.B.C.D         the guest's address (default 10.200.0.2)
 *   net.host_ip=A.B.C.D    the host's address on the TAP (default 10.200.0.1)
 *   net.port=N             the guest's UDP port (default 7000)
 *   net.host_port=N        where the hello datagram goes (default 7001)
 *   net.event_idx=1        also accept VIRTIO_F_EVENT_IDX and kick as its
 *                          avail_event says
 *   net.split=N            describe every buffer with two descriptors,
 *                          split after byte N (header included), the
 *                          second one SPLIT_GAP bytes further on
 *   net.idle=N             give up after N * 10^9 TSC ticks (a few seconds
 *                          each) without a frame for the guest (default 10)
 *
 * Report lines start with "net: "; the run ends with "virtio_net done" and
 * an i8042 reset. All the work runs in ring 3 (usermode.h), polling: the
 * queues ask for no interrupts.
 */
#include "guest.h"
#include "usermode.h"
#include "virtio.h"

/* virtio-net (virtio 1.2 §5.1): device ID, feature bits, config layout. */
#define VIRTIO_NET_ID 1
#define VIRTIO_NET_F_MTU 3
#define VIRTIO_NET_F_MAC 5
#define NET_CFG_MAC 0
#define NET_CFG_MTU 10
#define RX_QUEUE 0
#define TX_QUEUE 1
/* struct virtio_net_hdr_v1 (§5.1.6): with VERSION_1 it has num_buffers. */
#define NET_HDR_LEN 12
#define NET_HDR_NUM_BUFFERS 10

#define WANTED_FEATURES                                                                  \
	((1UL << VIRTIO_F_VERSION_1) | (1UL << VIRTIO_NET_F_MAC) | (1UL << VIRTIO_NET_F_MTU))

/*
 * Buffer per descriptor: the header and a whole 1514-byte Ethernet frame
 * (Linux's "small" receive buffers without VIRTIO_NET_F_MRG_RXBUF), rounded
 * to 2 KiB so that buffer i sits at i * BUF_SIZE.
 */
#define BUF_SIZE 2048
#define MAX_FRAME 1514
/*
 * With net.split=N every buffer is described by two descriptors: its
 * first N bytes, and the rest SPLIT_GAP bytes further on, so that a device
 * that misplaces data across a descriptor boundary is caught.
 */
#define SPLIT_GAP 64

/* Ethernet, ARP (RFC 826), IPv4 (RFC 791) and UDP (RFC 768) layouts. */
#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define ARP_LEN 28
#define ARP_REQUEST 1
#define ARP_REPLY 2
#define IP_HLEN 20
#define IP_PROTO_UDP 17
#define IP_TTL 64
#define UDP_HLEN 8
/* IPv4 flags and fragment offset: MF and the offset mark a fragment. */
#define IP_FRAG_MASK 0x3fff

/* Datagrams whose content is printed (the rest are only counted). */
#define PRINT_DATAGRAMS 3
/* Bytes of a datagram printed. */
#define PRINT_BYTES 40
/* Frames published on the transmit queue before a kick. */
#define TX_BATCH 64
/* TSC ticks between ARP retries and how many are sent. */
#define ARP_RETRY_TSC 1000000000UL
#define ARP_TRIES 5

struct net {
	struct virtio_dev *dev;
	struct virtq rx, tx;
	u8 *rxbufs; /* BUF_SIZE per receive descriptor */
	u8 *txbufs; /* BUF_SIZE per transmit descriptor */
	u8 mac[6];
	u32 ip, host_ip;
	u16 port, host_port;
	u8 host_mac[6];
	int have_host_mac;
	u64 idle_tsc;
	u32 split;	 /* 0, or where buffers are split in two descriptors */
	u16 rx_chains; /* receive buffers posted at setup */
	int tx_unkicked;
	int rx_unkicked;
	/* "!hold" was received. */
	int hold;
	/* "!rx" mode. */
	int counting;
	u64 count_frames, count_bytes, count_first, count_last;
	/* Counters reported at "!quit". */
	u64 rx_frames, tx_frames, echoed, ignored, arp_answered, bad_udp, bad_num_buffers;
	u64 printed;
};

static const char *cmd;

/* ---- Byte order and checksums ---- */

static u16 get_be16(const u8 *p)
{
	return (u16)(p[0] << 8 | p[1]);
}

static u32 get_be32(const u8 *p)
{
	return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3];
}

static void put_be16(u8 *p, u16 v)
{
	p[0] = (u8)(v >> 8);
	p[1] = (u8)v;
}

static void put_be32(u8 *p, u32 v)
{
	put_be16(p, (u16)(v >> 16));
	put_be16(p + 2, (u16)v);
}

static void copy_bytes(u8 *dst, const u8 *src, u32 n)
{
	while (n--)
		*dst++ = *src++;
}

/* The Internet checksum (RFC 1071) of an IPv4 header. */
static u16 ip_checksum(const u8 *p, u32 len)
{
	u32 sum = 0;

	for (u32 i = 0; i + 1 < len; i += 2)
		sum += get_be16(p + i);
	if (len & 1)
		sum += (u32)p[len - 1] << 8;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (u16)~sum;
}

/* ---- Output ---- */

static void put_ip(u32 ip)
{
	for (int i = 3; i >= 0; i--) {
		put_dec((ip >> (i * 8)) & 0xff);
		if (i)
			putc('.');
	}
}

static void put_mac(const u8 *mac)
{
	static const char digits[] = "0123456789abcdef";

	for (int i = 0; i < 6; i++) {
		putc(digits[mac[i] >> 4]);
		putc(digits[mac[i] & 15]);
		if (i < 5)
			putc(':');
	}
}

static void say(const char *s)
{
	puts("net: ");
	puts(s);
}

/* ---- Command line ---- */

/* A dotted-quad IPv4 address of exactly len characters, or def. */
static u32 parse_ip(const char *s, size_t len, u32 def)
{
	u32 ip = 0, part = 0;
	int parts = 0, digits = 0;

	for (size_t i = 0; i <= len; i++) {
		char c = i < len ? s[i] : '.';

		if (c >= '0' && c <= '9' && digits < 3) {
			part = part * 10 + (u32)(c - '0');
			digits++;
		} else if (c == '.' && digits && part <= 255 && parts < 4) {
			ip = ip << 8 | part;
			parts++;
			part = 0;
			digits = 0;
		} else {
			return def;
		}
	}
	return parts == 4 ? ip : def;
}

static u32 cmdline_ip(const char *key, u32 def)
{
	size_t len;
	const char *v = cmdline_value(cmd, key, &len);

	return v ? parse_ip(v, len, def) : def;
}

/* ---- Queues ---- */

/* Posts the receive buffer of the next free descriptor. */
static int rx_post(struct net *n)
{
	u64 buf = (u64)(n->rxbufs + (u64)n->rx.free_head * BUF_SIZE);
	struct virtq_buf b[2] = {
		{ buf, BUF_SIZE, 1 },
		{ buf + n->split + SPLIT_GAP, BUF_SIZE - n->split - SPLIT_GAP, 1 },
	};

	if (n->split)
		b[0].len = n->split;
	if (virtq_add(&n->rx, b, n->split ? 2 : 1) < 0)
		return -1;
	n->rx_unkicked++;
	return 0;
}

static void tx_reclaim(struct net *n)
{
	u32 len;

	while (virtq_get_used(&n->tx, &len) >= 0)
		;
}

static void kick_all(struct net *n)
{
	if (n->tx_unkicked) {
		virtq_kick(&n->tx);
		n->tx_unkicked = 0;
	}
	if (n->rx_unkicked) {
		virtq_kick(&n->rx);
		n->rx_unkicked = 0;
	}
}

/*
 * The buffer of the transmit descriptor tx_send() will use next, after
 * waiting for one to be free. Its first NET_HDR_LEN bytes are the header
 * (all zero: no checksum or segmentation offload, §5.1.6.2). NULL if the
 * device returns nothing for too long.
 */
static u8 *tx_buffer(struct net *n)
{
	u64 start = rdtsc();

	tx_reclaim(n);
	while (n->tx.num_free < (n->split ? 2 : 1)) {
		kick_all(n);
		tx_reclaim(n);
		if (rdtsc() - start > n->idle_tsc) {
			say("transmit queue stuck\n");
			return 0;
		}
	}
	return n->txbufs + (u64)n->tx.free_head * BUF_SIZE;
}

/*
 * Publishes the frame of len bytes written at frame, just after the header
 * of the buffer tx_buffer() returned, with no tx_buffer() or tx_reclaim()
 * call since (either may change which descriptor is next).
 */
static void tx_send(struct net *n, u8 *frame, u32 len)
{
	u8 *hdr = frame - NET_HDR_LEN;
	u32 total = NET_HDR_LEN + len;
	struct virtq_buf b[2] = { { (u64)hdr, total, 0 }, { 0, 0, 0 } };
	int count = 1;

	if (hdr != n->txbufs + (u64)n->tx.free_head * BUF_SIZE) {
		say("transmit buffer is not the next descriptor's\n");
		return;
	}
	for (int i = 0; i < NET_HDR_LEN; i++)
		hdr[i] = 0;
	if (n->split && total > n->split) {
		/* Move the tail SPLIT_GAP bytes on, from the end (overlapping). */
		for (u32 i = total; i-- > n->split;)
			hdr[i + SPLIT_GAP] = hdr[i];
		b[0].len = n->split;
		b[1] = (struct virtq_buf){ (u64)(hdr + n->split + SPLIT_GAP), total - n->split, 0 };
		count = 2;
	}
	virtq_add(&n->tx, b, count);
	n->tx_frames++;
	if (++n->tx_unkicked >= TX_BATCH)
		kick_all(n);
}

/* ---- ARP ---- */

static void send_arp(struct net *n, int op, const u8 *dst_mac, const u8 *target_mac,
		     u32 target_ip)
{
	u8 *f = tx_buffer(n);

	if (!f)
		return;
	f += NET_HDR_LEN;
	copy_bytes(f, dst_mac, 6);
	copy_bytes(f + 6, n->mac, 6);
	put_be16(f + 12, ETH_P_ARP);
	f += ETH_HLEN;
	put_be16(f, 1);		/* hardware type: Ethernet */
	put_be16(f + 2, ETH_P_IP); /* protocol type */
	f[4] = 6;
	f[5] = 4;
	put_be16(f + 6, (u16)op);
	copy_bytes(f + 8, n->mac, 6);
	put_be32(f + 14, n->ip);
	copy_bytes(f + 18, target_mac, 6);
	put_be32(f + 24, target_ip);
	tx_send(n, f - ETH_HLEN, ETH_HLEN + ARP_LEN);
}

static void handle_arp(struct net *n, const u8 *f, u32 len)
{
	const u8 *a = f + ETH_HLEN;
	u32 sender_ip, target_ip;

	if (len < ETH_HLEN + ARP_LEN || get_be16(a) != 1 || get_be16(a + 2) != ETH_P_IP ||
	    a[4] != 6 || a[5] != 4) {
		n->ignored++;
		return;
	}
	sender_ip = get_be32(a + 14);
	target_ip = get_be32(a + 24);
	if (get_be16(a + 6) == ARP_REQUEST && target_ip == n->ip) {
		if (!n->arp_answered++) {
			say("arp request from ");
			put_ip(sender_ip);
			puts(" answered\n");
		}
		send_arp(n, ARP_REPLY, a + 8, a + 8, sender_ip);
	} else if (get_be16(a + 6) == ARP_REPLY && sender_ip == n->host_ip && target_ip == n->ip) {
		if (!n->have_host_mac) {
			say("arp reply ");
			put_ip(sender_ip);
			puts(" is at ");
			put_mac(a + 8);
			putc('\n');
		}
		copy_bytes(n->host_mac, a + 8, 6);
		n->have_host_mac = 1;
	} else {
		n->ignored++;
	}
}

/* ---- UDP ---- */

/*
 * Writes Ethernet, IPv4 and UDP headers for a datagram of payload_len
 * bytes to dst:dst_port at f; returns the frame length.
 */
static u32 udp_headers(struct net *n, u8 *f, const u8 *dst_mac, u32 dst_ip, u16 dst_port,
		       u32 payload_len)
{
	static u16 ip_id;
	u8 *ip = f + ETH_HLEN, *udp = ip + IP_HLEN;

	copy_bytes(f, dst_mac, 6);
	copy_bytes(f + 6, n->mac, 6);
	put_be16(f + 12, ETH_P_IP);
	ip[0] = 0x45; /* version 4, 5 words */
	ip[1] = 0;
	put_be16(ip + 2, (u16)(IP_HLEN + UDP_HLEN + payload_len));
	put_be16(ip + 4, ip_id++);
	put_be16(ip + 6, 0x4000); /* don't fragment */
	ip[8] = IP_TTL;
	ip[9] = IP_PROTO_UDP;
	put_be16(ip + 10, 0);
	put_be32(ip + 12, n->ip);
	put_be32(ip + 16, dst_ip);
	put_be16(ip + 10, ip_checksum(ip, IP_HLEN));
	put_be16(udp, n->port);
	put_be16(udp + 2, dst_port);
	put_be16(udp + 4, (u16)(UDP_HLEN + payload_len));
	put_be16(udp + 6, 0); /* no checksum (RFC 768) */
	return ETH_HLEN + IP_HLEN + UDP_HLEN + payload_len;
}

/* Sends a text datagram. */
static void send_text(struct net *n, const u8 *dst_mac, u32 dst_ip, u16 dst_port,
		      const char *text, u32 len)
{
	u8 *f = tx_buffer(n);

	if (!f)
		return;
	f += NET_HDR_LEN;
	copy_bytes(f + ETH_HLEN + IP_HLEN + UDP_HLEN, (const u8 *)text, len);
	tx_send(n, f, udp_headers(n, f, dst_mac, dst_ip, dst_port, len));
}

/* Appends the decimal v to buf at *pos. */
static void append_dec(char *buf, u32 *pos, u64 v)
{
	char tmp[21];
	int i = 0;

	do {
		tmp[i++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (i)
		buf[(*pos)++] = tmp[--i];
}

static void append(char *buf, u32 *pos, const char *s)
{
	while (*s)
		buf[(*pos)++] = *s++;
}

/* Parses the decimal numbers of a command's payload after its name. */
static int command_args(const u8 *p, u32 len, u64 *args, int max)
{
	int n = 0;
	u32 i = 0;

	while (i < len && n < max) {
		u64 v = 0;
		int digits = 0;

		while (i < len && p[i] == ' ')
			i++;
		while (i < len && p[i] >= '0' && p[i] <= '9') {
			v = v * 10 + (u64)(p[i++] - '0');
			digits++;
		}
		if (!digits)
			break;
		args[n++] = v;
	}
	return n;
}

static int is_command(const u8 *p, u32 len, const char *name)
{
	u32 i = 0;

	for (; name[i]; i++)
		if (i >= len || p[i] != (u8)name[i])
			return 0;
	return i == len || p[i] == ' ';
}

/*
 * "!tx N LEN": N datagrams of LEN bytes to the sender, publishing in
 * batches, then waits for the device to have sent them all.
 */
static void bench_tx(struct net *n, const u8 *mac, u32 ip, u16 port, u64 count, u64 len)
{
	char reply[64];
	u32 pos = 0;
	u64 start, ticks;

	if (len < 8)
		len = 8;
	if (len > MAX_FRAME - ETH_HLEN - IP_HLEN - UDP_HLEN)
		len = MAX_FRAME - ETH_HLEN - IP_HLEN - UDP_HLEN;
	start = rdtsc();
	for (u64 seq = 0; seq < count; seq++) {
		u8 *f = tx_buffer(n);
		u8 *payload;

		if (!f)
			return;
		f += NET_HDR_LEN;
		payload = f + ETH_HLEN + IP_HLEN + UDP_HLEN;
		/* The rest of the payload is whatever the buffer held. */
		put_be32(payload, (u32)(seq >> 32));
		put_be32(payload + 4, (u32)seq);
		tx_send(n, f, udp_headers(n, f, mac, ip, port, (u32)len));
	}
	kick_all(n);
	while (n->tx.num_free != n->tx.size) {
		tx_reclaim(n);
		if (rdtsc() - start > n->idle_tsc * 4) {
			say("tx bench: the device did not return every buffer\n");
			break;
		}
	}
	ticks = rdtsc() - start;
	append(reply, &pos, "!txdone ");
	append_dec(reply, &pos, count);
	append(reply, &pos, " ");
	append_dec(reply, &pos, ticks);
	send_text(n, mac, ip, port, reply, pos);
	kick_all(n);
}

static void report(struct net *n)
{
	say("echoed ");
	put_dec(n->echoed);
	puts(" counted ");
	put_dec(n->count_frames);
	puts(" ignored ");
	put_dec(n->ignored);
	puts(" bad_udp ");
	put_dec(n->bad_udp);
	puts(" bad_num_buffers ");
	put_dec(n->bad_num_buffers);
	puts(" arp_answered ");
	put_dec(n->arp_answered);
	puts(" rx_frames ");
	put_dec(n->rx_frames);
	puts(" tx_frames ");
	put_dec(n->tx_frames);
	puts(" notifies rx ");
	put_dec(n->rx.notifies);
	puts(" tx ");
	put_dec(n->tx.notifies);
	putc('\n');
}

/* Handles a command; returns 1 for "!quit", 2 for "!reset". */
static int handle_command(struct net *n, const u8 *f, const u8 *p, u32 len)
{
	const u8 *ip = f + ETH_HLEN;
	const u8 *udp = ip + (ip[0] & 15) * 4;
	u32 src_ip = get_be32(ip + 12);
	u16 src_port = get_be16(udp);
	u64 args[2];
	char reply[96];
	u32 pos = 0;
	u8 mac[6];

	copy_bytes(mac, f + 6, 6);
	if (is_command(p, len, "!quit"))
		return 1;
	if (is_command(p, len, "!tx") && command_args(p + 3, len - 3, args, 2) == 2) {
		bench_tx(n, mac, src_ip, src_port, args[0], args[1]);
	} else if (is_command(p, len, "!hold")) {
		n->hold = 1;
	} else if (is_command(p, len, "!reset")) {
		return 2;
	} else if (is_command(p, len, "!rx")) {
		n->counting = 1;
		n->count_frames = n->count_bytes = 0;
		n->count_first = n->count_last = 0;
	} else if (is_command(p, len, "!rxend")) {
		n->counting = 0;
		append(reply, &pos, "!rxstat ");
		append_dec(reply, &pos, n->count_frames);
		append(reply, &pos, " ");
		append_dec(reply, &pos, n->count_bytes);
		append(reply, &pos, " ");
		append_dec(reply, &pos, n->count_last - n->count_first);
		send_text(n, mac, src_ip, src_port, reply, pos);
	} else {
		say("unknown command\n");
		n->ignored++;
	}
	return 0;
}

/* Echoes the datagram in frame f (len bytes, IPv4 total length ip_len). */
static void echo(struct net *n, const u8 *f, u32 ip_len)
{
	u8 *out = tx_buffer(n);
	u8 *ip, *udp;
	u32 ihl = (u32)(f[ETH_HLEN] & 15) * 4;
	u8 tmp[4];

	if (!out)
		return;
	out += NET_HDR_LEN;
	copy_bytes(out, f, ETH_HLEN + ip_len);
	copy_bytes(out, f + 6, 6);
	copy_bytes(out + 6, n->mac, 6);
	ip = out + ETH_HLEN;
	udp = ip + ihl;
	copy_bytes(tmp, ip + 12, 4);
	copy_bytes(ip + 12, ip + 16, 4);
	copy_bytes(ip + 16, tmp, 4);
	ip[8] = IP_TTL;
	put_be16(ip + 10, 0);
	put_be16(ip + 10, ip_checksum(ip, ihl));
	copy_bytes(tmp, udp, 2);
	copy_bytes(udp, udp + 2, 2);
	copy_bytes(udp + 2, tmp, 2);
	put_be16(udp + 6, 0);
	tx_send(n, out, ETH_HLEN + ip_len);
	n->echoed++;
}

static void print_datagram(struct net *n, const u8 *ip, const u8 *udp, const u8 *p, u32 len)
{
	if (n->printed++ >= PRINT_DATAGRAMS)
		return;
	say("udp from ");
	put_ip(get_be32(ip + 12));
	putc(':');
	put_dec(get_be16(udp));
	puts(" len ");
	put_dec(len);
	puts(": ");
	for (u32 i = 0; i < len && i < PRINT_BYTES; i++)
		putc(p[i] >= 0x20 && p[i] < 0x7f ? (char)p[i] : '.');
	putc('\n');
}

/* Handles an IPv4 frame; returns what handle_command() returns, or 0. */
static int handle_ip(struct net *n, const u8 *f, u32 len)
{
	const u8 *ip = f + ETH_HLEN, *udp, *payload;
	u32 ihl, ip_len, udp_len;

	if (len < ETH_HLEN + IP_HLEN || ip[0] >> 4 != 4) {
		n->ignored++;
		return 0;
	}
	ihl = (u32)(ip[0] & 15) * 4;
	ip_len = get_be16(ip + 2);
	if (ip[9] != IP_PROTO_UDP || get_be32(ip + 16) != n->ip) {
		n->ignored++;
		return 0;
	}
	if (ihl < IP_HLEN || ip_len < ihl + UDP_HLEN || ETH_HLEN + ip_len > len ||
	    (get_be16(ip + 6) & IP_FRAG_MASK) || ip_checksum(ip, ihl)) {
		n->bad_udp++;
		return 0;
	}
	udp = ip + ihl;
	udp_len = get_be16(udp + 4);
	if (get_be16(udp + 2) != n->port) {
		n->ignored++;
		return 0;
	}
	if (udp_len < UDP_HLEN || udp_len > ip_len - ihl) {
		n->bad_udp++;
		return 0;
	}
	payload = udp + UDP_HLEN;
	udp_len -= UDP_HLEN;
	if (udp_len && payload[0] == '!')
		return handle_command(n, f, payload, udp_len);
	if (n->counting) {
		u64 now = rdtsc();

		if (!n->count_frames)
			n->count_first = now;
		n->count_last = now;
		n->count_frames++;
		n->count_bytes += len;
		return 0;
	}
	print_datagram(n, ip, udp, payload, udp_len);
	echo(n, f, ip_len);
	return 0;
}

/* Handles one received frame (after the virtio-net header). */
static int handle_frame(struct net *n, const u8 *f, u32 len)
{
	n->rx_frames++;
	if (len < ETH_HLEN) {
		n->ignored++;
		return 0;
	}
	switch (get_be16(f + 12)) {
	case ETH_P_ARP:
		handle_arp(n, f, len);
		return 0;
	case ETH_P_IP:
		return handle_ip(n, f, len);
	default:
		n->ignored++;
		return 0;
	}
}

static void hold(struct net *n);

/*
 * Takes every received frame, hands it to handle_frame() and posts its
 * buffer again; publishes and kicks once the used ring is drained.
 * Returns 1 when "!quit" arrived, -1 on a bad used element, else 0.
 */
static int poll_rx(struct net *n, int *got)
{
	int quit = 0;

	*got = 0;
	while (!quit) {
		u16 before = n->rx.last_used;
		u32 len;
		int head = virtq_get_used(&n->rx, &len);
		const u8 *buf;

		if (head < 0) {
			if (n->rx.last_used == before)
				break;
			/* It consumed an element it could not use. */
			say(virtio_error());
			putc('\n');
			return -1;
		}
		*got = 1;
		if (len < NET_HDR_LEN || len > BUF_SIZE - (n->split ? SPLIT_GAP : 0)) {
			say("bad used length ");
			put_dec(len);
			putc('\n');
			return -1;
		}
		buf = n->rxbufs + (u64)head * BUF_SIZE;
		if (n->split && len > n->split) {
			/* Close the gap between the two descriptors' bytes. */
			u8 *b = (u8 *)buf;

			for (u32 i = n->split; i < len; i++)
				b[i] = b[i + SPLIT_GAP];
		}
		/* Without VIRTIO_NET_F_MRG_RXBUF num_buffers is 1 (§5.1.6.4.1). */
		if (buf[NET_HDR_NUM_BUFFERS] != 1 || buf[NET_HDR_NUM_BUFFERS + 1] != 0)
			n->bad_num_buffers++;
		quit = handle_frame(n, buf + NET_HDR_LEN, len - NET_HDR_LEN);
		/* virtq_get_used() freed the descriptor: post it again. */
		rx_post(n);
		if (n->hold)
			hold(n);
	}
	kick_all(n);
	return quit;
}

/*
 * "!hold": publishes every receive buffer, then waits without taking any
 * until the device has used them all.
 */
static void hold(struct net *n)
{
	u64 start = rdtsc();
	u16 filled;

	n->hold = 0;
	kick_all(n);
	do {
		filled = (u16)(n->rx.used->idx - n->rx.last_used);
		if (filled >= n->rx_chains)
			break;
		__asm__ volatile("pause");
	} while (rdtsc() - start < n->idle_tsc);
	say("hold: ");
	put_dec(filled);
	puts(" of ");
	put_dec(n->rx_chains);
	puts(" receive buffers filled\n");
}

/* Sends ARP requests for the host until it answers. */
static int resolve_host(struct net *n)
{
	static const u8 broadcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	static const u8 unknown[6] = { 0 };

	for (int tries = 0; tries < ARP_TRIES && !n->have_host_mac; tries++) {
		u64 start = rdtsc();
		int got;

		say("arp request for ");
		put_ip(n->host_ip);
		putc('\n');
		send_arp(n, ARP_REQUEST, broadcast, unknown, n->host_ip);
		kick_all(n);
		while (!n->have_host_mac && rdtsc() - start < ARP_RETRY_TSC)
			if (poll_rx(n, &got) < 0)
				return -1;
	}
	return n->have_host_mac ? 0 : -1;
}

static int setup(struct net *n)
{
	u32 lo, hi;
	int posted = 0;

	n->tx_unkicked = n->rx_unkicked = 0;
	n->hold = 0;
	if (virtio_negotiate(n->dev, WANTED_FEATURES | (cmdline_u64(cmd, "net.event_idx", 0)
							       ? 1UL << VIRTIO_F_EVENT_IDX
							       : 0)))
		return -1;
	say("features offered ");
	put_hex(n->dev->offered);
	puts(" accepted ");
	put_hex(n->dev->accepted);
	putc('\n');
	if (!(n->dev->accepted & (1UL << VIRTIO_NET_F_MAC))) {
		say("the device offers no MAC address\n");
		return -1;
	}
	/* struct virtio_net_config: mac[6] then le16 status (§5.1.4). */
	lo = virtio_config_read32(n->dev, NET_CFG_MAC);
	hi = virtio_config_read32(n->dev, NET_CFG_MAC + 4);
	for (int i = 0; i < 4; i++)
		n->mac[i] = (u8)(lo >> (8 * i));
	n->mac[4] = (u8)hi;
	n->mac[5] = (u8)(hi >> 8);
	say("mac ");
	put_mac(n->mac);
	if (n->dev->accepted & (1UL << VIRTIO_NET_F_MTU)) {
		puts(" mtu ");
		put_dec(virtio_config_read32(n->dev, NET_CFG_MTU - 2) >> 16);
	}
	putc('\n');

	if (virtq_setup(&n->rx, n->dev, RX_QUEUE, VIRTQ_MAX_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT) ||
	    virtq_setup(&n->tx, n->dev, TX_QUEUE, VIRTQ_MAX_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT))
		return -1;
	n->rx.event_idx = n->tx.event_idx = (n->dev->accepted >> VIRTIO_F_EVENT_IDX) & 1;
	/* Allocated once: a set-up after a reset reuses them. */
	if (!n->rxbufs) {
		n->rxbufs = page_alloc((u64)n->rx.size * BUF_SIZE);
		n->txbufs = page_alloc((u64)n->tx.size * BUF_SIZE);
	}
	if (!n->rxbufs || !n->txbufs) {
		say("out of memory\n");
		return -1;
	}
	if (virtio_driver_ok(n->dev))
		return -1;
	/* Fill the receive queue, as virtnet_open() does. */
	while (n->rx.num_free >= (n->split ? 2 : 1) && !rx_post(n))
		posted++;
	n->rx_chains = (u16)posted;
	kick_all(n);
	say("queues rx ");
	put_dec(n->rx.size);
	puts(" tx ");
	put_dec(n->tx.size);
	puts(" status ");
	put_hex(virtio_read32(n->dev, VIRTIO_MMIO_STATUS));
	puts(" rx buffers ");
	put_dec((u64)posted);
	putc('\n');
	return 0;
}

static void serve(struct net *n)
{
	static const char hello[] = "hello from the ember virtio-net guest";
	u64 last = rdtsc();

	if (resolve_host(n)) {
		say("the host did not answer ARP\n");
		return;
	}
	send_text(n, n->host_mac, n->host_ip, n->host_port, hello, sizeof(hello) - 1);
	kick_all(n);
	say("hello sent to ");
	put_ip(n->host_ip);
	putc(':');
	put_dec(n->host_port);
	putc('\n');
	for (;;) {
		int got, r = poll_rx(n, &got);

		if (r == 2) {
			/* "!reset": start over as a reloaded driver would. */
			if (setup(n)) {
				say("setup after reset failed: ");
				puts(virtio_error());
				putc('\n');
				return;
			}
			say("device reset and set up again\n");
			send_text(n, n->host_mac, n->host_ip, n->host_port, hello, sizeof(hello) - 1);
			kick_all(n);
			last = rdtsc();
			continue;
		}
		if (r) {
			if (r < 0)
				say("receive failed\n");
			return;
		}
		if (got) {
			last = rdtsc();
		} else if (rdtsc() - last > n->idle_tsc) {
			say("idle timeout\n");
			return;
		} else {
			tx_reclaim(n);
			__asm__ volatile("pause");
		}
	}
}

static void run(const void *bp)
{
	static struct virtio_dev devs[VIRTIO_MAX_DEVICES];
	static struct net net;
	struct net *n = &net;
	int count;

	cmd = cmdline(bp);
	if (cmdline_is(cmd, "discover", "acpi")) {
		u64 rsdp = 0;

		count = virtio_find_acpi(devs, VIRTIO_MAX_DEVICES, &rsdp);
	} else {
		count = virtio_find_cmdline(cmd, devs, VIRTIO_MAX_DEVICES);
	}
	if (count < 0) {
		say("discovery failed: ");
		puts(virtio_error());
		putc('\n');
	}
	for (int i = 0; i < count; i++) {
		if (virtio_probe(&devs[i]))
			continue;
		say("virtio-mmio ");
		put_hex(devs[i].base);
		puts(" gsi ");
		put_dec(devs[i].gsi);
		puts(" device ");
		put_dec(devs[i].device_id);
		putc('\n');
		if (!n->dev && devs[i].device_id == VIRTIO_NET_ID)
			n->dev = &devs[i];
	}
	if (!n->dev) {
		say("no virtio-net device\n");
		puts("virtio_net done\n");
		reset();
	}
	n->ip = cmdline_ip("net.ip", 0x0ac80002);
	n->host_ip = cmdline_ip("net.host_ip", 0x0ac80001);
	n->port = (u16)cmdline_u64(cmd, "net.port", 7000);
	n->host_port = (u16)cmdline_u64(cmd, "net.host_port", 7001);
	n->idle_tsc = cmdline_u64(cmd, "net.idle", 10) * 1000000000UL;
	n->split = (u32)cmdline_u64(cmd, "net.split", 0);
	/* A split past every byte of a frame is no split. */
	if (n->split >= NET_HDR_LEN + MAX_FRAME)
		n->split = 0;
	say("mmio ");
	put_hex(n->dev->base);
	puts(" gsi ");
	put_dec(n->dev->gsi);
	puts(" ip ");
	put_ip(n->ip);
	puts(" port ");
	put_dec(n->port);
	putc('\n');
	if (setup(n)) {
		say("setup failed: ");
		puts(virtio_error());
		putc('\n');
	} else {
		serve(n);
		report(n);
	}
	puts("virtio_net done\n");
	reset();
}

void main(const void *bp)
{
	usermode_run(run, bp);
}
