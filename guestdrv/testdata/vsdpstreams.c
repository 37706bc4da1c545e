/*
 * vsdpstreams - many concurrent streams through one epoll loop, with data
 * every side can check: the stream-check protocol of
 * guestdrv/vsdpnet/cmd/vsdpstreams/streamcheck (its doc.go is the
 * specification; this file implements the same plan, content generator and
 * report lines). It uses only the ordinary socket API, non-blocking, so
 * under LD_PRELOAD=libvsdp.so it exercises the library's non-blocking
 * connect, epoll re-registration, EAGAIN and partial writes; without the
 * library it runs over the host's TCP (the host-tier interop test).
 *
 *   vsdpstreams dial ADDR PORT SEED N BUDGET
 *       N streams to ADDR:PORT at once, sizes from the plan; half of the
 *       sockets are registered with epoll before connect(), half after.
 *   vsdpstreams serve PORT SEED N BUDGET RELEASEFILE
 *       accept N streams on 0.0.0.0:PORT, check each header against the
 *       plan, serve them all at once, and close them when RELEASEFILE
 *       exists (so the host can read its counters while they are open).
 *   vsdpstreams plan SEED N BUDGET       (prints the plan)
 *   vsdpstreams sum SEED INDEX up|down LEN  (sha256 of a stream's content)
 *
 * Output: one report line per stream (streamcheck.Report's format), then
 * a summary of key=value pairs. Any broken expectation prints "FAIL: ..."
 * and exits 1; an alarm bounds the whole run.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "../libvsdp/libvsdp.h"

#define HDR_SIZE 32
#define MAX_SIZE (2u << 20)
#define MAX_STREAMS 1024
#define CHUNK (64u << 10)
#define IDLE_MS 20000 /* no event for this long is a hang */

static void failf(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void failf(const char *fmt, ...)
{
	va_list ap;
	int e = errno;

	printf("FAIL: ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf(" (errno %s)\n", e ? strerrorname_np(e) : "0");
	fflush(stdout);
	exit(1);
}

/* ---- SHA-256 (FIPS 180-4) ---- */

struct sha256 {
	uint32_t h[8];
	uint8_t blk[64];
	size_t n;     /* bytes in blk */
	uint64_t len; /* total bytes */
};

static const uint32_t sha_k[64] = {
	0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5,
	0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
	0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3,
	0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
	0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc,
	0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
	0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
	0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
	0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
	0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
	0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3,
	0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
	0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5,
	0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
	0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
	0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static uint32_t ror(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static void sha_init(struct sha256 *s)
{
	static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
				       0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

	memcpy(s->h, iv, sizeof(iv));
	s->n = 0;
	s->len = 0;
}

static void sha_block(struct sha256 *s, const uint8_t *p)
{
	uint32_t w[64], a, b, c, d, e, f, g, h;
	int i;

	for (i = 0; i < 16; i++)
		w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
	for (; i < 64; i++) {
		uint32_t s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3);
		uint32_t s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10);

		w[i] = w[i - 16] + s0 + w[i - 7] + s1;
	}
	a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3];
	e = s->h[4], f = s->h[5], g = s->h[6], h = s->h[7];
	for (i = 0; i < 64; i++) {
		uint32_t t1 = h + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) + sha_k[i] + w[i];
		uint32_t t2 = (ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));

		h = g, g = f, f = e, e = d + t1;
		d = c, c = b, b = a, a = t1 + t2;
	}
	s->h[0] += a, s->h[1] += b, s->h[2] += c, s->h[3] += d;
	s->h[4] += e, s->h[5] += f, s->h[6] += g, s->h[7] += h;
}

static void sha_update(struct sha256 *s, const uint8_t *p, size_t n)
{
	s->len += n;
	while (n > 0) {
		size_t k = 64 - s->n < n ? 64 - s->n : n;

		if (s->n == 0 && n >= 64) {
			sha_block(s, p);
			p += 64, n -= 64;
			continue;
		}
		memcpy(s->blk + s->n, p, k);
		s->n += k, p += k, n -= k;
		if (s->n == 64) {
			sha_block(s, s->blk);
			s->n = 0;
		}
	}
}

