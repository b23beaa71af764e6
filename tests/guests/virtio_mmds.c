/*
 * A metadata-service client over the first virtio-net device, driven as
 * Linux's virtio_net driver does without offloads (virtio 1.2 §5.1), with
 * the least of a TCP/IP client on top:
 *
 *   1. ARP request for the service's address (default 169.254.169.254),
 *      reported with the MAC that answered;
 *   2. HTTP requests to port 80, each on its own TCP connection (handshake,
 *      request, in-order data acknowledged segment by segment, FIN both
 *      ways):
 *        GET  <path>                              (text)
 *        GET  <path>, Accept: application/json
 *        PUT  /latest/api/token, X-metadata-token-ttl-seconds: 60
 *        GET  <path>, X-metadata-token: <the token>
 *      each reported as "mmds: <name> <status> <body>" (body bytes that are
 *      not printable as '.', newlines as '|');
 *   3. ARP for the host's address and a UDP datagram "mmds done" to it:
 *      traffic for anything else must still reach the TAP;
 *   4. with mmds.bench=N: N GETs of <path> on one connection, then
 *      "mmds: bench N requests <tsc ticks> ticks <tsc per us>".
 *
 * Command line: mmds.path=/... (default /latest/meta-data/ami-id),
 * net.ip, net.host_ip (defaults 10.201.0.2, 10.201.0.1), mmds.ip
 * (169.254.169.254), mmds.bench=N. The run ends with "virtio_mmds done"
 * and an i8042 reset. Everything runs in ring 3, polling.
 */
#include "guest.h"
#include "usermode.h"
#include "virtio.h"

#define VIRTIO_NET_ID 1
#define VIRTIO_NET_F_MAC 5
#define NET_CFG_MAC 0
#define RX_QUEUE 0
#define TX_QUEUE 1
#define NET_HDR_LEN 12
#define WANTED_FEATURES ((1UL << VIRTIO_F_VERSION_1) | (1UL << VIRTIO_NET_F_MAC))
#define BUF_SIZE 2048

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define IP_HLEN 20
#define TCP_HLEN 20
#define PROTO_TCP 6
#define PROTO_UDP 17

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_PSH 0x08
#define TCP_ACK 0x10

/* TSC ticks to wait for one answer (a few seconds). */
#define WAIT_TSC 4000000000UL
#define RESP_MAX 8192

struct net {
	struct virtio_dev *dev;
	struct virtq rx, tx;
	u8 *rxbufs, *txbufs;
	u8 mac[6];
	u32 ip, host_ip, mmds_ip;
	u8 mmds_mac[6], host_mac[6];
	int have_mmds_mac, have_host_mac;
	/* The connection being served. */
	u16 lport;
	u32 snd_nxt, rcv_nxt;
	int synack, fin, rst;
	u8 resp[RESP_MAX];
	u32 resp_len;
};

static const char *cmd;
static struct net net;

static u16 be16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static u32 be32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static void put32(u8 *p, u32 v) { put16(p, (u16)(v >> 16)); put16(p + 2, (u16)v); }

static u32 sum16(u32 sum, const u8 *p, u32 len)
{
	for (u32 i = 0; i + 1 < len; i += 2)
		sum += be16(p + i);
	if (len & 1)
		sum += (u32)p[len - 1] << 8;
	return sum;
}

static u16 fold(u32 sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (u16)~sum;
}

static void say(const char *s)
{
	puts("mmds: ");
	puts(s);
}

static void put_ip(u32 ip)
{
	for (int i = 3; i >= 0; i--) {
		put_dec((ip >> (i * 8)) & 0xff);
		if (i)
			putc('.');
	}
}

static void put_mac(const u8 *m)
{
	static const char d[] = "0123456789abcdef";

	for (int i = 0; i < 6; i++) {
		putc(d[m[i] >> 4]);
		putc(d[m[i] & 15]);
		if (i < 5)
			putc(':');
	}
}

