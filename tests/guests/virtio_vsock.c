/*
 * Drives the first virtio-vsock device it finds the way Linux's
 * virtio_transport does (virtio 1.2 §5.10): the receive queue kept full of
 * buffers (one descriptor each, two with vsock.split: the 44-byte header
 * and the payload room after it), one descriptor per transmitted packet
 * (two with vsock.split), eight event buffers,
 * and stream sockets with credit-based flow control (§5.10.6.3) on both
 * sides of every connection.
 *
 * The guest first serves incoming connections until vsock.accepts of them
 * have closed:
 *   - to port vsock.listen (default 52) it echoes every byte back; the
 *     bytes wait in a ring of vsock.buf_alloc bytes, which is also the
 *     buffer space it advertises, so the host can never overrun it;
 *   - to port vsock.sink (default 54) it counts the bytes and drops them.
 * Every connection is reported when it closes, as "vsock: <mode> port P
 * peer Q closed (<why>) rx N tx M tsc T" (T: TSC ticks from the first to
 * the last byte it moved).
 * Every SHUTDOWN received is reported as "vsock: port P peer Q shutdown
 * flags F". When the host will send no more (SHUTDOWN with SEND) and the
 * echo is all sent, the guest shuts down both ways itself and closes on
 * the device's RST ("closed after peer's shutdown").
 * Then it connects to the host (CID 2):
 *   - vsock.echo_out=BYTES: to port vsock.echo_port (default 53); sends
 *     BYTES of the stream pattern (see put_pattern) while reading the
 *     reply, which must be the same bytes, and checks them;
 *   - vsock.source_out=BYTES: to port vsock.source_port (default 55);
 *     sends BYTES of the pattern as fast as the credit allows.
 * Each outgoing connection ends with a SHUTDOWN and waits for the device's
 * RST. Other parameters:
 *   discover=cmdline|acpi  find devices through virtio_mmio.device= words
 *                     (default) or the ACPI DSDT
 *   vsock.rxbuf=N     payload bytes of each receive buffer (default 4096)
 *   vsock.txbuf=N     largest payload of a transmitted packet (default 4096)
 *   vsock.buf_alloc=N receive buffer space advertised per connection, a
 *                     power of two (default 262144)
 *   vsock.split=N     describe every buffer with two descriptors, split
 *                     after byte N (header included), the second one
 *                     SPLIT_GAP bytes further on
 *   vsock.reset=1     reset the device and set it up again after the
 *                     incoming connections, before connecting out
 *   vsock.idle=N      give up after N * 10^9 TSC ticks without progress
 *                     (default 10)
 *
 * Report lines start with "vsock: "; the run ends with "virtio_vsock done"
 * and an i8042 reset. All the work runs in ring 3 (usermode.h), polling: the
 * queues ask for no interrupts.
 */
#include "guest.h"
#include "usermode.h"
#include "virtio.h"

/* virtio-vsock (virtio 1.2 §5.10). */
#define VIRTIO_VSOCK_ID 19
#define VSOCK_CFG_GUEST_CID 0
#define RX_QUEUE 0
#define TX_QUEUE 1
#define EVENT_QUEUE 2
#define HOST_CID 2
#define HDR_LEN 44
#define TYPE_STREAM 1
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define SHUTDOWN_RCV 1
#define SHUTDOWN_SEND 2
/* Largest payload of a packet (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE). */
#define MAX_PAYLOAD 65536
#define EVENT_BUFFERS 8

/*
 * With vsock.split=N every buffer is described by two descriptors: its
 * first N bytes, and the rest SPLIT_GAP bytes further on.
 */
#define SPLIT_GAP 64
/* Receive buffers published before a kick. */
#define RX_KICK_BATCH 64
#define MAX_CONNS 4
#define FIRST_LOCAL_PORT 1024
/* The echo ring (one per connection) is a power of two, 4 KiB to 4 MiB. */
#define MIN_RING 4096
#define MAX_RING (4 << 20)

