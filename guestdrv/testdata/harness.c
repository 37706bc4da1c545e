/*
 * harness - drives libvsdp's pure C parts (the rule parser and the control
 * codec) for the Go tests and fuzz targets, one request after another on
 * stdin, one answer each on stdout. Built with the sanitizers by the tests.
 *
 * Request: u8 op, le32 length, payload. Answer: le32 length, payload.
 *   'P' config text           -> "R <rule>\t<line>\n"..., "E <line> <msg>\n"..., "L <dest> <level> <file>\n", "N <errors>\n"
 *   'M' role\0prog\0addr\0port\0config -> "<action> <line>\n" (line 0: no rule)
 *   'D' frame bytes           -> "more\n", "bad\n" or "ok <len> <fields>\n"
 *   'E' "<fields>"            -> the encoded frame, or nothing if it fails
 *   'S' (empty)               -> "<type> <body size>\n" for each known type
 * <fields>: type id pid ver cid flags port timeout backlog gport hport err
 * level name value lfam lport laddr(hex32) rfam rport raddr(hex32).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../libvsdp/rules.h"
#include "../libvsdp/vsdp_ctl.h"

static char *out;
static size_t outlen, outcap;

static void put(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#include <stdarg.h>
static void put(const char *fmt, ...)
{
	va_list ap;
	int n;

	for (;;) {
		va_start(ap, fmt);
		n = vsnprintf(out + outlen, outcap - outlen, fmt, ap);
		va_end(ap);
		if (n >= 0 && (size_t)n < outcap - outlen)
			break;
		outcap = outcap * 2 + (size_t)n + 64;
		out = realloc(out, outcap);
		if (out == NULL)
			abort();
	}
	outlen += (size_t)n;
}

static void put_bytes(const void *b, size_t n)
{
	if (outlen + n > outcap) {
		outcap = outlen + n + 64;
		out = realloc(out, outcap);
		if (out == NULL)
			abort();
	}
	memcpy(out + outlen, b, n);
	outlen += n;
}

static int read_full(void *b, size_t n)
{
	char *p = b;

	while (n > 0) {
		ssize_t r = read(0, p, n);

		if (r <= 0)
			return -1;
		p += r;
		n -= (size_t)r;
	}
	return 0;
}

static void answer(void)
{
	uint8_t h[4];
	size_t off = 0;

	vsdp_ctl_put32(h, (uint32_t)outlen);
	if (write(1, h, 4) != 4)
		exit(1);
	while (off < outlen) {
		ssize_t r = write(1, out + off, outlen - off);

		if (r <= 0)
			exit(1);
		off += (size_t)r;
	}
	outlen = 0;
}

static void hex(const uint8_t *a, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		put("%02x", a[i]);
}

static void put_fields(const struct vsdp_ctl_msg *m)
{
	put("%u %u %u %u %u %u %u %u %u %u %u %d %d %d %d %u %u ", m->type, m->id, m->pid, m->ver,
	    m->cid, m->flags, m->port, m->timeout, m->backlog, m->guest_port, m->host_port, m->err,
	    m->level, m->name, m->value, m->local.family, m->local.port);
	hex(m->local.addr, 16);
	put(" %u %u ", m->remote.family, m->remote.port);
	hex(m->remote.addr, 16);
}

static int unhex(const char *s, uint8_t *a)
{
	int i;

	for (i = 0; i < 16; i++) {
		unsigned v;

		if (sscanf(s + 2 * i, "%2x", &v) != 1)
			return -1;
		a[i] = (uint8_t)v;
	}
	return 0;
}

static void op_parse(const char *p, size_t n)
{
	struct vsdp_rules r;
	struct vsdp_rules_err errs[32];
	char line[VSDP_PROG_MAX + 128];
	int nerr = vsdp_rules_parse(p, n, &r, errs, 32), i;
	size_t k;

	for (k = 0; k < r.n; k++) {
		vsdp_rule_format(&r.v[k], line, sizeof(line));
		put("R %s\t%d\n", line, r.v[k].line);
	}
	for (i = 0; i < nerr && i < 32; i++)
		put("E %d %s\n", errs[i].line, errs[i].msg);
	put("L %d %d %s\n", r.log_dest, r.log_level, r.log_file);
	put("N %d\n", nerr);
	vsdp_rules_free(&r);
}

static void op_match(const char *p, size_t n)
{
	const char *f[5];
	size_t i, k = 0, start = 0;
	struct vsdp_rules r;
	uint8_t addr[16];
	int fam = 4, idx, act, role;

	for (i = 0; i < n && k < 4; i++) {
		if (p[i] == 0) {
			f[k++] = p + start;
			start = i + 1;
		}
	}
	if (k < 4) {
		put("badquery\n");
		return;
	}
	f[4] = p + start;
	role = strcmp(f[0], "server") == 0 ? VSDP_ROLE_SERVER : VSDP_ROLE_CLIENT;
	if (inet_pton(AF_INET, f[2], addr) != 1) {
		fam = 6;
		if (inet_pton(AF_INET6, f[2], addr) != 1) {
			put("badquery\n");
			return;
		}
	}
	vsdp_rules_parse(f[4], n - start, &r, NULL, 0);
	act = vsdp_rules_match(&r, role, f[1], fam, addr, (uint16_t)atoi(f[3]), &idx);
	put("%s %d\n", vsdp_action_name(act), idx >= 0 ? r.v[idx].line : 0);
	vsdp_rules_free(&r);
}

static void op_decode(const uint8_t *p, size_t n)
{
	struct vsdp_ctl_msg m;
	int r = vsdp_ctl_decode(p, n, &m);

	if (r == 0) {
		put("more\n");
		return;
	}
	if (r < 0) {
		put("bad\n");
		return;
	}
	put("ok %d ", r);
	put_fields(&m);
	put("\n");
}

static void op_encode(const char *p)
{
	struct vsdp_ctl_msg m;
	unsigned t, lf, lp, rf, rp;
	char la[40], ra[40];
	uint8_t b[VSDP_CTL_MAX_FRAME];
	int n;

	memset(&m, 0, sizeof(m));
	if (sscanf(p, "%u %u %u %u %u %u %u %u %u %u %u %d %d %d %d %u %u %32s %u %u %32s", &t, &m.id,
		   &m.pid, &m.ver, &m.cid, &m.flags, &m.port, &m.timeout, &m.backlog, &m.guest_port,
		   &m.host_port, &m.err, &m.level, &m.name, &m.value, &lf, &lp, la, &rf, &rp, ra) != 21)
		return;
	m.type = (uint8_t)t;
	m.local.family = (uint8_t)lf;
	m.local.port = (uint16_t)lp;
	m.remote.family = (uint8_t)rf;
	m.remote.port = (uint16_t)rp;
	if (unhex(la, m.local.addr) < 0 || unhex(ra, m.remote.addr) < 0)
		return;
	n = vsdp_ctl_encode(&m, b, sizeof(b));
	if (n > 0)
		put_bytes(b, (size_t)n);
}

int main(void)
{
	outcap = 4096;
	out = malloc(outcap);
	for (;;) {
		uint8_t h[5];
		uint32_t n;
		char *p;

		if (read_full(h, 5) < 0)
			return 0;
		n = vsdp_ctl_get32(h + 1);
		if (n > (1u << 22))
			return 1;
		p = malloc((size_t)n + 1);
		if (p == NULL || (n > 0 && read_full(p, n) < 0))
			return 1;
		p[n] = 0;
		switch (h[0]) {
		case 'P':
			op_parse(p, n);
			break;
		case 'M':
			op_match(p, n);
			break;
		case 'D':
			op_decode((uint8_t *)p, n);
			break;
		case 'E':
			op_encode(p);
			break;
		case 'S': {
			int t;

			for (t = 0; t < 256; t++)
				if (vsdp_ctl_body_size((uint8_t)t) >= 0)
					put("%d %d\n", t, vsdp_ctl_body_size((uint8_t)t));
			break;
		}
		default:
			return 1;
		}
		free(p);
		answer();
	}
}