static u32 parse_ip(const char *key, u32 def)
{
	size_t len;
	const char *s = cmdline_value(cmd, key, &len);
	u32 ip = 0, part = 0;
	int parts = 0;

	if (!s)
		return def;
	for (size_t i = 0; i <= len; i++) {
		char c = i < len ? s[i] : '.';

		if (c >= '0' && c <= '9') {
			part = part * 10 + (u32)(c - '0');
		} else if (c == '.' && part <= 255) {
			ip = ip << 8 | part;
			part = 0;
			parts++;
		} else {
			return def;
		}
	}
	return parts == 4 ? ip : def;
}

/* ---- Queues ---- */

static void rx_post(struct net *n)
{
	struct virtq_buf b = { (u64)(n->rxbufs + (u64)n->rx.free_head * BUF_SIZE), BUF_SIZE, 1 };

	virtq_add(&n->rx, &b, 1);
}

static u8 *tx_frame(struct net *n)
{
	u32 len;
	u64 start = rdtsc();

	while (virtq_get_used(&n->tx, &len) >= 0)
		;
	while (!n->tx.num_free) {
		virtq_kick(&n->tx);
		while (virtq_get_used(&n->tx, &len) >= 0)
			;
		if (rdtsc() - start > WAIT_TSC)
			return 0;
	}
	return n->txbufs + (u64)n->tx.free_head * BUF_SIZE + NET_HDR_LEN;
}

static void tx_send(struct net *n, u8 *frame, u32 len)
{
	u8 *hdr = frame - NET_HDR_LEN;
	struct virtq_buf b = { (u64)hdr, NET_HDR_LEN + len, 0 };

	for (int i = 0; i < NET_HDR_LEN; i++)
		hdr[i] = 0;
	virtq_add(&n->tx, &b, 1);
	virtq_kick(&n->tx);
}

static void eth_header(struct net *n, u8 *f, const u8 *dst, u16 type)
{
	memcpy(f, dst, 6);
	memcpy(f + 6, n->mac, 6);
	put16(f + 12, type);
}

static void send_arp_request(struct net *n, u32 target)
{
	static const u8 bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	u8 *f = tx_frame(n), *a;

	if (!f)
		return;
	eth_header(n, f, bcast, ETH_P_ARP);
	a = f + ETH_HLEN;
	put16(a, 1);
	put16(a + 2, ETH_P_IP);
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, 1);
	memcpy(a + 8, n->mac, 6);
	put32(a + 14, n->ip);
	memset(a + 18, 0, 6);
	put32(a + 24, target);
	tx_send(n, f, ETH_HLEN + 28);
}

/* IPv4 header for a payload of len bytes to dst. */
static void ip_header(struct net *n, u8 *p, u8 proto, u32 dst, u32 len)
{
	memset(p, 0, IP_HLEN);
	p[0] = 0x45;
	put16(p + 2, (u16)(IP_HLEN + len));
	p[8] = 64;
	p[9] = proto;
	put32(p + 12, n->ip);
	put32(p + 16, dst);
	put16(p + 10, fold(sum16(0, p, IP_HLEN)));
}

static void send_tcp(struct net *n, u8 flags, const char *data, u32 len)
{
	u8 *f = tx_frame(n), *ip, *t;
	u32 sum;

	if (!f)
		return;
	eth_header(n, f, n->mmds_mac, ETH_P_IP);
	ip = f + ETH_HLEN;
	t = ip + IP_HLEN;
	memset(t, 0, TCP_HLEN);
	put16(t, n->lport);
	put16(t + 2, 80);
	put32(t + 4, n->snd_nxt);
	put32(t + 8, (flags & TCP_ACK) ? n->rcv_nxt : 0);
	t[12] = 5 << 4;
	t[13] = flags;
	put16(t + 14, 65535);
	memcpy(t + TCP_HLEN, data, len);
	sum = sum16(0, ip + 12, 8) + PROTO_TCP + TCP_HLEN + len;
	put16(t + 16, fold(sum16(sum, t, TCP_HLEN + len)));
	ip_header(n, ip, PROTO_TCP, n->mmds_ip, TCP_HLEN + len);
	tx_send(n, f, ETH_HLEN + IP_HLEN + TCP_HLEN + len);
	n->snd_nxt += len + ((flags & (TCP_SYN | TCP_FIN)) ? 1 : 0);
}