/* struct virtio_vsock_hdr (§5.10.6), packed little-endian. */
struct hdr {
	u64 src_cid;
	u64 dst_cid;
	u32 src_port;
	u32 dst_port;
	u32 len;
	u16 type;
	u16 op;
	u32 flags;
	u32 buf_alloc;
	u32 fwd_cnt;
} __attribute__((packed));

enum mode { ECHO, SINK, OUT_ECHO, OUT_SOURCE };
enum state { FREE, CONNECTING, ESTABLISHED, CLOSING };

struct conn {
	enum state state;
	enum mode mode;
	u32 local_port, peer_port;
	/* Credit (§5.10.6.3): ours as advertised, the peer's as last seen. */
	u32 buf_alloc, fwd_cnt, last_fwd_sent;
	u32 peer_buf_alloc, peer_fwd_cnt, tx_cnt;
	/* Echo ring (mode ECHO): ring_len bytes from ring_head. */
	u32 ring_head, ring_len;
	/* Stream bytes received and sent, and when data first and last moved. */
	u64 rx_bytes, tx_bytes, first_tsc, last_tsc;
	/* OUT_*: bytes to send; OUT_ECHO: first mismatch (or -1). */
	u64 out_bytes;
	long mismatch_at;
	u32 peer_shutdown;
	int reset_by_peer;
};

struct vsock {
	struct virtio_dev *dev;
	struct virtq rx, tx, ev;
	u64 cid;
	u8 *rxbufs, *txbufs, *evbufs, *ring;
	u32 rxbuf, txbuf, ring_size;
	u32 rx_slot, tx_slot;
	u32 split; /* 0, or where buffers are split in two descriptors */
	int rx_unkicked, tx_unkicked;
	u64 idle_tsc, last_progress;
	struct conn conns[MAX_CONNS];
	u32 next_local_port;
	u16 listen_port, sink_port;
	u64 accepts_done;
	/* Counters reported at the end. */
	u64 rx_pkts, tx_pkts, credit_updates_sent, credit_requests, rsts_sent, overruns;
	u64 unexpected;
	int failed;
};

static const char *cmd;

static void say(const char *s)
{
	puts("vsock: ");
	puts(s);
}

/* ---- The stream pattern ---- */

/*
 * Byte o of a pattern stream: byte o % 8 of the little-endian u64 o / 8,
 * so that every 8 bytes name their own offset (a lost, repeated or
 * misplaced chunk shows) and a sender writes it one word at a time. The
 * host tests compute the same.
 */
static u8 pattern_byte(u64 o)
{
	return (u8)((o >> 3) >> ((o & 7) * 8));
}

static void put_pattern(u8 *dst, u64 offset, u32 len)
{
	u32 i = 0;

	for (; i < len && ((offset + i) & 7); i++)
		dst[i] = pattern_byte(offset + i);
	for (; i + 8 <= len; i += 8) {
		u64 word = (offset + i) >> 3;

		__builtin_memcpy(dst + i, &word, 8);
	}
	for (; i < len; i++)
		dst[i] = pattern_byte(offset + i);
}

/* ---- Queues ---- */

static int descs(const struct vsock *v)
{
	return v->split ? 2 : 1;
}

static void rx_post(struct vsock *v)
{
	u64 buf = (u64)(v->rxbufs + (u64)v->rx.free_head * v->rx_slot);
	struct virtq_buf b[2] = {
		{ buf, HDR_LEN + v->rxbuf, 1 },
		{ buf + v->split + SPLIT_GAP, HDR_LEN + v->rxbuf - v->split, 1 },
	};

	if (v->split)
		b[0].len = v->split;
	if (virtq_add(&v->rx, b, descs(v)) >= 0)
		v->rx_unkicked++;
}

static void kick_tx(struct vsock *v)
{
	if (v->tx_unkicked) {
		virtq_kick(&v->tx);
		v->tx_unkicked = 0;
	}
}

static void kick_rx(struct vsock *v)
{
	if (v->rx_unkicked) {
		virtq_kick(&v->rx);
		v->rx_unkicked = 0;
	}
}

static void tx_reclaim(struct vsock *v)
{
	u32 len;

	while (virtq_get_used(&v->tx, &len) >= 0)
		;
}