static void sha_final(struct sha256 *s, char hex[65])
{
	uint64_t bits = s->len * 8;
	uint8_t pad = 0x80, zero = 0, lenb[8];
	int i;

	sha_update(s, &pad, 1);
	while (s->n != 56)
		sha_update(s, &zero, 1);
	for (i = 0; i < 8; i++)
		lenb[i] = (uint8_t)(bits >> (56 - 8 * i));
	sha_update(s, lenb, 8);
	for (i = 0; i < 8; i++)
		snprintf(hex + 8 * i, 9, "%08x", s->h[i]);
}

/* ---- plan and content ---- */

struct hdr {
	uint32_t index;
	uint64_t seed, up, down;
};

static uint64_t splitmix64(uint64_t *s)
{
	uint64_t z = (*s += 0x9E3779B97F4A7C15ull);

	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

static uint64_t pick(uint64_t *s)
{
	uint64_t r = splitmix64(s), base = 1ull << (r % 21), v = base + (r >> 32) % base;

	return v < MAX_SIZE ? v : MAX_SIZE;
}

static uint64_t min64(uint64_t a, uint64_t b) { return a < b ? a : b; }

static void plan(uint64_t seed, int n, uint64_t budget, struct hdr *out)
{
	uint64_t s = seed, used_up = 0, used_down = 0;

	if (n < 1 || n > MAX_STREAMS || budget < (uint64_t)n) {
		errno = EINVAL;
		failf("plan: %d streams, budget %" PRIu64, n, budget);
	}
	for (int i = 0; i < n; i++) {
		uint64_t up = pick(&s), down = pick(&s), rest = (uint64_t)(n - 1 - i);

		if (i == 0)
			up = 1, down = MAX_SIZE;
		else if (i == 1)
			up = MAX_SIZE, down = 1;
		up = min64(up, budget - used_up - rest);
		down = min64(down, budget - used_down - rest);
		used_up += up, used_down += down;
		out[i] = (struct hdr){.index = (uint32_t)i, .seed = seed, .up = up, .down = down};
	}
}

struct gen {
	uint64_t s;
	uint8_t buf[8];
	int off;
};

enum { UP = 0, DOWN = 1 };

static void gen_init(struct gen *g, uint64_t seed, uint32_t index, int dir)
{
	g->s = seed ^ (((uint64_t)index * 2 + (uint64_t)dir + 1) * 0xD1B54A32D192ED03ull);
	g->off = 8;
}

static void gen_fill(struct gen *g, uint8_t *p, size_t n)
{
	while (n > 0) {
		if (g->off == 8) {
			uint64_t v = splitmix64(&g->s);

			for (int i = 0; i < 8; i++)
				g->buf[i] = (uint8_t)(v >> (8 * i));
			g->off = 0;
		}
		size_t k = (size_t)(8 - g->off) < n ? (size_t)(8 - g->off) : n;

		memcpy(p, g->buf + g->off, k);
		g->off += (int)k, p += k, n -= k;
	}
}

static void put_be(uint8_t *p, uint64_t v, int n)
{
	for (int i = 0; i < n; i++)
		p[i] = (uint8_t)(v >> (8 * (n - 1 - i)));
}

static uint64_t get_be(const uint8_t *p, int n)
{
	uint64_t v = 0;

	for (int i = 0; i < n; i++)
		v = v << 8 | p[i];
	return v;
}

static void marshal(const struct hdr *h, uint8_t b[HDR_SIZE])
{
	memcpy(b, "VSC1", 4);
	put_be(b + 4, h->index, 4);
	put_be(b + 8, h->seed, 8);
	put_be(b + 16, h->up, 8);
	put_be(b + 24, h->down, 8);
}

/* ---- streams ---- */

struct stream {
	int fd;
	int index;         /* client: plan index; server: slot until the header */
	int connecting;    /* client: connect in progress */
	int have_hdr;      /* server: header received and checked */
	int send_done;     /* everything sent (client: and SHUT_WR) */
	int eof;           /* EOF received after everything */
	int registered;    /* in the epoll set */
	uint32_t events;   /* current epoll interest */
	struct hdr h;
	uint8_t hdrbuf[HDR_SIZE];
	size_t hdr_got;
	uint64_t send_total, sent;     /* payload to send, sent (bytes of the generator) */
	uint64_t recv_total, rcvd;     /* payload expected, received */
	struct gen gsend, grecv;
	struct sha256 hsend, hrecv;
	uint8_t *pend;                 /* bytes generated, not yet written */
	size_t pend_off, pend_len, chunk;
	char local[64], remote[64];
};

static struct {
	uint64_t inprogress, eagain_r, eagain_w, partial_w, waits, reads, writes;
} st;

static uint8_t rbuf[CHUNK], want[CHUNK];

static const char *fmt_addr(const struct sockaddr_storage *ss, char *buf, size_t n)
{
	char ip[INET6_ADDRSTRLEN];

	if (ss->ss_family == AF_INET) {
		const struct sockaddr_in *in = (const struct sockaddr_in *)ss;

		inet_ntop(AF_INET, &in->sin_addr, ip, sizeof(ip));
		snprintf(buf, n, "%s:%u", ip, ntohs(in->sin_port));
	} else {
		snprintf(buf, n, "family-%d", ss->ss_family);
	}
	return buf;
}

static void names(struct stream *s)
{
	struct sockaddr_storage ss;
	socklen_t l = sizeof(ss);
	int fl = fcntl(s->fd, F_GETFL);

	/* the library's socket swap must keep the descriptor non-blocking */
	if (fl < 0 || !(fl & O_NONBLOCK)) {
		errno = 0;
		failf("stream %d: descriptor is not O_NONBLOCK (flags %#x)", s->index, fl);
	}

	if (getsockname(s->fd, (struct sockaddr *)&ss, &l) < 0)
		failf("stream %d: getsockname", s->index);
	fmt_addr(&ss, s->local, sizeof(s->local));
	l = sizeof(ss);
	if (getpeername(s->fd, (struct sockaddr *)&ss, &l) < 0)
		failf("stream %d: getpeername", s->index);
	fmt_addr(&ss, s->remote, sizeof(s->remote));
}

static void set_events(int ep, struct stream *s, uint32_t ev, uint32_t slot)
{
	struct epoll_event e = {.events = ev, .data.u32 = slot};

	if (ev == s->events && s->registered)
		return;
	if (epoll_ctl(ep, s->registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, s->fd, &e) < 0)
		failf("stream %d: epoll_ctl", s->index);
	s->registered = 1;
	s->events = ev;
}

static void unregister(int ep, struct stream *s)
{
	if (s->registered && epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL) < 0)
		failf("stream %d: epoll_ctl DEL", s->index);
	s->registered = 0;
}