static void handle_frame(struct net *n, const u8 *f, u32 len)
{
	if (len >= ETH_HLEN + 28 && be16(f + 12) == ETH_P_ARP) {
		const u8 *a = f + ETH_HLEN;

		if (be16(a + 6) != 2 || be32(a + 24) != n->ip)
			return;
		if (be32(a + 14) == n->mmds_ip && !n->have_mmds_mac) {
			memcpy(n->mmds_mac, a + 8, 6);
			n->have_mmds_mac = 1;
		} else if (be32(a + 14) == n->host_ip && !n->have_host_mac) {
			memcpy(n->host_mac, a + 8, 6);
			n->have_host_mac = 1;
		}
		return;
	}
	if (len >= ETH_HLEN + IP_HLEN + TCP_HLEN && be16(f + 12) == ETH_P_IP) {
		const u8 *ip = f + ETH_HLEN, *t;
		u32 ihl = (u32)(ip[0] & 15) * 4, total = be16(ip + 2), doff, dlen, seq;

		if (ip[9] != PROTO_TCP || be32(ip + 12) != n->mmds_ip || total > len - ETH_HLEN ||
		    ihl < IP_HLEN || total < ihl + TCP_HLEN)
			return;
		t = ip + ihl;
		doff = (u32)(t[12] >> 4) * 4;
		if (be16(t) != 80 || be16(t + 2) != n->lport || doff < TCP_HLEN || ihl + doff > total)
			return;
		dlen = total - ihl - doff;
		seq = be32(t + 4);
		if (t[13] & TCP_RST) {
			n->rst = 1;
			return;
		}
		if ((t[13] & (TCP_SYN | TCP_ACK)) == (TCP_SYN | TCP_ACK) && !n->synack) {
			n->synack = 1;
			n->rcv_nxt = seq + 1;
			return;
		}
		if (seq != n->rcv_nxt)
			return;
		if (dlen && n->resp_len + dlen <= RESP_MAX) {
			memcpy(n->resp + n->resp_len, t + doff, dlen);
			n->resp_len += dlen;
			n->rcv_nxt += dlen;
		}
		if (t[13] & TCP_FIN) {
			n->rcv_nxt++;
			n->fin = 1;
		}
		if (dlen || (t[13] & TCP_FIN))
			send_tcp(n, TCP_ACK, 0, 0);
	}
}

static void poll_rx(struct net *n)
{
	u32 len;
	int head;

	while ((head = virtq_get_used(&n->rx, &len)) >= 0) {
		const u8 *buf = n->rxbufs + (u64)head * BUF_SIZE;

		if (len > NET_HDR_LEN && len <= BUF_SIZE)
			handle_frame(n, buf + NET_HDR_LEN, len - NET_HDR_LEN);
		rx_post(n);
		virtq_kick(&n->rx);
	}
}

/* Polls until *flag is set or time runs out. */
static int wait_for(struct net *n, int *flag)
{
	u64 start = rdtsc();

	while (!*flag && !n->rst) {
		poll_rx(n);
		if (rdtsc() - start > WAIT_TSC)
			return -1;
		__asm__ volatile("pause");
	}
	return *flag ? 0 : -1;
}

static int mem_eq(const u8 *a, const char *b, u32 n)
{
	for (u32 i = 0; i < n; i++)
		if (a[i] != (u8)b[i])
			return 0;
	return 1;
}

/* Waits until the device has used every transmit buffer. */
static void tx_drain(struct net *n)
{
	u32 len;
	u64 start = rdtsc();

	while (n->tx.num_free < n->tx.size && rdtsc() - start < WAIT_TSC)
		while (virtq_get_used(&n->tx, &len) >= 0)
			;
}

/* The body of a complete response in n->resp, or 0 while incomplete. */
static const u8 *response_body(struct net *n, u32 *body_len)
{
	static const char cl[] = "Content-Length: ";

	for (u32 i = 0; i + 3 < n->resp_len; i++) {
		if (n->resp[i] == '\r' && n->resp[i + 1] == '\n' && n->resp[i + 2] == '\r' &&
		    n->resp[i + 3] == '\n') {
			u32 want = 0;

			for (u32 j = 0; j + sizeof(cl) - 1 < i; j++) {
				if (mem_eq(n->resp + j, cl, sizeof(cl) - 1)) {
					for (u32 k = j + sizeof(cl) - 1; n->resp[k] >= '0' && n->resp[k] <= '9'; k++)
						want = want * 10 + (u32)(n->resp[k] - '0');
					break;
				}
			}
			if (n->resp_len - (i + 4) < want)
				return 0;
			*body_len = want;
			return n->resp + i + 4;
		}
	}
	return 0;
}