/* The buffer of the next transmit descriptor, waiting for one; or NULL. */
static u8 *tx_buffer(struct vsock *v)
{
	u64 start = rdtsc();

	tx_reclaim(v);
	while (v->tx.num_free < descs(v)) {
		kick_tx(v);
		tx_reclaim(v);
		if (rdtsc() - start > v->idle_tsc) {
			say("transmit queue stuck\n");
			v->failed = 1;
			return 0;
		}
	}
	return v->txbufs + (u64)v->tx.free_head * v->tx_slot;
}

/*
 * Sends a packet of connection c with the header fields from the
 * connection. A payload of len bytes must already be in buf, the buffer
 * tx_buffer() returned, with no tx_buffer() or tx_reclaim() call since
 * (either may change which descriptor is next); without payload, buf may
 * be NULL.
 */
static int send_pkt(struct vsock *v, struct conn *c, u16 op, u32 flags, u8 *buf, u32 len)
{
	struct hdr *h;
	struct virtq_buf b[2];
	u32 total = HDR_LEN + len;
	int count = 1;

	if (!buf)
		buf = tx_buffer(v);
	if (!buf)
		return -1;
	if (buf != v->txbufs + (u64)v->tx.free_head * v->tx_slot) {
		say("transmit buffer is not the next descriptor's\n");
		v->failed = 1;
		return -1;
	}
	h = (struct hdr *)buf;
	h->src_cid = v->cid;
	h->dst_cid = HOST_CID;
	h->src_port = c->local_port;
	h->dst_port = c->peer_port;
	h->len = len;
	h->type = TYPE_STREAM;
	h->op = op;
	h->flags = flags;
	h->buf_alloc = c->buf_alloc;
	h->fwd_cnt = c->fwd_cnt;
	c->last_fwd_sent = c->fwd_cnt;
	b[0] = (struct virtq_buf){ (u64)buf, total, 0 };
	if (v->split && total > v->split) {
		/* Move the tail SPLIT_GAP bytes on, from the end (overlapping). */
		for (u32 i = total; i-- > v->split;)
			buf[i + SPLIT_GAP] = buf[i];
		b[0].len = v->split;
		b[1] = (struct virtq_buf){ (u64)(buf + v->split + SPLIT_GAP), total - v->split, 0 };
		count = 2;
	}
	virtq_add(&v->tx, b, count);
	v->tx_unkicked++;
	v->tx_pkts++;
	if (op == OP_CREDIT_UPDATE)
		v->credit_updates_sent++;
	if (op == OP_RST)
		v->rsts_sent++;
	return 0;
}

/* An RST for a packet that has no connection. */
static void send_rst_for(struct vsock *v, const struct hdr *in)
{
	struct conn tmp;

	memset(&tmp, 0, sizeof(tmp));
	tmp.local_port = in->dst_port;
	tmp.peer_port = in->src_port;
	send_pkt(v, &tmp, OP_RST, 0, 0, 0);
}

/* ---- Connections ---- */

static struct conn *find_conn(struct vsock *v, u32 local_port, u32 peer_port)
{
	for (int i = 0; i < MAX_CONNS; i++) {
		struct conn *c = &v->conns[i];

		if (c->state != FREE && c->local_port == local_port && c->peer_port == peer_port)
			return c;
	}
	return 0;
}

static struct conn *new_conn(struct vsock *v, enum mode mode, u32 local_port, u32 peer_port)
{
	for (int i = 0; i < MAX_CONNS; i++) {
		struct conn *c = &v->conns[i];

		if (c->state == FREE) {
			memset(c, 0, sizeof(*c));
			c->mode = mode;
			c->local_port = local_port;
			c->peer_port = peer_port;
			c->buf_alloc = v->ring_size;
			c->mismatch_at = -1;
			return c;
		}
	}
	return 0;
}

static const char *mode_name(enum mode m)
{
	switch (m) {
	case ECHO: return "echo";
	case SINK: return "sink";
	case OUT_ECHO: return "echo_out";
	default: return "source";
	}
}

