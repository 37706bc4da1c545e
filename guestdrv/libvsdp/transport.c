/*
 * transport.c - the sockets that carry device streams.
 *
 * In a guest they are AF_VSOCK stream sockets: the control service at
 * (VSDP_HOST_CID, VSDP_CTL_PORT), a ticket at (host CID, ticket port), a
 * listener on a guest vsock port chosen by the kernel.
 *
 * Two test transports stand in for vsock where the kernel has no vsock
 * loopback (so a host's tests can run the library against a fake host):
 *
 *   VSDP_TEST_UNIX_DIR=/dir   AF_UNIX stream sockets. Control: /dir/ctl;
 *                             host port P: /dir/host-P; a guest listener
 *                             on port Q binds /dir/guest-Q; a guest dialer
 *                             binds /dir/g-N (then unlinks it) so the host
 *                             can tell its port N. Any peer path ending in
 *                             "-<digits>" names a port. AF_UNIX connects
 *                             complete or fail at once (no EINPROGRESS);
 *                             a peer's close reads as EOF/EPIPE, as a vsock
 *                             RST on an established stream does.
 *   VSDP_TEST_TCP_PORT=C      AF_INET stream sockets on 127.0.0.1. Control:
 *                             127.0.0.1:C; host port P: 127.0.0.1:P; a
 *                             guest listener binds 127.0.0.1:0 and its port
 *                             is its TCP port. Connects are asynchronous
 *                             (EINPROGRESS, then SO_ERROR) as on vsock;
 *                             refusal reads as ECONNREFUSED.
 *
 * Both report FIONREAD by peeking, as Linux 6.1 vsock has no SIOCINQ.
 * Everything else in the library is the same for all three.
 */
#include "vsdp.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <linux/vm_sockets.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static int kind = TP_VSOCK;
/* room left for "/guest-4294967295" and the NUL */
static char unix_dir[sizeof(((struct sockaddr_un *)0)->sun_path) - 18];
static uint16_t tcp_ctl_port;

/* scratch for FIONREAD by peeking; only the kernel writes it */
#define PEEK_MAX (1 << 20)
static char peek_buf[PEEK_MAX];

int tp_kind(void)
{
	return kind;
}

int tp_configure(void)
{
	const char *d = secure_getenv("VSDP_TEST_UNIX_DIR");
	const char *p = secure_getenv("VSDP_TEST_TCP_PORT");

	if (d != NULL && *d != 0) {
		if (strlen(d) >= sizeof(unix_dir))
			return -1;
		strcpy(unix_dir, d);
		kind = TP_UNIX;
	} else if (p != NULL && *p != 0) {
		char *end;
		unsigned long v = strtoul(p, &end, 10);

		if (*end != 0 || v == 0 || v > 65535)
			return -1;
		tcp_ctl_port = (uint16_t)v;
		kind = TP_TCP;
	}
	return 0;
}

int tp_socket(void)
{
	int dom = kind == TP_VSOCK ? AF_VSOCK : kind == TP_UNIX ? AF_UNIX : AF_INET;

	return vsdp_real.socket(dom, SOCK_STREAM | SOCK_CLOEXEC, 0);
}

static socklen_t unix_addr(struct sockaddr_un *sun, const char *name, uint32_t port, int with_port)
{
	memset(sun, 0, sizeof(*sun));
	sun->sun_family = AF_UNIX;
	if (with_port)
		snprintf(sun->sun_path, sizeof(sun->sun_path), "%s/%s-%u", unix_dir, name, port);
	else
		snprintf(sun->sun_path, sizeof(sun->sun_path), "%s/%s", unix_dir, name);
	return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(sun->sun_path) + 1);
}

static socklen_t tcp_addr(struct sockaddr_in *in, uint32_t port)
{
	memset(in, 0, sizeof(*in));
	in->sin_family = AF_INET;
	in->sin_port = htons((uint16_t)port);
	in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return sizeof(*in);
}

static socklen_t vsock_addr(struct sockaddr_vm *vm, uint32_t cid, uint32_t port)
{
	memset(vm, 0, sizeof(*vm));
	vm->svm_family = AF_VSOCK;
	vm->svm_cid = cid;
	vm->svm_port = port;
	return sizeof(*vm);
}

static void set_connect_timeout(int fd, int ms)
{
	struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};

	if (kind == TP_VSOCK)
		vsdp_real.setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv, sizeof(tv));
}

