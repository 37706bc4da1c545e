/*
 * rules.c - libsdp.conf rule syntax: parser and matcher. See rules.h.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "rules.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <fnmatch.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define MAX_TOKENS 8
#define TOKEN_MAX 1100

struct line_ctx {
	int line;
	struct vsdp_rules_err *errs;
	size_t maxerr, nerr;
};

static void line_error(struct line_ctx *c, const char *fmt, const char *arg)
{
	if (c->nerr < c->maxerr) {
		struct vsdp_rules_err *e = &c->errs[c->nerr];

		e->line = c->line;
		if (arg != NULL) {
			/* Quote at most 60 bytes of the offending text. */
			char q[64];
			size_t i, n = strlen(arg);

			if (n > 60)
				n = 60;
			for (i = 0; i < n; i++)
				q[i] = isprint((unsigned char)arg[i]) ? arg[i] : '?';
			q[n] = 0;
			snprintf(e->msg, sizeof(e->msg), fmt, q);
		} else {
			snprintf(e->msg, sizeof(e->msg), "%s", fmt);
		}
	}
	c->nerr++;
}

/* parse_uint parses a decimal number of at most 5 digits, no sign. */
static int parse_uint(const char *s, size_t n, unsigned max, unsigned *out)
{
	unsigned v = 0;
	size_t i;

	if (n == 0 || n > 5)
		return -1;
	for (i = 0; i < n; i++) {
		if (s[i] < '0' || s[i] > '9')
			return -1;
		v = v * 10 + (unsigned)(s[i] - '0');
	}
	if (v > max)
		return -1;
	*out = v;
	return 0;
}

static int parse_ports(const char *s, struct vsdp_rule *r, struct line_ctx *c)
{
	const char *dash;
	unsigned lo, hi;

	if (strcmp(s, "*") == 0) {
		r->port_lo = 0;
		r->port_hi = 65535;
		return 0;
	}
	dash = strchr(s, '-');
	if (dash == NULL) {
		if (parse_uint(s, strlen(s), 65535, &lo) < 0) {
			line_error(c, "bad port %s (want N, N-M or *)", s);
			return -1;
		}
		hi = lo;
	} else if (parse_uint(s, (size_t)(dash - s), 65535, &lo) < 0 ||
		   parse_uint(dash + 1, strlen(dash + 1), 65535, &hi) < 0) {
		line_error(c, "bad port range %s (want N-M, 0-65535)", s);
		return -1;
	}
	if (lo > hi) {
		line_error(c, "port range %s is reversed", s);
		return -1;
	}
	r->port_lo = (uint16_t)lo;
	r->port_hi = (uint16_t)hi;
	return 0;
}

static void mask_addr(uint8_t *a, int len, int prefix)
{
	int i;

	for (i = 0; i < len; i++) {
		int bits = prefix - i * 8;

		if (bits >= 8)
			continue;
		a[i] = bits <= 0 ? 0 : (uint8_t)(a[i] & (0xff << (8 - bits)));
	}
}

static int parse_addr(char *s, struct vsdp_rule *r, struct line_ctx *c)
{
	char *slash, *a = s;
	size_t n = strlen(s);
	unsigned prefix;
	int max;

	/* [addr], [addr]/prefix and [addr/prefix] are all accepted. */
	if (n > 0 && a[0] == '[') {
		char *close = strchr(a, ']');

		if (close == NULL) {
			line_error(c, "bad address %s (unbalanced '[')", s);
			return -1;
		}
		memmove(close, close + 1, strlen(close + 1) + 1);
		a++;
		if (strchr(a, '[') != NULL || strchr(a, ']') != NULL) {
			line_error(c, "bad address %s", s);
			return -1;
		}
	}
	if (strcmp(a, "*") == 0) {
		r->family = 0;
		r->prefix = 0;
		memset(r->addr, 0, sizeof(r->addr));
		return 0;
	}
	slash = strchr(a, '/');
	if (slash != NULL)
		*slash = 0;
	if (inet_pton(AF_INET, a, r->addr) == 1) {
		r->family = 4;
		max = 32;
	} else if (inet_pton(AF_INET6, a, r->addr) == 1) {
		r->family = 6;
		max = 128;
	} else {
		line_error(c, "bad address %s (want IPv4, IPv6 or *)", a);
		return -1;
	}
	prefix = (unsigned)max;
	if (slash != NULL && parse_uint(slash + 1, strlen(slash + 1), (unsigned)max, &prefix) < 0) {
		line_error(c, "bad prefix length /%s", slash + 1);
		return -1;
	}
	/* An IPv4-mapped IPv6 rule (::ffff:a.b.c.d/96+) is an IPv4 rule: sockets
	 * match mapped addresses as IPv4. */
	if (r->family == 6 && prefix >= 96 &&
	    IN6_IS_ADDR_V4MAPPED((const struct in6_addr *)(const void *)r->addr)) {
		memmove(r->addr, r->addr + 12, 4);
		memset(r->addr + 4, 0, 12);
		r->family = 4;
		prefix -= 96;
	}
	r->prefix = (uint8_t)prefix;
	mask_addr(r->addr, r->family == 4 ? 4 : 16, (int)prefix);
	return 0;
}