/* start_data prepares the sending and receiving halves once the header is
 * known; for a client the header goes first in the pending bytes. */
static void start_data(struct stream *s, int client)
{
	s->send_total = client ? s->h.up : s->h.down;
	s->recv_total = client ? s->h.down : s->h.up;
	gen_init(&s->gsend, s->h.seed, s->h.index, client ? UP : DOWN);
	gen_init(&s->grecv, s->h.seed, s->h.index, client ? DOWN : UP);
	sha_init(&s->hsend);
	sha_init(&s->hrecv);
	s->pend = malloc(CHUNK);
	if (s->pend == NULL)
		failf("malloc");
	s->pend_off = s->pend_len = 0;
	s->chunk = 1 + (size_t)(s->h.index % 7) * 9000; /* chunk sizes vary per stream */
	if (client) {
		marshal(&s->h, s->pend);
		s->pend_len = HDR_SIZE;
	}
}

/* do_write writes until EAGAIN or the end; returns 1 when all is sent. */
static int do_write(struct stream *s)
{
	for (;;) {
		if (s->pend_off == s->pend_len) {
			uint64_t left = s->send_total - s->sent;
			size_t k;

			if (left == 0)
				return 1;
			k = (size_t)min64(left, s->chunk);
			gen_fill(&s->gsend, s->pend, k);
			sha_update(&s->hsend, s->pend, k);
			s->sent += k;
			s->pend_off = 0, s->pend_len = k;
			s->chunk = s->chunk * 2 + 1 < CHUNK ? s->chunk * 2 + 1 : CHUNK;
		}
		ssize_t r = write(s->fd, s->pend + s->pend_off, s->pend_len - s->pend_off);

		st.writes++;
		if (r < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				st.eagain_w++;
				return 0;
			}
			if (errno == EINTR)
				continue;
			failf("stream %d: write after %" PRIu64 " bytes", s->index, s->sent);
		}
		if ((size_t)r < s->pend_len - s->pend_off)
			st.partial_w++;
		s->pend_off += (size_t)r;
	}
}