/* Reports a finished connection and frees it. */
static void close_conn(struct vsock *v, struct conn *c, const char *why)
{
	say(mode_name(c->mode));
	puts(" port ");
	put_dec(c->local_port);
	puts(" peer ");
	put_dec(c->peer_port);
	puts(" closed (");
	puts(why);
	puts(") rx ");
	put_dec(c->rx_bytes);
	puts(" tx ");
	put_dec(c->tx_bytes);
	puts(" tsc ");
	put_dec(c->last_tsc - c->first_tsc);
	if (c->mode == OUT_ECHO) {
		if (c->mismatch_at >= 0) {
			puts(" mismatch at ");
			put_dec((u64)c->mismatch_at);
		} else {
			puts(c->rx_bytes == c->out_bytes ? " match" : " short");
		}
	}
	putc('\n');
	if (c->mode == ECHO || c->mode == SINK)
		v->accepts_done++;
	c->state = FREE;
}

/* Bytes the peer can still take (§5.10.6.3.1). */
static u32 peer_credit(const struct conn *c)
{
	u32 in_flight = c->tx_cnt - c->peer_fwd_cnt;

	return in_flight >= c->peer_buf_alloc ? 0 : c->peer_buf_alloc - in_flight;
}

static void moved(struct vsock *v, struct conn *c)
{
	u64 now = rdtsc();

	if (!c->first_tsc)
		c->first_tsc = now;
	c->last_tsc = now;
	v->last_progress = now;
}

/* Echo: sends what the ring holds, as far as the peer's credit allows. */
static void pump_echo(struct vsock *v, struct conn *c)
{
	while (c->ring_len && c->state == ESTABLISHED && !(c->peer_shutdown & SHUTDOWN_RCV)) {
		u32 n = c->ring_len, credit = peer_credit(c);
		u32 contiguous = v->ring_size - c->ring_head;
		u8 *buf;

		if (n > credit)
			n = credit;
		if (n > v->txbuf)
			n = v->txbuf;
		if (n > contiguous)
			n = contiguous;
		if (!n)
			return;
		buf = tx_buffer(v);
		if (!buf)
			return;
		memcpy(buf + HDR_LEN, v->ring + (u64)(c - v->conns) * v->ring_size + c->ring_head,
		       n);
		c->ring_head = (c->ring_head + n) & (v->ring_size - 1);
		c->ring_len -= n;
		/* The bytes left our buffer: the peer may send as many more. */
		c->fwd_cnt += n;
		c->tx_cnt += n;
		c->tx_bytes += n;
		send_pkt(v, c, OP_RW, 0, buf, n);
		moved(v, c);
	}
}

/* OUT_*: sends the pattern, as far as the peer's credit allows. */
static void pump_out(struct vsock *v, struct conn *c)
{
	while (c->state == ESTABLISHED && c->tx_bytes < c->out_bytes) {
		u64 left = c->out_bytes - c->tx_bytes;
		u32 n = peer_credit(c);
		u8 *buf;

		if (n > v->txbuf)
			n = v->txbuf;
		if (n > left)
			n = (u32)left;
		if (!n)
			return;
		buf = tx_buffer(v);
		if (!buf)
			return;
		put_pattern(buf + HDR_LEN, c->tx_bytes, n);
		c->tx_cnt += n;
		c->tx_bytes += n;
		send_pkt(v, c, OP_RW, 0, buf, n);
		moved(v, c);
	}
}

/* Tells the peer about consumed bytes it has not heard of, past a threshold. */
static void maybe_credit_update(struct vsock *v, struct conn *c)
{
	if (c->state == ESTABLISHED && c->fwd_cnt - c->last_fwd_sent >= c->buf_alloc / 4)
		send_pkt(v, c, OP_CREDIT_UPDATE, 0, 0, 0);
}

