/*
 * vsdp_ctl.h - the guest control protocol, frame layouts and codec.
 *
 * This header mirrors guestdrv/ctl (Go) byte for byte; docs/control-protocol.md
 * says what the messages mean. A frame is an 8-byte header
 *     {u8 version (1), u8 type, le16 body length, le32 id}
 * and a body whose size is fixed per type. All integers are little-endian.
 * An address is 20 bytes:
 *     {u8 family (0 none, 2 AF_INET, 10 AF_INET6), u8 zero, le16 port,
 *      16 bytes of address in network order, IPv4 in the first four}.
 *
 * The codec is pure (no allocation, no state, no libc beyond memset/memcpy)
 * so it can be used from any context. vsdp_ctl_decode checks the version, the
 * type, the exact body size and every address byte, and never reads past its
 * input; a malformed frame ends the control connection.
 */
#ifndef VSDP_CTL_H
#define VSDP_CTL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define VSDP_CTL_VERSION 1
#define VSDP_CTL_HDR_SIZE 8
#define VSDP_CTL_MAX_BODY 240
#define VSDP_CTL_DEFAULT_PORT 1022
#define VSDP_CTL_ADDR_SIZE 20
#define VSDP_CTL_MAX_FRAME (VSDP_CTL_HDR_SIZE + VSDP_CTL_MAX_BODY)

/* Message types: guest-to-host have the high bit clear. */
enum vsdp_ctl_type {
	VSDP_CTL_HELLO = 0x01,     /* g->h {u32 pid, u32 version} */
	VSDP_CTL_DIAL = 0x02,      /* g->h id=request {addr dst, u32 flags} */
	VSDP_CTL_LISTEN = 0x03,    /* g->h id=request {addr bind, u32 backlog, u32 port} */
	VSDP_CTL_UNLISTEN = 0x04,  /* g->h {u32 port} */
	VSDP_CTL_WHO = 0x05,       /* g->h id=request {u32 guest port, u32 host port} */
	VSDP_CTL_ABORT = 0x06,     /* g->h {u32 guest port, u32 host port} */
	VSDP_CTL_SETOPT = 0x07,    /* g->h {u32 gport, u32 hport, i32 level, i32 name, i32 value} */
	VSDP_CTL_HELLO_OK = 0x81,  /* h->g {u32 version, u32 guest cid} */
	VSDP_CTL_TICKET = 0x82,    /* h->g id=request {u32 port, u32 timeout ms} */
	VSDP_CTL_LOCAL = 0x83,     /* h->g id=request {} */
	VSDP_CTL_DENY = 0x84,      /* h->g id=request {i32 errno} */
	VSDP_CTL_RESULT = 0x85,    /* h->g id=ticket port {i32 errno, addr local, addr remote} */
	VSDP_CTL_LISTEN_OK = 0x86, /* h->g id=request {addr bound} */
	VSDP_CTL_PEER = 0x87,      /* h->g id=host port {u32 port, addr remote, addr local} */
	VSDP_CTL_WHO_OK = 0x88,    /* h->g id=request {addr local, addr remote} */
	VSDP_CTL_RESET = 0x89,     /* h->g {u32 guest port, u32 host port, i32 errno} */
};

/* DIAL flags. */
#define VSDP_CTL_DIAL_NODELAY 0x1u
#define VSDP_CTL_DIAL_KEEPALIVE 0x2u

/* Address families on the wire (Linux values). */
#define VSDP_CTL_FAMILY_INET 2
#define VSDP_CTL_FAMILY_INET6 10

/* An address as carried by a frame; port in host byte order here. */
struct vsdp_ctl_addr {
	uint8_t family; /* 0, VSDP_CTL_FAMILY_INET or VSDP_CTL_FAMILY_INET6 */
	uint16_t port;
	uint8_t addr[16]; /* network order; IPv4 in addr[0..3], rest zero */
};

/* One message; fields are used per type as on the type constants (the same
 * names as guestdrv/ctl.Msg), unused fields are zero. */
struct vsdp_ctl_msg {
	uint8_t type;
	uint32_t id;
	uint32_t pid, ver, cid, flags;
	uint32_t port, timeout, backlog;
	uint32_t guest_port, host_port;
	int32_t err, level, name, value;
	struct vsdp_ctl_addr local, remote;
};

/* Body fields, in the order guestdrv/ctl's layout table lists them. */
enum vsdp_ctl_field {
	VSDP_F_END = 0,
	VSDP_F_PID, VSDP_F_VER, VSDP_F_CID, VSDP_F_FLAGS, VSDP_F_PORT,
	VSDP_F_TIMEOUT, VSDP_F_BACKLOG, VSDP_F_GUEST_PORT, VSDP_F_HOST_PORT,
	VSDP_F_ERRNO, VSDP_F_LEVEL, VSDP_F_NAME, VSDP_F_VALUE,
	VSDP_F_LOCAL, VSDP_F_REMOTE,
};

/* vsdp_ctl_layout returns the field list of a type (terminated by
 * VSDP_F_END), or NULL for an unknown type. */