/* consume checks received payload bytes; a server first takes the header. */
static void consume(struct stream *s, const uint8_t *p, size_t n)
{
	if (s->rcvd + n > s->recv_total)
		failf("stream %d: %" PRIu64 " bytes past the announced %" PRIu64, s->index, s->rcvd + n - s->recv_total,
		      s->recv_total);
	gen_fill(&s->grecv, want, n);
	if (memcmp(p, want, n) != 0) {
		size_t i = 0;

		while (p[i] == want[i])
			i++;
		errno = 0;
		failf("stream %d: byte %" PRIu64 " is %#02x, want %#02x", s->index, s->rcvd + i, p[i], want[i]);
	}
	sha_update(&s->hrecv, p, n);
	s->rcvd += n;
}

/* do_read reads until EAGAIN or EOF; hdr_cb takes a server's header. */
static void do_read(struct stream *s, void (*hdr_cb)(struct stream *))
{
	for (;;) {
		size_t want_n = sizeof(rbuf) - (size_t)(s->rcvd % 4093); /* varied read sizes */
		ssize_t r = read(s->fd, rbuf, want_n);

		st.reads++;
		if (r < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				st.eagain_r++;
				return;
			}
			if (errno == EINTR)
				continue;
			failf("stream %d: read after %" PRIu64 " bytes", s->index, s->rcvd);
		}
		if (r == 0) {
			if (hdr_cb != NULL && s->hdr_got < HDR_SIZE) {
				errno = 0;
				failf("stream %d: EOF inside the header", s->index);
			}
			if (s->rcvd != s->recv_total) {
				errno = 0;
				failf("stream %d: EOF after %" PRIu64 " of %" PRIu64 " bytes", s->index, s->rcvd, s->recv_total);
			}
			s->eof = 1;
			return;
		}
		const uint8_t *p = rbuf;
		size_t n = (size_t)r;

		if (hdr_cb != NULL && s->hdr_got < HDR_SIZE) {
			size_t k = HDR_SIZE - s->hdr_got < n ? HDR_SIZE - s->hdr_got : n;

			memcpy(s->hdrbuf + s->hdr_got, p, k);
			s->hdr_got += k, p += k, n -= k;
			if (s->hdr_got == HDR_SIZE)
				hdr_cb(s);
		}
		if (n > 0)
			consume(s, p, n);
	}
}

static void report(struct stream *s, int client)
{
	char hs[65], hr[65];

	sha_final(&s->hsend, hs);
	sha_final(&s->hrecv, hr);
	printf("stream=%u up=%" PRIu64 " down=%" PRIu64 " up_sha256=%s down_sha256=%s local=%s remote=%s\n", s->h.index,
	       s->h.up, s->h.down, client ? hs : hr, client ? hr : hs, s->local, s->remote);
}