/* Payload of an RW packet for connection c. */
static void receive(struct vsock *v, struct conn *c, const u8 *p, u32 len)
{
	c->rx_bytes += len;
	moved(v, c);
	switch (c->mode) {
	case ECHO: {
		u8 *ring = v->ring + (u64)(c - v->conns) * v->ring_size;

		if (len > v->ring_size - c->ring_len) {
			/* The device sent more than the credit we gave. */
			v->overruns++;
			len = v->ring_size - c->ring_len;
		}
		for (u32 i = 0; i < len; i++)
			ring[(c->ring_head + c->ring_len + i) & (v->ring_size - 1)] = p[i];
		c->ring_len += len;
		break;
	}
	case SINK:
		c->fwd_cnt += len;
		break;
	case OUT_ECHO:
		for (u32 i = 0; i < len && c->mismatch_at < 0; i++)
			if (p[i] != pattern_byte(c->rx_bytes - len + i))
				c->mismatch_at = (long)(c->rx_bytes - len + i);
		c->fwd_cnt += len;
		break;
	case OUT_SOURCE:
		v->unexpected++;
		c->fwd_cnt += len;
		break;
	}
}

static void handle_packet(struct vsock *v, const struct hdr *h, const u8 *payload)
{
	struct conn *c = find_conn(v, h->dst_port, h->src_port);

	v->rx_pkts++;
	if (h->src_cid != HOST_CID || h->dst_cid != v->cid || h->type != TYPE_STREAM) {
		v->unexpected++;
		return;
	}
	if (!c) {
		enum mode mode = h->dst_port == v->sink_port ? SINK : ECHO;

		if (h->op == OP_RST)
			return;
		if (h->op != OP_REQUEST ||
		    (h->dst_port != v->listen_port && h->dst_port != v->sink_port) ||
		    !(c = new_conn(v, mode, h->dst_port, h->src_port))) {
			send_rst_for(v, h);
			return;
		}
		c->peer_buf_alloc = h->buf_alloc;
		c->peer_fwd_cnt = h->fwd_cnt;
		c->state = ESTABLISHED;
		say("accepted port ");
		put_dec(c->local_port);
		puts(" from cid ");
		put_dec(h->src_cid);
		puts(" port ");
		put_dec(c->peer_port);
		puts(" peer buf_alloc ");
		put_dec(h->buf_alloc);
		putc('\n');
		send_pkt(v, c, OP_RESPONSE, 0, 0, 0);
		moved(v, c);
		return;
	}
	/* Every packet carries the sender's credit (§5.10.6.3). */
	c->peer_buf_alloc = h->buf_alloc;
	c->peer_fwd_cnt = h->fwd_cnt;
	switch (h->op) {
	case OP_RESPONSE:
		if (c->state == CONNECTING) {
			c->state = ESTABLISHED;
			say("connected to port ");
			put_dec(c->peer_port);
			puts(" from port ");
			put_dec(c->local_port);
			puts(" peer buf_alloc ");
			put_dec(h->buf_alloc);
			putc('\n');
		} else {
			v->unexpected++;
		}
		break;
	case OP_RST:
		c->reset_by_peer = 1;
		close_conn(v, c,
			   c->state == CONNECTING ? "refused" :
			   c->state == CLOSING && (c->mode == ECHO || c->mode == SINK) ?
						      "closed after peer's shutdown" :
						      "reset");
		break;
	case OP_RW:
		if (c->state == ESTABLISHED)
			receive(v, c, payload, h->len);
		else
			v->unexpected++;
		break;
	case OP_CREDIT_UPDATE:
		break;
	case OP_CREDIT_REQUEST:
		v->credit_requests++;
		send_pkt(v, c, OP_CREDIT_UPDATE, 0, 0, 0);
		break;
	case OP_SHUTDOWN:
		say("port ");
		put_dec(c->local_port);
		puts(" peer ");
		put_dec(c->peer_port);
		puts(" shutdown flags ");
		put_dec(h->flags);
		putc('\n');
		c->peer_shutdown |= h->flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
		if (c->peer_shutdown == (SHUTDOWN_RCV | SHUTDOWN_SEND)) {
			/* Both directions are done: reset, as Linux does. */
			send_pkt(v, c, OP_RST, 0, 0, 0);
			close_conn(v, c, "shutdown by peer");
		}
		break;
	default:
		v->unexpected++;
		send_pkt(v, c, OP_RST, 0, 0, 0);
		close_conn(v, c, "unknown op");
		break;
	}
}