static int parse_addrport(char *s, struct vsdp_rule *r, struct line_ctx *c)
{
	char *colon;

	if (strcmp(s, "*") == 0) {
		r->family = 0;
		r->port_lo = 0;
		r->port_hi = 65535;
		return 0;
	}
	colon = strrchr(s, ':');
	if (colon == NULL || colon == s) {
		line_error(c, "bad address %s (want ADDR[/PREFIX]:PORT[-PORT])", s);
		return -1;
	}
	*colon = 0;
	if (parse_ports(colon + 1, r, c) < 0)
		return -1;
	return parse_addr(s, r, c);
}

static int parse_use(char **tok, int ntok, struct vsdp_rule *r, struct line_ctx *c)
{
	if (ntok != 5) {
		line_error(c, ntok < 5 ? "use: too few fields (want: use ACTION ROLE PROGRAM ADDR:PORT)"
				       : "use: too many fields (want: use ACTION ROLE PROGRAM ADDR:PORT)",
			   NULL);
		return -1;
	}
	memset(r, 0, sizeof(*r));
	r->line = c->line;
	if (strcasecmp(tok[1], "sdp") == 0)
		r->action = VSDP_ACT_SDP;
	else if (strcasecmp(tok[1], "tcp") == 0)
		r->action = VSDP_ACT_TCP;
	else if (strcasecmp(tok[1], "both") == 0)
		r->action = VSDP_ACT_BOTH;
	else {
		line_error(c, "use: bad action %s (want sdp, tcp or both)", tok[1]);
		return -1;
	}
	if (strcasecmp(tok[2], "server") == 0 || strcasecmp(tok[2], "listen") == 0)
		r->role = VSDP_ROLE_SERVER;
	else if (strcasecmp(tok[2], "client") == 0 || strcasecmp(tok[2], "connect") == 0)
		r->role = VSDP_ROLE_CLIENT;
	else {
		line_error(c, "use: bad role %s (want server, listen, client or connect)", tok[2]);
		return -1;
	}
	if (strlen(tok[3]) > VSDP_PROG_MAX) {
		line_error(c, "use: program pattern too long", NULL);
		return -1;
	}
	if (strchr(tok[3], '/') != NULL) {
		line_error(c, "use: program %s is a name, not a path", tok[3]);
		return -1;
	}
	strcpy(r->prog, tok[3]);
	return parse_addrport(tok[4], r, c);
}