static void summary(int n, uint64_t up, uint64_t down)
{
	int (*get)(struct vsdp_counters *, size_t) =
		(int (*)(struct vsdp_counters *, size_t))dlsym(RTLD_DEFAULT, "vsdp_counters");
	struct vsdp_counters c;

	printf("streams=%d bytes_up=%" PRIu64 " bytes_down=%" PRIu64 " inprogress=%" PRIu64 " eagain_r=%" PRIu64
	       " eagain_w=%" PRIu64 " partial_w=%" PRIu64 " epoll_waits=%" PRIu64 " reads=%" PRIu64 " writes=%" PRIu64 "\n",
	       n, up, down, st.inprogress, st.eagain_r, st.eagain_w, st.partial_w, st.waits, st.reads, st.writes);
	if (get != NULL && get(&c, sizeof(c)) == 0)
		printf("preloaded=1 swaps=%" PRIu64 " epoll_rereg=%" PRIu64 " tickets=%" PRIu64 " accepts=%" PRIu64
		       " protocol_errors=%" PRIu64 "\n",
		       c.swaps, c.epoll_rereg, c.tickets, c.accepts, c.protocol_errors);
	else
		printf("preloaded=0\n");
	fflush(stdout);
}

static int wait_events(int ep, struct epoll_event *evs, int max, const char *what, int left)
{
	int n;

	do
		n = epoll_wait(ep, evs, max, IDLE_MS);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		failf("epoll_wait");
	if (n == 0) {
		errno = 0;
		failf("%s: no event for %d ms with %d streams unfinished", what, IDLE_MS, left);
	}
	st.waits++;
	return n;
}

static uint64_t parse_u64(const char *s, const char *what)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno != 0 || *s == '\0' || *end != '\0')
		failf("bad %s \"%s\"", what, s);
	return v;
}

/* ---- client ---- */

static int cmd_dial(char **av)
{
	struct sockaddr_in sa = {.sin_family = AF_INET};
	uint64_t seed = parse_u64(av[2], "seed"), budget = parse_u64(av[4], "budget"), up = 0, down = 0;
	int n = (int)parse_u64(av[3], "count"), ep, left;
	struct hdr *hs;
	struct stream *ss;
	struct epoll_event evs[64];

	if (inet_pton(AF_INET, av[0], &sa.sin_addr) != 1)
		failf("bad address %s", av[0]);
	sa.sin_port = htons((uint16_t)parse_u64(av[1], "port"));
	if (n < 1 || n > MAX_STREAMS)
		failf("bad count %d", n);
	hs = calloc((size_t)n, sizeof(*hs));
	ss = calloc((size_t)n, sizeof(*ss));
	if (hs == NULL || ss == NULL)
		failf("calloc");
	plan(seed, n, budget, hs);
	ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0)
		failf("epoll_create1");
	for (int i = 0; i < n; i++) {
		struct stream *s = &ss[i];

		s->index = i;
		s->h = hs[i];
		s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (s->fd < 0)
			failf("socket");
		start_data(s, 1);
		/* Even streams are in the epoll set before connect(): the
		 * library must carry the registration over its socket swap. */
		if (i % 2 == 0)
			set_events(ep, s, EPOLLIN | EPOLLOUT, (uint32_t)i);
		if (connect(s->fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
			names(s);
		} else if (errno == EINPROGRESS) {
			s->connecting = 1;
			st.inprogress++;
		} else {
			failf("stream %d: connect", i);
		}
		if (i % 2 == 1)
			set_events(ep, s, EPOLLIN | EPOLLOUT, (uint32_t)i);
	}
	for (left = n; left > 0;) {
		int k = wait_events(ep, evs, 64, "dial", left);

		for (int j = 0; j < k; j++) {
			uint32_t i = evs[j].data.u32, ev = evs[j].events;
			struct stream *s = &ss[i];

			if (i >= (uint32_t)n || s->eof)
				failf("event for stream %u", i);
			if (s->connecting) {
				int err = 0;
				socklen_t l = sizeof(err);

				if (!(ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
					continue;
				if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &l) < 0)
					failf("stream %u: SO_ERROR", i);
				if (err != 0) {
					errno = err;
					failf("stream %u: non-blocking connect", i);
				}
				s->connecting = 0;
				names(s);
			}
			if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR))
				do_read(s, NULL);
			if (!s->send_done && (ev & EPOLLOUT) && do_write(s)) {
				if (shutdown(s->fd, SHUT_WR) < 0)
					failf("stream %u: shutdown", i);
				s->send_done = 1;
				free(s->pend);
				s->pend = NULL;
			}
			if (s->eof) {
				if (!s->send_done) {
					errno = 0;
					failf("stream %u: EOF before everything was sent", i);
				}
				unregister(ep, s);
				if (close(s->fd) < 0)
					failf("stream %u: close", i);
				left--;
			} else if (s->send_done) {
				set_events(ep, s, EPOLLIN, i);
			}
		}
	}
	for (int i = 0; i < n; i++) {
		report(&ss[i], 1);
		up += ss[i].h.up;
		down += ss[i].h.down;
	}
	summary(n, up, down);
	close(ep);
	free(hs);
	free(ss);
	return 0;
}