/*
 * One round: takes every received packet (posting its buffer again),
 * pumps the connections, reclaims and kicks. Returns 1 if anything moved.
 */
static int poll(struct vsock *v)
{
	int progress = 0;

	for (;;) {
		u16 before = v->rx.last_used;
		u32 len;
		int head = virtq_get_used(&v->rx, &len);
		const u8 *buf;
		struct hdr h;

		if (head < 0) {
			if (v->rx.last_used != before) {
				say(virtio_error());
				putc('\n');
				v->failed = 1;
			}
			break;
		}
		progress = 1;
		buf = v->rxbufs + (u64)head * v->rx_slot;
		if (v->split && len > v->split && len <= HDR_LEN + v->rxbuf) {
			/* Close the gap between the two descriptors' bytes. */
			u8 *b = (u8 *)buf;

			for (u32 i = v->split; i < len; i++)
				b[i] = b[i + SPLIT_GAP];
		}
		__builtin_memcpy(&h, buf, HDR_LEN);
		if (len < HDR_LEN || h.len > len - HDR_LEN || h.len > v->rxbuf) {
			say("bad receive length ");
			put_dec(len);
			puts(" packet len ");
			put_dec(h.len);
			putc('\n');
			v->failed = 1;
		} else {
			handle_packet(v, &h, buf + HDR_LEN);
		}
		rx_post(v);
		if (v->rx_unkicked >= RX_KICK_BATCH)
			kick_rx(v);
	}
	for (int i = 0; i < MAX_CONNS; i++) {
		struct conn *c = &v->conns[i];

		if (c->state == FREE)
			continue;
		if (c->mode == ECHO)
			pump_echo(v, c);
		if ((c->mode == ECHO || c->mode == SINK) && c->state == ESTABLISHED &&
		    (c->peer_shutdown & SHUTDOWN_SEND) && !c->ring_len) {
			/*
			 * The peer sends no more and everything is echoed: close
			 * as a server does on end of stream; the peer answers RST.
			 */
			c->state = CLOSING;
			send_pkt(v, c, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 0, 0);
		}
		else if (c->mode == OUT_ECHO || c->mode == OUT_SOURCE)
			pump_out(v, c);
		maybe_credit_update(v, c);
	}
	if (v->tx_unkicked)
		progress = 1;
	kick_tx(v);
	tx_reclaim(v);
	return progress;
}

/* Polls until done(v, arg) or nothing moves for idle_tsc; 0 if done. */
static int poll_until(struct vsock *v, int (*done)(struct vsock *, const void *),
		      const void *arg)
{
	v->last_progress = rdtsc();
	while (!done(v, arg)) {
		if (v->failed)
			return -1;
		if (poll(v))
			v->last_progress = rdtsc();
		else if (rdtsc() - v->last_progress > v->idle_tsc)
			return -1;
	}
	return 0;
}

static int accepts_reached(struct vsock *v, const void *arg)
{
	return v->accepts_done >= *(const u64 *)arg;
}

static int conn_closed(struct vsock *v, const void *arg)
{
	(void)v;
	return ((const struct conn *)arg)->state == FREE;
}

/* The outgoing connection's work is done: shut down and wait for the RST. */
static int out_finished(struct vsock *v, const void *arg)
{
	struct conn *c = (struct conn *)arg;

	if (c->state == FREE)
		return 1;
	if (c->state != ESTABLISHED || c->tx_bytes < c->out_bytes)
		return 0;
	if (c->mode == OUT_ECHO && c->rx_bytes < c->out_bytes)
		return 0;
	/* §5.10.6.6: the peer answers a full shutdown with RST. */
	c->state = CLOSING;
	send_pkt(v, c, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 0, 0);
	kick_tx(v);
	return 0;
}