static int parse_log(char **tok, int ntok, struct vsdp_rules *out, struct line_ctx *c)
{
	int dest = VSDP_LOG_STDERR, level = 9, seen_dest = 0, seen_level = 0, i = 1;
	const char *file = NULL;
	unsigned v;

	while (i < ntok) {
		if (strcasecmp(tok[i], "destination") == 0 && !seen_dest) {
			seen_dest = 1;
			if (i + 1 >= ntok) {
				line_error(c, "log: destination needs stderr, syslog or file PATH", NULL);
				return -1;
			}
			if (strcasecmp(tok[i + 1], "stderr") == 0) {
				dest = VSDP_LOG_STDERR;
				i += 2;
			} else if (strcasecmp(tok[i + 1], "syslog") == 0) {
				dest = VSDP_LOG_SYSLOG;
				i += 2;
			} else if (strcasecmp(tok[i + 1], "file") == 0) {
				if (i + 2 >= ntok) {
					line_error(c, "log: destination file needs a path", NULL);
					return -1;
				}
				if (strlen(tok[i + 2]) > VSDP_PATH_MAX) {
					line_error(c, "log: file path too long", NULL);
					return -1;
				}
				dest = VSDP_LOG_FILE;
				file = tok[i + 2];
				i += 3;
			} else {
				line_error(c, "log: bad destination %s (want stderr, syslog or file PATH)",
					   tok[i + 1]);
				return -1;
			}
		} else if (strcasecmp(tok[i], "min-level") == 0 && !seen_level) {
			seen_level = 1;
			if (i + 1 >= ntok || parse_uint(tok[i + 1], strlen(tok[i + 1]), 9, &v) < 0 ||
			    v < 1) {
				line_error(c, "log: min-level needs a level from 1 to 9", NULL);
				return -1;
			}
			level = (int)v;
			i += 2;
		} else {
			line_error(c, "log: unexpected %s (want destination or min-level, once each)",
				   tok[i]);
			return -1;
		}
	}
	out->log_dest = dest;
	out->log_level = level;
	if (file != NULL)
		strcpy(out->log_file, file);
	else
		out->log_file[0] = 0;
	return 0;
}

static int is_space(char ch)
{
	return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\v' || ch == '\f';
}

/* parse_line handles one line (no '\n'), already cut at '#'. */
static int parse_line(char *s, size_t n, struct vsdp_rules *out, size_t *cap,
		      struct line_ctx *c)
{
	char *tok[MAX_TOKENS + 1];
	int ntok = 0;
	size_t i = 0;

	while (i < n) {
		while (i < n && is_space(s[i]))
			s[i++] = 0;
		if (i >= n)
			break;
		if (ntok == MAX_TOKENS + 1) {
			line_error(c, "too many fields", NULL);
			return 0;
		}
		tok[ntok++] = &s[i];
		while (i < n && !is_space(s[i]))
			i++;
	}
	if (ntok == 0)
		return 0;
	for (i = 0; i < (size_t)ntok; i++) {
		if (strlen(tok[i]) > TOKEN_MAX) {
			line_error(c, "field too long", NULL);
			return 0;
		}
	}
	if (strcasecmp(tok[0], "use") == 0) {
		struct vsdp_rule r;

		if (parse_use(tok, ntok, &r, c) < 0)
			return 0;
		if (out->n == VSDP_RULES_MAX) {
			line_error(c, "too many rules", NULL);
			return 0;
		}
		if (out->n == *cap) {
			size_t nc = *cap ? *cap * 2 : 16;
			struct vsdp_rule *v = realloc(out->v, nc * sizeof(*v));

			if (v == NULL)
				return -1;
			out->v = v;
			*cap = nc;
		}
		out->v[out->n++] = r;
		return 0;
	}
	if (strcasecmp(tok[0], "log") == 0) {
		parse_log(tok, ntok, out, c);
		return 0;
	}
	line_error(c, "unknown statement %s (want use or log)", tok[0]);
	return 0;
}

int vsdp_rules_parse(const char *text, size_t len, struct vsdp_rules *out,
		     struct vsdp_rules_err *errs, size_t maxerr)
{
	struct line_ctx c = {.line = 0, .errs = errs, .maxerr = maxerr};
	size_t cap = 0, pos = 0;
	char *buf;

	memset(out, 0, sizeof(*out));
	out->log_level = 9;
	if (len > VSDP_CONFIG_MAX) {
		c.line = 1;
		line_error(&c, "configuration larger than 1 MiB", NULL);
		return (int)c.nerr;
	}
	buf = malloc(len + 1);
	if (buf == NULL)
		return -1;
	memcpy(buf, text, len);
	buf[len] = 0;
	while (pos < len) {
		char *line = buf + pos, *nl = memchr(line, '\n', len - pos);
		size_t n = nl ? (size_t)(nl - line) : len - pos;
		char *hash;

		c.line++;
		pos += n + (nl ? 1 : 0);
		if (memchr(line, 0, n) != NULL) {
			line_error(&c, "NUL byte in line", NULL);
			continue;
		}
		line[n] = 0;
		hash = strchr(line, '#');
		if (hash != NULL) {
			*hash = 0;
			n = (size_t)(hash - line);
		}
		if (parse_line(line, n, out, &cap, &c) < 0) {
			free(buf);
			vsdp_rules_free(out);
			return -1;
		}
	}
	free(buf);
	return (int)c.nerr;
}