static u32 slen(const char *s)
{
	u32 n = 0;

	while (s[n])
		n++;
	return n;
}

static int connect(struct net *n, u16 port)
{
	n->lport = port;
	n->snd_nxt = 0x1000u * port;
	n->synack = n->fin = n->rst = 0;
	n->resp_len = 0;
	send_tcp(n, TCP_SYN, 0, 0);
	if (wait_for(n, &n->synack))
		return -1;
	send_tcp(n, TCP_ACK, 0, 0);
	return 0;
}

/* Sends one request on the open connection; the body of its answer. */
static const u8 *exchange(struct net *n, const char *req, u32 *status, u32 *body_len)
{
	u64 start = rdtsc();
	const u8 *body;

	n->resp_len = 0;
	send_tcp(n, TCP_ACK | TCP_PSH, req, slen(req));
	while (!(body = response_body(n, body_len))) {
		poll_rx(n);
		if (n->rst || rdtsc() - start > WAIT_TSC)
			return 0;
	}
	/* "HTTP/1.1 200 " */
	*status = (u32)(n->resp[9] - '0') * 100 + (u32)(n->resp[10] - '0') * 10 + (u32)(n->resp[11] - '0');
	return body;
}

static void disconnect(struct net *n)
{
	send_tcp(n, TCP_FIN | TCP_ACK, 0, 0);
	wait_for(n, &n->fin);
}

/* One request on its own connection, reported; the body is kept in out. */
static int request(struct net *n, u16 port, const char *name, const char *req, char *out, u32 out_max)
{
	u32 status = 0, blen = 0;
	const u8 *body;

	if (connect(n, port)) {
		say(name);
		puts(" no connection\n");
		return -1;
	}
	body = exchange(n, req, &status, &blen);
	if (!body) {
		say(name);
		puts(" no answer\n");
		return -1;
	}
	say(name);
	putc(' ');
	put_dec(status);
	putc(' ');
	for (u32 i = 0; i < blen; i++) {
		u8 c = body[i];

		putc(c == '\n' ? '|' : (c >= 32 && c < 127) ? (char)c : '.');
		if (out && i + 1 < out_max) {
			out[i] = (char)c;
			out[i + 1] = 0;
		}
	}
	putc('\n');
	disconnect(n);
	return 0;
}

static int resolve(struct net *n, u32 ip, int *have)
{
	for (int tries = 0; tries < 3 && !*have; tries++) {
		send_arp_request(n, ip);
		wait_for(n, have);
	}
	return *have ? 0 : -1;
}

static void send_udp(struct net *n, const char *text)
{
	u8 *f = tx_frame(n), *ip, *u;
	u32 len = slen(text);

	if (!f)
		return;
	eth_header(n, f, n->host_mac, ETH_P_IP);
	ip = f + ETH_HLEN;
	u = ip + IP_HLEN;
	put16(u, 7000);
	put16(u + 2, 7001);
	put16(u + 4, (u16)(8 + len));
	put16(u + 6, 0);
	memcpy(u + 8, text, len);
	ip_header(n, ip, PROTO_UDP, n->host_ip, 8 + len);
	tx_send(n, f, ETH_HLEN + IP_HLEN + 8 + len);
}

static char reqbuf[1024];

static void append(u32 *at, const char *s)
{
	while (*s && *at + 1 < sizeof(reqbuf))
		reqbuf[(*at)++] = *s++;
	reqbuf[*at] = 0;
}

static const char *build(const char *method, const char *path, const char *hdr, const char *val)
{
	u32 at = 0;

	append(&at, method);
	append(&at, " ");
	append(&at, path);
	append(&at, " HTTP/1.1\r\nHost: 169.254.169.254\r\n");
	if (hdr) {
		append(&at, hdr);
		append(&at, ": ");
		append(&at, val);
		append(&at, "\r\n");
	}
	append(&at, "\r\n");
	return reqbuf;
}