static void connect_out(struct vsock *v, enum mode mode, u32 port, u64 bytes)
{
	struct conn *c = new_conn(v, mode, v->next_local_port++, port);

	if (!c) {
		say("no free connection\n");
		v->failed = 1;
		return;
	}
	c->out_bytes = bytes;
	c->state = CONNECTING;
	say("connecting to cid 2 port ");
	put_dec(port);
	puts(" for ");
	put_dec(bytes);
	puts(" bytes\n");
	send_pkt(v, c, OP_REQUEST, 0, 0, 0);
	kick_tx(v);
	if (poll_until(v, out_finished, c) || poll_until(v, conn_closed, c)) {
		say(mode_name(mode));
		puts(" timed out\n");
		v->failed = 1;
	}
}

static int setup(struct vsock *v)
{
	struct virtq_buf b;
	u64 ring_total;

	v->rx_unkicked = v->tx_unkicked = 0;
	memset(v->conns, 0, sizeof(v->conns));
	if (virtio_negotiate(v->dev, 1UL << VIRTIO_F_VERSION_1))
		return -1;
	say("features offered ");
	put_hex(v->dev->offered);
	puts(" accepted ");
	put_hex(v->dev->accepted);
	putc('\n');
	v->cid = virtio_config_read64(v->dev, VSOCK_CFG_GUEST_CID);
	say("guest_cid ");
	put_dec(v->cid);
	putc('\n');
	if (virtq_setup(&v->rx, v->dev, RX_QUEUE, VIRTQ_MAX_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT) ||
	    virtq_setup(&v->tx, v->dev, TX_QUEUE, VIRTQ_MAX_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT) ||
	    virtq_setup(&v->ev, v->dev, EVENT_QUEUE, EVENT_BUFFERS, VIRTQ_AVAIL_F_NO_INTERRUPT))
		return -1;
	/* Slots 64-byte aligned: the header, the payload and a split's gap. */
	v->rx_slot = (HDR_LEN + v->rxbuf + SPLIT_GAP + 63) & ~63U;
	v->tx_slot = (HDR_LEN + v->txbuf + SPLIT_GAP + 63) & ~63U;
	ring_total = (u64)v->ring_size * MAX_CONNS;
	/* Allocated once: a set-up after a reset reuses them. */
	if (!v->rxbufs) {
		v->rxbufs = page_alloc((u64)v->rx.size * v->rx_slot);
		v->txbufs = page_alloc((u64)v->tx.size * v->tx_slot);
		v->evbufs = page_alloc(4096);
		v->ring = page_alloc(ring_total);
	}
	if (!v->rxbufs || !v->txbufs || !v->evbufs || !v->ring) {
		say("out of memory\n");
		return -1;
	}
	if (virtio_driver_ok(v->dev))
		return -1;
	while (v->rx.num_free >= descs(v))
		rx_post(v);
	kick_rx(v);
	for (int i = 0; i < v->ev.size; i++) {
		b = (struct virtq_buf){ (u64)(v->evbufs + i * 4), 4, 1 };
		virtq_add(&v->ev, &b, 1);
	}
	virtq_kick(&v->ev);
	say("queues rx ");
	put_dec(v->rx.size);
	puts(" tx ");
	put_dec(v->tx.size);
	puts(" event ");
	put_dec(v->ev.size);
	puts(" status ");
	put_hex(virtio_read32(v->dev, VIRTIO_MMIO_STATUS));
	puts(" rxbuf ");
	put_dec(v->rxbuf);
	puts(" buf_alloc ");
	put_dec(v->ring_size);
	putc('\n');
	return 0;
}

static void report(struct vsock *v)
{
	u32 len;
	u64 events = 0;

	while (virtq_get_used(&v->ev, &len) >= 0)
		events++;
	say("rx_pkts ");
	put_dec(v->rx_pkts);
	puts(" tx_pkts ");
	put_dec(v->tx_pkts);
	puts(" credit_updates ");
	put_dec(v->credit_updates_sent);
	puts(" credit_requests ");
	put_dec(v->credit_requests);
	puts(" rsts ");
	put_dec(v->rsts_sent);
	puts(" overruns ");
	put_dec(v->overruns);
	puts(" unexpected ");
	put_dec(v->unexpected);
	puts(" events ");
	put_dec(events);
	puts(" notifies rx ");
	put_dec(v->rx.notifies);
	puts(" tx ");
	put_dec(v->tx.notifies);
	putc('\n');
}