static inline const uint8_t *vsdp_ctl_layout(uint8_t type)
{
	static const uint8_t hello[] = {VSDP_F_PID, VSDP_F_VER, 0};
	static const uint8_t dial[] = {VSDP_F_REMOTE, VSDP_F_FLAGS, 0};
	static const uint8_t listen[] = {VSDP_F_LOCAL, VSDP_F_BACKLOG, VSDP_F_PORT, 0};
	static const uint8_t unlisten[] = {VSDP_F_PORT, 0};
	static const uint8_t ports[] = {VSDP_F_GUEST_PORT, VSDP_F_HOST_PORT, 0};
	static const uint8_t setopt[] = {VSDP_F_GUEST_PORT, VSDP_F_HOST_PORT, VSDP_F_LEVEL,
					 VSDP_F_NAME, VSDP_F_VALUE, 0};
	static const uint8_t hello_ok[] = {VSDP_F_VER, VSDP_F_CID, 0};
	static const uint8_t ticket[] = {VSDP_F_PORT, VSDP_F_TIMEOUT, 0};
	static const uint8_t none[] = {0};
	static const uint8_t deny[] = {VSDP_F_ERRNO, 0};
	static const uint8_t result[] = {VSDP_F_ERRNO, VSDP_F_LOCAL, VSDP_F_REMOTE, 0};
	static const uint8_t listen_ok[] = {VSDP_F_LOCAL, 0};
	static const uint8_t peer[] = {VSDP_F_PORT, VSDP_F_REMOTE, VSDP_F_LOCAL, 0};
	static const uint8_t who_ok[] = {VSDP_F_LOCAL, VSDP_F_REMOTE, 0};
	static const uint8_t reset[] = {VSDP_F_GUEST_PORT, VSDP_F_HOST_PORT, VSDP_F_ERRNO, 0};

	switch (type) {
	case VSDP_CTL_HELLO: return hello;
	case VSDP_CTL_DIAL: return dial;
	case VSDP_CTL_LISTEN: return listen;
	case VSDP_CTL_UNLISTEN: return unlisten;
	case VSDP_CTL_WHO: return ports;
	case VSDP_CTL_ABORT: return ports;
	case VSDP_CTL_SETOPT: return setopt;
	case VSDP_CTL_HELLO_OK: return hello_ok;
	case VSDP_CTL_TICKET: return ticket;
	case VSDP_CTL_LOCAL: return none;
	case VSDP_CTL_DENY: return deny;
	case VSDP_CTL_RESULT: return result;
	case VSDP_CTL_LISTEN_OK: return listen_ok;
	case VSDP_CTL_PEER: return peer;
	case VSDP_CTL_WHO_OK: return who_ok;
	case VSDP_CTL_RESET: return reset;
	}
	return NULL;
}

/* vsdp_ctl_body_size returns the body size of a type, or -1 if unknown. */
static inline int vsdp_ctl_body_size(uint8_t type)
{
	const uint8_t *l = vsdp_ctl_layout(type);
	int n = 0;

	if (l == NULL)
		return -1;
	for (; *l != VSDP_F_END; l++)
		n += (*l == VSDP_F_LOCAL || *l == VSDP_F_REMOTE) ? VSDP_CTL_ADDR_SIZE : 4;
	return n;
}

static inline void vsdp_ctl_put16(uint8_t *b, uint16_t v)
{
	b[0] = (uint8_t)v;
	b[1] = (uint8_t)(v >> 8);
}

static inline void vsdp_ctl_put32(uint8_t *b, uint32_t v)
{
	b[0] = (uint8_t)v;
	b[1] = (uint8_t)(v >> 8);
	b[2] = (uint8_t)(v >> 16);
	b[3] = (uint8_t)(v >> 24);
}

static inline uint16_t vsdp_ctl_get16(const uint8_t *b)
{
	return (uint16_t)(b[0] | (b[1] << 8));
}

static inline uint32_t vsdp_ctl_get32(const uint8_t *b)
{
	return (uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16) |
	       ((uint32_t)b[3] << 24);
}

/* Field accessors: the u32 (or i32) slot of a scalar field. */
static inline uint32_t *vsdp_ctl_u32(struct vsdp_ctl_msg *m, uint8_t f)
{
	switch (f) {
	case VSDP_F_PID: return &m->pid;
	case VSDP_F_VER: return &m->ver;
	case VSDP_F_CID: return &m->cid;
	case VSDP_F_FLAGS: return &m->flags;
	case VSDP_F_PORT: return &m->port;
	case VSDP_F_TIMEOUT: return &m->timeout;
	case VSDP_F_BACKLOG: return &m->backlog;
	case VSDP_F_GUEST_PORT: return &m->guest_port;
	case VSDP_F_HOST_PORT: return &m->host_port;
	}
	return NULL;
}

static inline int32_t *vsdp_ctl_i32(struct vsdp_ctl_msg *m, uint8_t f)
{
	switch (f) {
	case VSDP_F_ERRNO: return &m->err;
	case VSDP_F_LEVEL: return &m->level;
	case VSDP_F_NAME: return &m->name;
	case VSDP_F_VALUE: return &m->value;
	}
	return NULL;
}