static void bench(struct net *n, const char *path, u64 count)
{
	u32 status, blen;
	u64 start, ticks, ok = 0;

	if (connect(n, 41000))
		return;
	build("GET", path, 0, 0);
	start = rdtsc();
	for (u64 i = 0; i < count; i++) {
		if (!exchange(n, reqbuf, &status, &blen) || status != 200)
			break;
		ok++;
	}
	ticks = rdtsc() - start;
	disconnect(n);
	say("bench ");
	put_dec(ok);
	puts(" requests ");
	put_dec(ticks);
	puts(" ticks\n");
}

static void run(const void *bp)
{
	static struct virtio_dev devs[VIRTIO_MAX_DEVICES];
	static char token[128];
	struct net *n = &net;
	size_t plen;
	const char *p;
	static char path[256];
	int count;
	u32 lo, hi;

	cmd = cmdline(bp);
	count = virtio_find_cmdline(cmd, devs, VIRTIO_MAX_DEVICES);
	for (int i = 0; i < count; i++)
		if (!virtio_probe(&devs[i]) && devs[i].device_id == VIRTIO_NET_ID && !n->dev)
			n->dev = &devs[i];
	if (!n->dev || virtio_negotiate(n->dev, WANTED_FEATURES) ||
	    virtq_setup(&n->rx, n->dev, RX_QUEUE, VIRTQ_MAX_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT) ||
	    virtq_setup(&n->tx, n->dev, TX_QUEUE, VIRTQ_MAX_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT)) {
		say("no usable virtio-net device\n");
		goto done;
	}
	lo = virtio_config_read32(n->dev, NET_CFG_MAC);
	hi = virtio_config_read32(n->dev, NET_CFG_MAC + 4);
	for (int i = 0; i < 4; i++)
		n->mac[i] = (u8)(lo >> (8 * i));
	n->mac[4] = (u8)hi;
	n->mac[5] = (u8)(hi >> 8);
	n->rxbufs = page_alloc((u64)n->rx.size * BUF_SIZE);
	n->txbufs = page_alloc((u64)n->tx.size * BUF_SIZE);
	if (!n->rxbufs || !n->txbufs || virtio_driver_ok(n->dev)) {
		say("setup failed\n");
		goto done;
	}
	while (n->rx.num_free)
		rx_post(n);
	virtq_kick(&n->rx);

	n->ip = parse_ip("net.ip", 0x0ac90002);
	n->host_ip = parse_ip("net.host_ip", 0x0ac90001);
	n->mmds_ip = parse_ip("mmds.ip", 0xa9fea9fe);
	p = cmdline_value(cmd, "mmds.path", &plen);
	if (!p) {
		p = "/latest/meta-data/ami-id";
		plen = slen(p);
	}
	for (size_t i = 0; i < plen && i + 1 < sizeof(path); i++)
		path[i] = p[i];

	if (resolve(n, n->mmds_ip, &n->have_mmds_mac)) {
		say("no ARP reply from ");
		put_ip(n->mmds_ip);
		putc('\n');
		goto done;
	}
	say("arp ");
	put_ip(n->mmds_ip);
	puts(" is at ");
	put_mac(n->mmds_mac);
	putc('\n');

	request(n, 40001, "get", build("GET", path, 0, 0), 0, 0);
	request(n, 40002, "get-json", build("GET", path, "Accept", "application/json"), 0, 0);
	token[0] = 0;
	request(n, 40003, "token",
		build("PUT", "/latest/api/token", "X-metadata-token-ttl-seconds", "60"), token,
		sizeof(token));
	request(n, 40004, "get-token", build("GET", path, "X-metadata-token", token), 0, 0);
	if (cmdline_u64(cmd, "mmds.bench", 0))
		bench(n, path, cmdline_u64(cmd, "mmds.bench", 0));

	if (resolve(n, n->host_ip, &n->have_host_mac)) {
		say("no ARP reply from the host\n");
		goto done;
	}
	say("host ");
	put_ip(n->host_ip);
	puts(" is at ");
	put_mac(n->host_mac);
	putc('\n');
	send_udp(n, "mmds done");
	tx_drain(n);
done:
	puts("virtio_mmds done\n");
	reset();
}

void main(const void *bp)
{
	usermode_run(run, bp);
}