static u32 clamp(u64 v, u64 lo, u64 hi)
{
	return (u32)(v < lo ? lo : v > hi ? hi : v);
}

static void run(const void *bp)
{
	static struct virtio_dev devs[VIRTIO_MAX_DEVICES];
	static struct vsock vs;
	struct vsock *v = &vs;
	u64 accepts, echo_out, source_out, ring;
	int count;

	cmd = cmdline(bp);
	if (cmdline_is(cmd, "discover", "acpi")) {
		u64 rsdp = 0;

		count = virtio_find_acpi(devs, VIRTIO_MAX_DEVICES, &rsdp);
	} else {
		count = virtio_find_cmdline(cmd, devs, VIRTIO_MAX_DEVICES);
	}
	for (int i = 0; i < count && !v->dev; i++)
		if (!virtio_probe(&devs[i]) && devs[i].device_id == VIRTIO_VSOCK_ID)
			v->dev = &devs[i];
	if (!v->dev) {
		say("no virtio-vsock device\n");
		puts("virtio_vsock done\n");
		reset();
	}
	say("mmio ");
	put_hex(v->dev->base);
	puts(" gsi ");
	put_dec(v->dev->gsi);
	putc('\n');
	v->listen_port = (u16)cmdline_u64(cmd, "vsock.listen", 52);
	v->sink_port = (u16)cmdline_u64(cmd, "vsock.sink", 54);
	v->rxbuf = clamp(cmdline_u64(cmd, "vsock.rxbuf", 4096), 64, MAX_PAYLOAD);
	v->txbuf = clamp(cmdline_u64(cmd, "vsock.txbuf", 4096), 64, MAX_PAYLOAD);
	ring = clamp(cmdline_u64(cmd, "vsock.buf_alloc", 256 * 1024), MIN_RING, MAX_RING);
	while (ring & (ring - 1))
		ring &= ring - 1;
	v->ring_size = (u32)ring;
	v->idle_tsc = cmdline_u64(cmd, "vsock.idle", 10) * 1000000000UL;
	v->split = (u32)cmdline_u64(cmd, "vsock.split", 0);
	/* A split past every byte of a buffer is no split. */
	if (v->split >= HDR_LEN + (v->rxbuf < v->txbuf ? v->rxbuf : v->txbuf))
		v->split = 0;
	v->next_local_port = FIRST_LOCAL_PORT;
	accepts = cmdline_u64(cmd, "vsock.accepts", 1);
	echo_out = cmdline_u64(cmd, "vsock.echo_out", 0);
	source_out = cmdline_u64(cmd, "vsock.source_out", 0);

	if (setup(v)) {
		say("setup failed: ");
		puts(virtio_error());
		putc('\n');
		puts("virtio_vsock done\n");
		reset();
	}
	if (accepts && poll_until(v, accepts_reached, &accepts)) {
		say("timed out waiting for connections\n");
		v->failed = 1;
	}
	if (!v->failed && cmdline_u64(cmd, "vsock.reset", 0)) {
		/* As a reloaded driver: every connection is gone. */
		if (setup(v)) {
			say("setup after reset failed: ");
			puts(virtio_error());
			putc('\n');
			v->failed = 1;
		} else {
			say("device reset and set up again\n");
		}
	}
	if (!v->failed && echo_out)
		connect_out(v, OUT_ECHO, (u32)cmdline_u64(cmd, "vsock.echo_port", 53), echo_out);
	if (!v->failed && source_out)
		connect_out(v, OUT_SOURCE, (u32)cmdline_u64(cmd, "vsock.source_port", 55),
			    source_out);
	report(v);
	puts(v->failed ? "vsock: failed\n" : "vsock: ok\n");
	puts("virtio_vsock done\n");
	reset();
}

void main(const void *bp)
{
	usermode_run(run, bp);
}