void vsdp_rules_free(struct vsdp_rules *r)
{
	free(r->v);
	r->v = NULL;
	r->n = 0;
}

static int prefix_match(const uint8_t *a, const uint8_t *b, int prefix)
{
	int full = prefix / 8, rest = prefix % 8;

	if (memcmp(a, b, (size_t)full) != 0)
		return 0;
	if (rest == 0)
		return 1;
	return ((a[full] ^ b[full]) & (0xff << (8 - rest))) == 0;
}

int vsdp_rules_match(const struct vsdp_rules *r, int role, const char *prog, int fam,
		     const uint8_t *addr, uint16_t port, int *idx)
{
	size_t i;

	if (idx != NULL)
		*idx = -1;
	if (prog == NULL)
		prog = "";
	for (i = 0; i < r->n; i++) {
		const struct vsdp_rule *x = &r->v[i];

		if (x->role != role || port < x->port_lo || port > x->port_hi)
			continue;
		if (x->family != 0 && (x->family != fam || !prefix_match(x->addr, addr, x->prefix)))
			continue;
		if (fnmatch(x->prog, prog, 0) != 0)
			continue;
		if (idx != NULL)
			*idx = (int)i;
		return x->action;
	}
	return VSDP_ACT_NONE;
}

int vsdp_rules_match_sa(const struct vsdp_rules *r, int role, const char *prog,
			const struct sockaddr *sa, socklen_t len, int *idx)
{
	if (idx != NULL)
		*idx = -1;
	if (sa == NULL)
		return VSDP_ACT_NONE;
	if (sa->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
		const struct sockaddr_in *in = (const struct sockaddr_in *)sa;

		return vsdp_rules_match(r, role, prog, 4, (const uint8_t *)&in->sin_addr,
					ntohs(in->sin_port), idx);
	}
	if (sa->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
		const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
		const uint8_t *a = in6->sin6_addr.s6_addr;

		if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr))
			return vsdp_rules_match(r, role, prog, 4, a + 12, ntohs(in6->sin6_port), idx);
		return vsdp_rules_match(r, role, prog, 6, a, ntohs(in6->sin6_port), idx);
	}
	return VSDP_ACT_NONE;
}

const char *vsdp_action_name(int action)
{
	switch (action) {
	case VSDP_ACT_SDP: return "sdp";
	case VSDP_ACT_TCP: return "tcp";
	case VSDP_ACT_BOTH: return "both";
	}
	return "none";
}

int vsdp_rule_format(const struct vsdp_rule *x, char *buf, size_t cap)
{
	char a[INET6_ADDRSTRLEN + 8], p[16];

	switch (x->family) {
	case 4:
		inet_ntop(AF_INET, x->addr, a, sizeof(a));
		snprintf(a + strlen(a), sizeof(a) - strlen(a), "/%u", x->prefix);
		break;
	case 6:
		a[0] = '[';
		inet_ntop(AF_INET6, x->addr, a + 1, sizeof(a) - 1);
		snprintf(a + strlen(a), sizeof(a) - strlen(a), "]/%u", x->prefix);
		break;
	default:
		strcpy(a, "*");
	}
	if (x->port_lo == 0 && x->port_hi == 65535)
		strcpy(p, "*");
	else if (x->port_lo == x->port_hi)
		snprintf(p, sizeof(p), "%u", x->port_lo);
	else
		snprintf(p, sizeof(p), "%u-%u", x->port_lo, x->port_hi);
	return snprintf(buf, cap, "use %s %s %s %s:%s", vsdp_action_name(x->action),
			x->role == VSDP_ROLE_SERVER ? "server" : "client", x->prog, a, p);
}