/* ---- server ---- */

static struct hdr *srv_plan;
static int srv_n;
static uint64_t srv_seed;
static char *srv_seen;

static void srv_header(struct stream *s)
{
	struct hdr h;

	errno = 0;
	if (memcmp(s->hdrbuf, "VSC1", 4) != 0)
		failf("connection %d: bad magic", s->index);
	h.index = (uint32_t)get_be(s->hdrbuf + 4, 4);
	h.seed = get_be(s->hdrbuf + 8, 8);
	h.up = get_be(s->hdrbuf + 16, 8);
	h.down = get_be(s->hdrbuf + 24, 8);
	if (h.seed != srv_seed || h.index >= (uint32_t)srv_n)
		failf("connection %d: header seed %#" PRIx64 " index %u, want seed %#" PRIx64 " index < %d", s->index, h.seed,
		      h.index, srv_seed, srv_n);
	if (srv_seen[h.index])
		failf("stream %u opened twice", h.index);
	if (h.up != srv_plan[h.index].up || h.down != srv_plan[h.index].down)
		failf("stream %u: sizes %" PRIu64 "/%" PRIu64 ", plan says %" PRIu64 "/%" PRIu64, h.index, h.up, h.down,
		      srv_plan[h.index].up, srv_plan[h.index].down);
	srv_seen[h.index] = 1;
	s->h = h;
	s->have_hdr = 1;
	s->index = (int)h.index;
	start_data(s, 0);
}