int tp_connect_ctl(int fd, int timeout_ms)
{
	union {
		struct sockaddr sa;
		struct sockaddr_un un;
		struct sockaddr_in in;
		struct sockaddr_vm vm;
	} a;
	socklen_t len;

	switch (kind) {
	case TP_UNIX:
		len = unix_addr(&a.un, "ctl", 0, 0);
		break;
	case TP_TCP:
		len = tcp_addr(&a.in, tcp_ctl_port);
		break;
	default:
		len = vsock_addr(&a.vm, vsdp_cfg.host_cid, vsdp_cfg.ctl_port);
		set_connect_timeout(fd, timeout_ms);
	}
	for (;;) {
		int r = vsdp_real.connect(fd, &a.sa, len);

		if (r == 0 || errno != EINTR)
			return r;
	}
}

static uint32_t random_port(void)
{
	uint32_t v = 0;

	if (getrandom(&v, sizeof(v), GRND_NONBLOCK) != sizeof(v)) {
		struct timespec ts;

		clock_gettime(CLOCK_MONOTONIC, &ts);
		v = (uint32_t)ts.tv_nsec ^ ((uint32_t)getpid() << 12);
	}
	return 0x10000000u | (v & 0x6fffffffu);
}

/* bind_unix_random binds fd to the unix test transport's address
 * name.PORT for a random free port (16 tries). */
static int bind_unix_random(int fd, const char *name)
{
	struct sockaddr_un sun;
	int i;

	for (i = 0; i < 16; i++) {
		socklen_t len = unix_addr(&sun, name, random_port(), 1);

		if (vsdp_real.bind(fd, (struct sockaddr *)&sun, len) == 0)
			return 0;
		if (errno != EADDRINUSE)
			return -1;
	}
	return -1;
}

int tp_prepare_dial(int fd, uint32_t timeout_ms)
{
	if (kind == TP_VSOCK) {
		/* The host answers the REQUEST when its fabric dial ends (by its
		 * deadline, timeout_ms): wait for it, with a margin. */
		uint64_t ms = (uint64_t)timeout_ms + timeout_ms / 4 + 1000;

		set_connect_timeout(fd, ms > 600000 ? 600000 : (int)ms);
		return 0;
	}
	if (kind == TP_UNIX)
		return bind_unix_random(fd, "g");
	return 0;
}

int tp_connect(int fd, uint32_t port)
{
	union {
		struct sockaddr sa;
		struct sockaddr_un un;
		struct sockaddr_in in;
		struct sockaddr_vm vm;
	} a;
	socklen_t len;
	int r, e;

	switch (kind) {
	case TP_UNIX:
		len = unix_addr(&a.un, "host", port, 1);
		break;
	case TP_TCP:
		if (port == 0 || port > 65535) {
			errno = ECONNREFUSED;
			return -1;
		}
		len = tcp_addr(&a.in, port);
		break;
	default:
		len = vsock_addr(&a.vm, vsdp_cfg.host_cid, port);
	}
	r = vsdp_real.connect(fd, &a.sa, len);
	e = errno;
	if (kind == TP_UNIX) {
		/* The bound name has served its purpose (the host read it). */
		struct sockaddr_un me;
		socklen_t ml = sizeof(me);

		if (vsdp_real.getsockname(fd, (struct sockaddr *)&me, &ml) == 0 &&
		    me.sun_family == AF_UNIX && me.sun_path[0] != 0)
			unlink(me.sun_path);
	}
	errno = e;
	return r;
}

int tp_bind_listen(int fd)
{
	if (kind == TP_UNIX)
		return bind_unix_random(fd, "guest");
	if (kind == TP_TCP) {
		struct sockaddr_in in;

		tcp_addr(&in, 0);
		return vsdp_real.bind(fd, (struct sockaddr *)&in, sizeof(in));
	}
	struct sockaddr_vm vm;

	vsock_addr(&vm, VMADDR_CID_ANY, VMADDR_PORT_ANY);
	return vsdp_real.bind(fd, (struct sockaddr *)&vm, sizeof(vm));
}