/* vsdp_ctl_encode writes m into b (capacity cap). It returns the frame
 * length, or -1 for an unknown type, an invalid address family or too small
 * a buffer. */
static inline int vsdp_ctl_encode(const struct vsdp_ctl_msg *m, uint8_t *b, size_t cap)
{
	struct vsdp_ctl_msg c = *m;
	const uint8_t *l = vsdp_ctl_layout(m->type);
	int body = vsdp_ctl_body_size(m->type);
	uint8_t *p;

	if (l == NULL || cap < (size_t)(VSDP_CTL_HDR_SIZE + body))
		return -1;
	b[0] = VSDP_CTL_VERSION;
	b[1] = m->type;
	vsdp_ctl_put16(b + 2, (uint16_t)body);
	vsdp_ctl_put32(b + 4, m->id);
	p = b + VSDP_CTL_HDR_SIZE;
	for (; *l != VSDP_F_END; l++) {
		if (*l == VSDP_F_LOCAL || *l == VSDP_F_REMOTE) {
			const struct vsdp_ctl_addr *a = *l == VSDP_F_LOCAL ? &m->local : &m->remote;

			memset(p, 0, VSDP_CTL_ADDR_SIZE);
			switch (a->family) {
			case 0:
				break;
			case VSDP_CTL_FAMILY_INET:
				p[0] = a->family;
				vsdp_ctl_put16(p + 2, a->port);
				memcpy(p + 4, a->addr, 4);
				break;
			case VSDP_CTL_FAMILY_INET6:
				p[0] = a->family;
				vsdp_ctl_put16(p + 2, a->port);
				memcpy(p + 4, a->addr, 16);
				break;
			default:
				return -1;
			}
			p += VSDP_CTL_ADDR_SIZE;
		} else if (vsdp_ctl_u32(&c, *l) != NULL) {
			vsdp_ctl_put32(p, *vsdp_ctl_u32(&c, *l));
			p += 4;
		} else {
			vsdp_ctl_put32(p, (uint32_t)*vsdp_ctl_i32(&c, *l));
			p += 4;
		}
	}
	return VSDP_CTL_HDR_SIZE + body;
}

static inline int vsdp_ctl_decode_addr(const uint8_t *b, struct vsdp_ctl_addr *a)
{
	int i;

	memset(a, 0, sizeof(*a));
	if (b[1] != 0)
		return -1;
	switch (b[0]) {
	case 0:
		for (i = 2; i < VSDP_CTL_ADDR_SIZE; i++)
			if (b[i] != 0)
				return -1;
		return 0;
	case VSDP_CTL_FAMILY_INET:
		for (i = 8; i < VSDP_CTL_ADDR_SIZE; i++)
			if (b[i] != 0)
				return -1;
		a->family = b[0];
		a->port = vsdp_ctl_get16(b + 2);
		memcpy(a->addr, b + 4, 4);
		return 0;
	case VSDP_CTL_FAMILY_INET6:
		a->family = b[0];
		a->port = vsdp_ctl_get16(b + 2);
		memcpy(a->addr, b + 4, 16);
		return 0;
	}
	return -1;
}

/* vsdp_ctl_decode decodes one frame from the start of b (n bytes). It
 * returns the frame length, 0 when b holds only part of a frame, or -1 for
 * a malformed frame. */
static inline int vsdp_ctl_decode(const uint8_t *b, size_t n, struct vsdp_ctl_msg *m)
{
	const uint8_t *l, *p;
	int want, body;

	memset(m, 0, sizeof(*m));
	if (n < VSDP_CTL_HDR_SIZE)
		return 0;
	if (b[0] != VSDP_CTL_VERSION)
		return -1;
	m->type = b[1];
	m->id = vsdp_ctl_get32(b + 4);
	body = vsdp_ctl_get16(b + 2);
	want = vsdp_ctl_body_size(m->type);
	if (want < 0 || body != want)
		return -1;
	if (n < (size_t)(VSDP_CTL_HDR_SIZE + body))
		return 0;
	p = b + VSDP_CTL_HDR_SIZE;
	for (l = vsdp_ctl_layout(m->type); *l != VSDP_F_END; l++) {
		if (*l == VSDP_F_LOCAL || *l == VSDP_F_REMOTE) {
			if (vsdp_ctl_decode_addr(p, *l == VSDP_F_LOCAL ? &m->local : &m->remote) < 0)
				return -1;
			p += VSDP_CTL_ADDR_SIZE;
		} else if (vsdp_ctl_u32(m, *l) != NULL) {
			*vsdp_ctl_u32(m, *l) = vsdp_ctl_get32(p);
			p += 4;
		} else {
			*vsdp_ctl_i32(m, *l) = (int32_t)vsdp_ctl_get32(p);
			p += 4;
		}
	}
	return VSDP_CTL_HDR_SIZE + body;
}

#endif /* VSDP_CTL_H */