static int cmd_serve(char **av)
{
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_ANY)};
	uint64_t budget, up = 0, down = 0;
	int lfd, ep, one = 1, accepted = 0, done = 0;
	struct stream *ss;
	struct epoll_event evs[64], lev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
	const char *release = av[4];

	sa.sin_port = htons((uint16_t)parse_u64(av[0], "port"));
	srv_seed = parse_u64(av[1], "seed");
	srv_n = (int)parse_u64(av[2], "count");
	budget = parse_u64(av[3], "budget");
	if (srv_n < 1 || srv_n > MAX_STREAMS)
		failf("bad count %d", srv_n);
	srv_plan = calloc((size_t)srv_n, sizeof(*srv_plan));
	srv_seen = calloc((size_t)srv_n, 1);
	ss = calloc((size_t)srv_n, sizeof(*ss));
	if (srv_plan == NULL || srv_seen == NULL || ss == NULL)
		failf("calloc");
	plan(srv_seed, srv_n, budget, srv_plan);
	lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0)
		failf("listen socket");
	if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 128) < 0)
		failf("bind/listen on port %s", av[0]);
	if (fcntl(lfd, F_SETFL, fcntl(lfd, F_GETFL) | O_NONBLOCK) < 0)
		failf("O_NONBLOCK");
	ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev) < 0)
		failf("epoll");
	while (done < srv_n) {
		int k = wait_events(ep, evs, 64, "serve", srv_n - done);

		for (int j = 0; j < k; j++) {
			uint32_t i = evs[j].data.u32, ev = evs[j].events;

			if (i == UINT32_MAX) {
				for (;;) {
					int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

					if (fd < 0) {
						if (errno == EAGAIN || errno == EWOULDBLOCK)
							break;
						if (errno == EINTR || errno == ECONNABORTED)
							continue;
						failf("accept4");
					}
					if (accepted == srv_n)
						failf("connection %d beyond the %d expected", accepted + 1, srv_n);
					ss[accepted].fd = fd;
					ss[accepted].index = accepted;
					names(&ss[accepted]);
					set_events(ep, &ss[accepted], EPOLLIN, (uint32_t)accepted);
					accepted++;
				}
				if (accepted == srv_n && epoll_ctl(ep, EPOLL_CTL_DEL, lfd, NULL) < 0)
					failf("epoll_ctl DEL listener");
				continue;
			}
			struct stream *s = &ss[i];

			if (i >= (uint32_t)accepted)
				failf("event for connection %u", i);
			if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR))
				do_read(s, srv_header);
			if (s->have_hdr && !s->send_done && (ev & EPOLLOUT) && do_write(s)) {
				s->send_done = 1;
				free(s->pend);
				s->pend = NULL;
			}
			if (s->eof && s->send_done) {
				unregister(ep, s); /* open until released */
				done++;
			} else if (s->have_hdr) {
				set_events(ep, s, (s->eof ? 0 : EPOLLIN) | (s->send_done ? 0 : EPOLLOUT), i);
			}
		}
	}
	close(lfd);
	/* Every stream is served; hold them open until the test says. */
	while (access(release, F_OK) != 0) {
		struct timespec ts = {0, 20 * 1000 * 1000};

		nanosleep(&ts, NULL);
	}
	for (int i = 0; i < srv_n; i++) {
		if (close(ss[i].fd) < 0)
			failf("close");
		report(&ss[i], 0);
		up += ss[i].h.up;
		down += ss[i].h.down;
	}
	summary(srv_n, up, down);
	close(ep);
	return 0;
}

/* ---- helpers for the host-tier test ---- */

static int cmd_plan(char **av)
{
	uint64_t seed = parse_u64(av[0], "seed"), budget = parse_u64(av[2], "budget");
	int n = (int)parse_u64(av[1], "count");
	struct hdr *hs = calloc(MAX_STREAMS, sizeof(*hs));

	if (hs == NULL)
		failf("calloc");
	plan(seed, n, budget, hs);
	for (int i = 0; i < n; i++)
		printf("%u %" PRIu64 " %" PRIu64 "\n", hs[i].index, hs[i].up, hs[i].down);
	free(hs);
	return 0;
}

static int cmd_sum(char **av)
{
	uint64_t seed = parse_u64(av[0], "seed"), n = parse_u64(av[3], "length");
	uint32_t index = (uint32_t)parse_u64(av[1], "index");
	int dir = strcmp(av[2], "down") == 0 ? DOWN : UP;
	struct gen g;
	struct sha256 h;
	char hex[65];

	gen_init(&g, seed, index, dir);
	sha_init(&h);
	while (n > 0) {
		size_t k = (size_t)min64(n, 1000); /* not a multiple of 8 or 64 */

		gen_fill(&g, rbuf, k);
		sha_update(&h, rbuf, k);
		n -= k;
	}
	sha_final(&h, hex);
	printf("%s\n", hex);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOFBF, 1 << 16);
	alarm(150); /* never hang a test run */
	if (argc == 7 && strcmp(argv[1], "dial") == 0)
		return cmd_dial(argv + 2);
	if (argc == 7 && strcmp(argv[1], "serve") == 0)
		return cmd_serve(argv + 2);
	if (argc == 5 && strcmp(argv[1], "plan") == 0)
		return cmd_plan(argv + 2);
	if (argc == 6 && strcmp(argv[1], "sum") == 0)
		return cmd_sum(argv + 2);
	fprintf(stderr, "usage: vsdpstreams dial ADDR PORT SEED N BUDGET | serve PORT SEED N BUDGET RELEASEFILE |\n"
			"       plan SEED N BUDGET | sum SEED INDEX up|down LEN\n");
	return 2;
}