static int parse_port_suffix(const char *path, uint32_t *port)
{
	const char *dash = strrchr(path, '-');
	uint64_t v = 0;
	const char *p;

	if (dash == NULL || dash[1] == 0 || strchr(dash, '/') != NULL)
		return -1;
	for (p = dash + 1; *p; p++) {
		if (*p < '0' || *p > '9' || p - dash > 10)
			return -1;
		v = v * 10 + (uint64_t)(*p - '0');
	}
	if (v > 0xffffffffu)
		return -1;
	*port = (uint32_t)v;
	return 0;
}

int tp_port_of(const struct sockaddr *sa, socklen_t len, uint32_t *port)
{
	switch (kind) {
	case TP_UNIX: {
		const struct sockaddr_un *un = (const struct sockaddr_un *)sa;
		char path[sizeof(un->sun_path) + 1];
		size_t n;

		if (sa->sa_family != AF_UNIX || len <= offsetof(struct sockaddr_un, sun_path))
			return -1;
		n = len - offsetof(struct sockaddr_un, sun_path);
		if (n > sizeof(un->sun_path))
			n = sizeof(un->sun_path);
		memcpy(path, un->sun_path, n);
		path[n] = 0;
		if (strncmp(path, unix_dir, strlen(unix_dir)) != 0 || path[strlen(unix_dir)] != '/')
			return -1;
		return parse_port_suffix(path + strlen(unix_dir), port);
	}
	case TP_TCP: {
		const struct sockaddr_in *in = (const struct sockaddr_in *)sa;

		if (sa->sa_family != AF_INET || len < sizeof(*in) ||
		    in->sin_addr.s_addr != htonl(INADDR_LOOPBACK))
			return -1;
		*port = ntohs(in->sin_port);
		return 0;
	}
	default: {
		const struct sockaddr_vm *vm = (const struct sockaddr_vm *)sa;

		if (sa->sa_family != AF_VSOCK || len < sizeof(*vm))
			return -1;
		*port = vm->svm_port;
		return 0;
	}
	}
}

int tp_local_port(int fd, uint32_t *port)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);

	if (vsdp_real.getsockname(fd, (struct sockaddr *)&ss, &len) < 0)
		return -1;
	return tp_port_of((struct sockaddr *)&ss, len, port);
}

int tp_peer_port(int fd, uint32_t *port)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);

	if (vsdp_real.getpeername(fd, (struct sockaddr *)&ss, &len) < 0)
		return -1;
	return tp_port_of((struct sockaddr *)&ss, len, port);
}

/* tp_host_stream reports whether fd is a connected transport stream whose
 * peer is the host, and its two ports. */
int tp_host_stream(int fd, uint32_t *gport, uint32_t *hport)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);

	if (vsdp_real.getpeername(fd, (struct sockaddr *)&ss, &len) < 0)
		return 0;
	if (kind == TP_VSOCK) {
		const struct sockaddr_vm *vm = (const struct sockaddr_vm *)&ss;

		if (ss.ss_family != AF_VSOCK || vm->svm_cid != vsdp_cfg.host_cid)
			return 0;
	}
	if (tp_port_of((struct sockaddr *)&ss, len, hport) < 0)
		return 0;
	return tp_local_port(fd, gport) == 0;
}

int tp_inq(int fd, int *n)
{
	ssize_t r;
	int want = PEEK_MAX;

	if (kind == TP_VSOCK) {
		uint64_t bs = 0;
		socklen_t bl = sizeof(bs);

		if (vsdp_real.ioctl(fd, SIOCINQ, n) == 0)
			return 0;
		if (errno != ENOTTY && errno != EINVAL && errno != EOPNOTSUPP)
			return -1;
		if (vsdp_real.getsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_BUFFER_SIZE, &bs, &bl) == 0 &&
		    bs > 0 && bs < (uint64_t)want)
			want = (int)bs;
	}
	VSDP_COUNT(inq_emulated);
	r = vsdp_real.recv(fd, peek_buf, (size_t)want, MSG_PEEK | MSG_DONTWAIT);
	if (r < 0) {
		if (errno == EAGAIN || errno == EWOULDBLOCK) {
			*n = 0;
			return 0;
		}
		return -1;
	}
	*n = (int)r;
	return 0;
}

int tp_is_refusal(int err)
{
	/* vsock: the host's RST. AF_UNIX: nobody listens (ENOENT: no such
	 * name; ECONNREFUSED: a name without a listener). TCP: RST. */
	return err == ECONNRESET || err == ECONNREFUSED || err == ENOENT || err == EPROTO;
}
