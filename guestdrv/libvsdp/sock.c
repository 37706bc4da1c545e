/*
 * sock.c - socket, connect, bind, listen, accept, names, options, ioctl.
 *
 * connect() asks the host (DIAL) and then either connects the program's own
 * TCP socket (LOCAL, or a tcp rule), fails (DENY), or replaces the socket by
 * a device socket (dup3, keeping O_NONBLOCK and FD_CLOEXEC) and connects
 * that to the ticket's port. bind() on an offloaded server only records the
 * address; listen() registers it with the host (LISTEN) and replaces the
 * socket by a device listener. accept() pairs each connection with the
 * host's PEER note. Addresses are reported in the program's family.
 */
#include "vsdp.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define WAIT_NOTE_MS 1000

static inline void need(void)
{
	if (__builtin_expect(atomic_load_explicit(&vsdp_state, memory_order_acquire) == 0, 0))
		vsdp_init();
}

static int valid_errno(int32_t e, int fallback)
{
	return e > 0 && e < 4096 ? (int)e : fallback;
}

/* ---- addresses ---- */

int addr_from_sockaddr(const struct sockaddr *sa, socklen_t len, struct vsdp_ctl_addr *a)
{
	memset(a, 0, sizeof(*a));
	if (sa->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
		const struct sockaddr_in *in = (const struct sockaddr_in *)sa;

		a->family = VSDP_CTL_FAMILY_INET;
		a->port = ntohs(in->sin_port);
		memcpy(a->addr, &in->sin_addr, 4);
		return 0;
	}
	if (sa->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
		const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;

		a->port = ntohs(in6->sin6_port);
		if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
			a->family = VSDP_CTL_FAMILY_INET;
			memcpy(a->addr, in6->sin6_addr.s6_addr + 12, 4);
		} else {
			a->family = VSDP_CTL_FAMILY_INET6;
			memcpy(a->addr, in6->sin6_addr.s6_addr, 16);
		}
		return 0;
	}
	return -1;
}

/* fill_sockaddr writes a in the program's family, with accept/getsockname
 * truncation rules: copy what fits, report the full length. */
int fill_sockaddr(int family, const struct vsdp_ctl_addr *a, struct sockaddr *sa, socklen_t *len)
{
	union {
		struct sockaddr_in in;
		struct sockaddr_in6 in6;
	} u;
	socklen_t n;

	memset(&u, 0, sizeof(u));
	if (family == AF_INET6) {
		u.in6.sin6_family = AF_INET6;
		u.in6.sin6_port = htons(a->port);
		if (a->family == VSDP_CTL_FAMILY_INET) {
			u.in6.sin6_addr.s6_addr[10] = 0xff;
			u.in6.sin6_addr.s6_addr[11] = 0xff;
			memcpy(u.in6.sin6_addr.s6_addr + 12, a->addr, 4);
		} else if (a->family == VSDP_CTL_FAMILY_INET6) {
			memcpy(u.in6.sin6_addr.s6_addr, a->addr, 16);
		}
		n = sizeof(u.in6);
	} else {
		u.in.sin_family = AF_INET;
		u.in.sin_port = htons(a->port);
		if (a->family == VSDP_CTL_FAMILY_INET)
			memcpy(&u.in.sin_addr, a->addr, 4);
		else if (a->family == VSDP_CTL_FAMILY_INET6 &&
			 IN6_IS_ADDR_V4MAPPED((const struct in6_addr *)(const void *)a->addr))
			memcpy(&u.in.sin_addr, a->addr + 12, 4);
		n = sizeof(u.in);
	}
	if (sa == NULL || len == NULL) {
		errno = EFAULT;
		return -1;
	}
	if ((int)*len < 0) {
		errno = EINVAL;
		return -1;
	}
	memcpy(sa, &u, *len < n ? *len : n);
	*len = n;
	return 0;
}

static int any_sockaddr(int family, struct sockaddr_storage *ss, socklen_t *len)
{
	memset(ss, 0, sizeof(*ss));
	ss->ss_family = (sa_family_t)family;
	*len = family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
	return 0;
}

static int transport_family(int family, const struct sockaddr *sa)
{
	switch (tp_kind()) {
	case TP_UNIX: return family == AF_UNIX;
	case TP_TCP: return family == AF_INET &&
			    ((const struct sockaddr_in *)sa)->sin_addr.s_addr == htonl(INADDR_LOOPBACK);
	}
	return family == AF_VSOCK;
}

/* ---- small helpers on the table ---- */

static void untrack(int fd)
{
	sigset_t old;

	tab_lock(&old);
	sock_put(tab_detach(fd));
	tab_unlock(&old);
}

static void set_state(int fd, int state)
{
	sigset_t old;
	struct vsock *s;

	tab_lock(&old);
	s = tab_get(fd);
	if (s != NULL)
		s->state = state;
	tab_unlock(&old);
}

void rereg_epoll(int fd)
{
	struct epreg eps[EPREG_MAX];
	int valid[EPREG_MAX];
	int n = 0, i;
	sigset_t old;
	struct vsock *s;

	tab_lock(&old);
	s = tab_get(fd);
	if (s != NULL) {
		n = s->neps;
		memcpy(eps, s->eps, sizeof(eps[0]) * (size_t)n);
		for (i = 0; i < n; i++)
			valid[i] = tab_gen(eps[i].epfd) == eps[i].gen;
	}
	tab_unlock(&old);
	for (i = 0; i < n; i++) {
		struct epoll_event ev = eps[i].ev;

		if (!valid[i])
			continue;
		if (vsdp_real.epoll_ctl(eps[i].epfd, EPOLL_CTL_ADD, fd, &ev) < 0 && errno == EEXIST)
			vsdp_real.epoll_ctl(eps[i].epfd, EPOLL_CTL_MOD, fd, &ev);
		VSDP_COUNT(epoll_rereg);
	}
}

/* swap puts nfd in fd's place: same number, same O_NONBLOCK and FD_CLOEXEC,
 * the receive and send timeouts carried over. nfd is closed. */
static int swap(int fd, int nfd)
{
	int fl = vsdp_real.fcntl(fd, F_GETFL), fdfl = vsdp_real.fcntl(fd, F_GETFD), e;
	struct timeval tv;
	socklen_t tl;

	if (fl < 0 || fdfl < 0) {
		e = errno;
		vsdp_real.close(nfd);
		errno = e;
		return -1;
	}
	tl = sizeof(tv);
	if (vsdp_real.getsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, &tl) == 0 && (tv.tv_sec || tv.tv_usec))
		vsdp_real.setsockopt(nfd, SOL_SOCKET, SO_RCVTIMEO, &tv, tl);
	tl = sizeof(tv);
	if (vsdp_real.getsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, &tl) == 0 && (tv.tv_sec || tv.tv_usec))
		vsdp_real.setsockopt(nfd, SOL_SOCKET, SO_SNDTIMEO, &tv, tl);
	if (fl & O_NONBLOCK)
		vsdp_real.fcntl(nfd, F_SETFL, O_NONBLOCK);
	if (vsdp_real.dup3(nfd, fd, (fdfl & FD_CLOEXEC) ? O_CLOEXEC : 0) < 0) {
		e = errno;
		vsdp_real.close(nfd);
		errno = e;
		return -1;
	}
	vsdp_real.close(nfd);
	VSDP_COUNT(swaps);
	return 0;
}

static void send_setopt(int fd, int level, int name, int value)
{
	struct sock_view v;
	struct vsdp_ctl_msg m = {.type = VSDP_CTL_SETOPT};

	if (view_of(fd, &v) < 0 || v.kind != FD_CONN || v.hport == 0 || v.state == ST_FAILED)
		return;
	m.guest_port = v.gport;
	m.host_port = v.hport;
	m.level = level;
	m.name = name;
	m.value = value;
	if (ctl_send(&m) == 0)
		VSDP_COUNT(setopts);
}

static const struct {
	int name, slot, forward;
} topts[] = {
	{TCP_NODELAY, TOPT_NODELAY, 1},
	{TCP_CORK, TOPT_CORK, 1},
	{TCP_KEEPIDLE, TOPT_KEEPIDLE, 1},
	{TCP_KEEPINTVL, TOPT_KEEPINTVL, 1},
	{TCP_KEEPCNT, TOPT_KEEPCNT, 1},
	{TCP_USER_TIMEOUT, TOPT_USER_TIMEOUT, 1},
	{TCP_MAXSEG, TOPT_MAXSEG, 0},
	{TCP_QUICKACK, TOPT_QUICKACK, 0},
};

static const int topt_default[TOPT_N] = {
	[TOPT_KEEPIDLE] = 7200, [TOPT_KEEPINTVL] = 75, [TOPT_KEEPCNT] = 9,
	[TOPT_MAXSEG] = 1448, [TOPT_QUICKACK] = 1,
};

static int topt_slot(int name)
{
	size_t i;

	for (i = 0; i < sizeof(topts) / sizeof(topts[0]); i++)
		if (topts[i].name == name)
			return (int)i;
	return -1;
}

/* forward_opts sends the TCP options set before connect (other than
 * NODELAY, which DIAL carried) once the stream has its ports. */
static void forward_opts(int fd)
{
	int vals[TOPT_N], set[TOPT_N], i;
	sigset_t old;
	struct vsock *s;

	tab_lock(&old);
	s = tab_get(fd);
	for (i = 0; i < TOPT_N; i++) {
		set[i] = s != NULL && s->topt_set[i];
		vals[i] = s != NULL ? s->topt[i] : 0;
	}
	tab_unlock(&old);
	for (i = 0; i < (int)(sizeof(topts) / sizeof(topts[0])); i++)
		if (topts[i].forward && topts[i].slot != TOPT_NODELAY && set[topts[i].slot])
			send_setopt(fd, IPPROTO_TCP, topts[i].name, vals[topts[i].slot]);
}

/* ---- socket() ---- */

VSDP_EXPORT int socket(int domain, int type, int protocol)
{
	int fd, e;
	sigset_t old;

	need();
	fd = vsdp_real.socket(domain, type, protocol);
	if (fd < 0 || atomic_load(&vsdp_state) != 1)
		return fd;
	e = errno;
	if ((domain == AF_INET || domain == AF_INET6) && (type & 0xf) == SOCK_STREAM &&
	    (protocol == 0 || protocol == IPPROTO_TCP)) {
		tab_lock(&old);
		sock_put(tab_detach(fd));
		struct vsock *s = sock_new(domain);

		sock_identify(s, fd);
		if (s != NULL && tab_set(fd, FD_TCP, s) < 0)
			sock_put(s);
		tab_unlock(&old);
	} else if (domain == AF_VSOCK || tab_kind(fd) != FD_NONE) {
		tab_lock(&old);
		sock_put(tab_detach(fd));
		if (domain == AF_VSOCK)
			tab_set(fd, FD_NATIVE, NULL);
		tab_unlock(&old);
	}
	errno = e;
	return fd;
}

/* ---- connect() ---- */

/* map_connect_error turns the kernel's view of a failed device connect
 * into the host's (RESULT's errno) and marks the stream failed. */
int map_connect_error(int fd, int err)
{
	struct vsdp_ctl_msg m;
	struct sock_view v;
	sigset_t old;
	struct vsock *s;
	int have = 0, rerr = 0, mapped;

	view_of(fd, &v);
	tab_lock(&old);
	s = tab_get(fd);
	if (s != NULL) {
		have = s->have_result;
		rerr = s->result_err;
	}
	tab_unlock(&old);
	if (!have && v.hport != 0) {
		int wait = vsdp_cfg.ctl_timeout_ms < 2000 ? vsdp_cfg.ctl_timeout_ms : 2000;

		if (ctl_take(VSDP_CTL_RESULT, v.hport, 0, &m, wait)) {
			have = 1;
			rerr = m.err;
			tab_lock(&old);
			s = tab_get(fd);
			if (s != NULL && s->hport == v.hport) {
				s->have_result = 1;
				s->result_err = m.err;
				s->local = m.local;
				s->remote = m.remote;
				s->have_addrs = 1;
			}
			tab_unlock(&old);
		}
	}
	if (have && rerr != 0)
		mapped = valid_errno(rerr, ECONNREFUSED);
	else if (err == ETIMEDOUT)
		mapped = ETIMEDOUT;
	else
		mapped = ECONNREFUSED;
	if (mapped != err)
		VSDP_COUNT(result_mapped);
	set_state(fd, ST_FAILED);
	return mapped;
}

static void note_result(int fd, uint32_t hport, int wait_ms)
{
	struct vsdp_ctl_msg m;
	sigset_t old;
	struct vsock *s;

	tab_lock(&old);
	s = tab_get(fd);
	if (s == NULL || s->have_result) {
		tab_unlock(&old);
		return;
	}
	tab_unlock(&old);
	if (!ctl_take(VSDP_CTL_RESULT, hport, 0, &m, wait_ms))
		return;
	tab_lock(&old);
	s = tab_get(fd);
	if (s != NULL && s->hport == hport) {
		s->have_result = 1;
		s->result_err = m.err;
		s->local = m.local;
		s->remote = m.remote;
		s->have_addrs = 1;
	}
	tab_unlock(&old);
}

static void learn_gport(int fd)
{
	uint32_t gp;
	sigset_t old;
	struct vsock *s;

	if (tp_local_port(fd, &gp) < 0)
		return;
	tab_lock(&old);
	s = tab_get(fd);
	if (s != NULL)
		s->gport = gp;
	tab_unlock(&old);
}

/* finish_connect files the outcome of the kernel's connect. */
static int finish_connect(int fd, uint32_t hport, int r, int e)
{
	if (r == 0) {
		set_state(fd, ST_CONNECTED);
		learn_gport(fd);
		note_result(fd, hport, 0);
		forward_opts(fd);
		return 0;
	}
	if (e == EINPROGRESS || e == EALREADY) {
		learn_gport(fd);
		forward_opts(fd);
		errno = e;
		return -1;
	}
	if (e == EISCONN) {
		set_state(fd, ST_CONNECTED);
		errno = e;
		return -1;
	}
	if (tp_is_refusal(e) || e == ETIMEDOUT) {
		errno = map_connect_error(fd, e);
		return -1;
	}
	if (e != EINTR && e != EAGAIN)
		set_state(fd, ST_FAILED);
	errno = e;
	return -1;
}

static int connect_device(int fd, uint32_t port)
{
	int r = tp_connect(fd, port);

	/* A signal must not abandon a device connect half-way (vsock cancels
	 * it; TCP would go on in the background): finish it. */
	while (r < 0 && errno == EINTR) {
		r = tp_connect(fd, port);
		if (r < 0 && errno == EALREADY) {
			struct pollfd p = {.fd = fd, .events = POLLOUT};
			int err = 0;
			socklen_t l = sizeof(err);

			while (poll(&p, 1, -1) < 0 && errno == EINTR)
				;
			vsdp_real.getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l);
			if (err != 0) {
				errno = err;
				return -1;
			}
			return 0;
		}
		if (r < 0 && errno == EISCONN)
			return 0;
	}
	return r;
}

static int dial_ticket(int fd, uint32_t port, uint32_t timeout)
{
	int nfd = tp_socket(), r, e;
	sigset_t old;
	struct vsock *s;

	if (nfd < 0)
		return -1;
	if (tp_prepare_dial(nfd, timeout) < 0 || swap(fd, nfd) < 0) {
		e = errno;
		vsdp_real.close(nfd); /* harmless if swap closed it: EBADF */
		errno = e;
		return -1;
	}
	tab_lock(&old);
	s = tab_get(fd);
	if (s != NULL) {
		s->state = ST_CONNECTING;
		s->hport = port;
		s->gport = 0;
		s->have_result = 0;
		s->result_err = 0;
		s->have_addrs = 0;
		s->reset_err = 0;
		s->reset_rd = s->reset_wr = 0;
		sock_identify(s, fd);
		tab_set(fd, FD_CONN, s);
	}
	tab_unlock(&old);
	rereg_epoll(fd);
	r = connect_device(fd, port);
	e = errno;
	return finish_connect(fd, port, r, e);
}

/* deferred_bind tells whether fd's bind() waits for the rules' verdict
 * and, if it does, copies the address into *bound. */
static int deferred_bind(int fd, struct vsdp_ctl_addr *bound)
{
	int deferred = 0;
	sigset_t old;
	struct vsock *s;

	tab_lock(&old);
	s = tab_get(fd);
	if (s != NULL) {
		deferred = s->bind_deferred;
		*bound = s->bound;
	}
	tab_unlock(&old);
	return deferred;
}

/* bind_real makes a deferred bind to bound on the kernel's socket fd. */
static int bind_real(int fd, int family, const struct vsdp_ctl_addr *bound)
{
	struct sockaddr_storage ss;
	socklen_t bl = sizeof(ss);

	if (fill_sockaddr(family, bound, (struct sockaddr *)&ss, &bl) < 0 ||
	    vsdp_real.bind(fd, (struct sockaddr *)&ss, bl) < 0)
		return -1;
	return 0;
}

/* go_local connects the program's own TCP socket (after putting one back
 * if a device socket took its place) and forgets the descriptor. */
static int go_local(int fd, int family, const struct sockaddr *sa, socklen_t len)
{
	struct vsdp_ctl_addr bound;
	int deferred;

	VSDP_COUNT(locals);
	deferred = deferred_bind(fd, &bound);
	if (tab_kind(fd) == FD_CONN) {
		int nfd = vsdp_real.socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);

		if (nfd < 0 || swap(fd, nfd) < 0)
			return -1;
		rereg_epoll(fd);
	}
	untrack(fd);
	if (deferred && bind_real(fd, family, &bound) < 0)
		return -1;
	return vsdp_real.connect(fd, sa, len);
}

static int sa_fits(int family, const struct sockaddr *sa, socklen_t len)
{
	if (sa == NULL)
		return 0;
	if (family == AF_INET)
		return len >= (socklen_t)sizeof(struct sockaddr_in) && sa->sa_family == AF_INET;
	return len >= (socklen_t)sizeof(struct sockaddr_in6) && sa->sa_family == AF_INET6;
}

VSDP_EXPORT int connect(int fd, const struct sockaddr *sa, socklen_t len)
{
	struct vsdp_ctl_msg req = {.type = VSDP_CTL_DIAL}, rep;
	struct sock_view v;
	sigset_t old;
	struct vsock *s;
	int k, action, r;

	need();
	k = tab_kind(fd);
	if (k != FD_TCP && k != FD_CONN)
		return vsdp_real.connect(fd, sa, len);
	if (view_of(fd, &v) < 0)
		return vsdp_real.connect(fd, sa, len);
	if (k == FD_CONN && v.state == ST_CONNECTED)
		return vsdp_real.connect(fd, sa, len); /* EISCONN from the kernel */
	if (k == FD_CONN && v.state == ST_CONNECTING) {
		int have = 0, rerr = 0;

		note_result(fd, v.hport, 0);
		tab_lock(&old);
		s = tab_get(fd);
		if (s != NULL) {
			have = s->have_result;
			rerr = s->result_err;
		}
		tab_unlock(&old);
		if (have && rerr != 0) {
			set_state(fd, ST_FAILED);
			VSDP_COUNT(result_mapped);
			errno = valid_errno(rerr, ECONNREFUSED);
			return -1;
		}
		r = tp_connect(fd, v.hport);
		return finish_connect(fd, v.hport, r, errno);
	}
	if (!sa_fits(v.family, sa, len)) {
		if (k == FD_TCP)
			return vsdp_real.connect(fd, sa, len);
		errno = sa == NULL ? EFAULT : EAFNOSUPPORT;
		return -1;
	}
	action = vsdp_decide(VSDP_ROLE_CLIENT, sa, len);
	if (action == VSDP_ACT_TCP)
		return go_local(fd, v.family, sa, len);
	addr_from_sockaddr(sa, len, &req.remote);
	tab_lock(&old);
	s = tab_get(fd);
	if (s != NULL) {
		req.flags = s->dial_flags;
		s->action = action;
	}
	tab_unlock(&old);
	VSDP_COUNT(dials);
	r = ctl_request(&req, &rep);
	if (r < 0) {
		vsdp_log(1, "no device (%s): %s", strerror(-r),
			 action == VSDP_ACT_BOTH ? "using the guest's TCP" : "failing");
		if (action == VSDP_ACT_BOTH)
			return go_local(fd, v.family, sa, len);
		errno = ENETUNREACH;
		return -1;
	}
	switch (rep.type) {
	case VSDP_CTL_LOCAL:
		return go_local(fd, v.family, sa, len);
	case VSDP_CTL_DENY:
		VSDP_COUNT(denies);
		errno = valid_errno(rep.err, EACCES);
		return -1;
	case VSDP_CTL_TICKET:
		VSDP_COUNT(tickets);
		return dial_ticket(fd, rep.port, rep.timeout);
	}
	VSDP_COUNT(protocol_errors);
	errno = ENETUNREACH;
	return -1;
}

/* ---- bind(), listen(), accept() ---- */

VSDP_EXPORT int bind(int fd, const struct sockaddr *sa, socklen_t len)
{
	struct sock_view v;
	sigset_t old;
	struct vsock *s;
	int action, busy = 0;

	need();
	if (tab_kind(fd) != FD_TCP || view_of(fd, &v) < 0 || !sa_fits(v.family, sa, len))
		return vsdp_real.bind(fd, sa, len);
	action = vsdp_decide(VSDP_ROLE_SERVER, sa, len);
	if (action == VSDP_ACT_TCP) {
		untrack(fd);
		return vsdp_real.bind(fd, sa, len);
	}
	tab_lock(&old);
	s = tab_get(fd);
	if (s != NULL) {
		busy = s->bind_deferred;
		if (!busy) {
			addr_from_sockaddr(sa, len, &s->bound);
			s->bind_deferred = 1;
			s->action = action;
		}
	}
	tab_unlock(&old);
	if (busy) {
		errno = EINVAL; /* already bound, as the kernel says */
		return -1;
	}
	return 0;
}

static int listen_local(int fd, int family, int backlog)
{
	struct vsdp_ctl_addr bound;
	int deferred;

	VSDP_COUNT(locals);
	deferred = deferred_bind(fd, &bound);
	untrack(fd);
	if (deferred && bind_real(fd, family, &bound) < 0)
		return -1;
	return vsdp_real.listen(fd, backlog);
}

VSDP_EXPORT int listen(int fd, int backlog)
{
	struct vsdp_ctl_msg req = {.type = VSDP_CTL_LISTEN}, rep;
	struct sock_view v;
	struct vsdp_ctl_addr bound;
	sigset_t old;
	struct vsock *s;
	int deferred = 0, action = VSDP_ACT_BOTH, nfd, r, e;
	uint32_t q;

	need();
	if (tab_kind(fd) != FD_TCP || view_of(fd, &v) < 0)
		return vsdp_real.listen(fd, backlog);
	tab_lock(&old);
	s = tab_get(fd);
	if (s != NULL) {
		deferred = s->bind_deferred;
		bound = s->bound;
		action = s->action;
	}
	tab_unlock(&old);
	if (!deferred) {
		struct sockaddr_storage any;
		socklen_t al;

		any_sockaddr(v.family, &any, &al);
		action = vsdp_decide(VSDP_ROLE_SERVER, (struct sockaddr *)&any, al);
		if (action == VSDP_ACT_TCP) {
			untrack(fd);
			return vsdp_real.listen(fd, backlog);
		}
		addr_from_sockaddr((struct sockaddr *)&any, al, &bound);
	}
	nfd = tp_socket();
	if (nfd < 0)
		return -1;
	if (tp_bind_listen(nfd) < 0 || vsdp_real.listen(nfd, backlog) < 0 ||
	    tp_local_port(nfd, &q) < 0) {
		e = errno;
		vsdp_real.close(nfd);
		errno = e;
		return -1;
	}
	req.local = bound;
	req.backlog = backlog < 0 ? 0 : (uint32_t)backlog;
	req.port = q;
	r = ctl_request(&req, &rep);
	if (r < 0 || rep.type == VSDP_CTL_LOCAL) {
		vsdp_real.close(nfd);
		if (rep.type == VSDP_CTL_LOCAL || action == VSDP_ACT_BOTH)
			return listen_local(fd, v.family, backlog);
		errno = EADDRNOTAVAIL;
		return -1;
	}
	if (rep.type == VSDP_CTL_DENY) {
		vsdp_real.close(nfd);
		VSDP_COUNT(denies);
		errno = valid_errno(rep.err, EACCES);
		return -1;
	}
	if (rep.type != VSDP_CTL_LISTEN_OK) {
		vsdp_real.close(nfd);
		VSDP_COUNT(protocol_errors);
		errno = EADDRNOTAVAIL;
		return -1;
	}
	if (swap(fd, nfd) < 0) {
		/* The host exported a port we cannot serve: withdraw it. */
		struct vsdp_ctl_msg un = {.type = VSDP_CTL_UNLISTEN, .port = q};

		e = errno;
		ctl_send(&un);
		errno = e;
		return -1;
	}
	tab_lock(&old);
	s = tab_get(fd);
	if (s != NULL) {
		s->state = ST_LISTENING;
		s->gport = q;
		s->bound = rep.local.family != 0 ? rep.local : bound;
		s->owner = getpid();
		sock_identify(s, fd);
		tab_set(fd, FD_LISTEN, s);
	}
	tab_unlock(&old);
	VSDP_COUNT(listens);
	rereg_epoll(fd);
	return 0;
}

static int who(uint32_t gport, uint32_t hport, struct vsdp_ctl_msg *rep)
{
	struct vsdp_ctl_msg req = {.type = VSDP_CTL_WHO};

	req.guest_port = gport;
	req.host_port = hport;
	return ctl_request(&req, rep) == 0 && rep->type == VSDP_CTL_WHO_OK;
}

static int do_accept(int fd, struct sockaddr *addr, socklen_t *alen, int flags)
{
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	struct sock_view v;
	struct vsdp_ctl_msg m;
	uint32_t hp = 0;
	int nfd, found, e;
	sigset_t old;
	struct vsock *s;

	if (view_of(fd, &v) < 0 || v.kind != FD_LISTEN)
		return vsdp_real.accept4(fd, addr, alen, flags);
	nfd = vsdp_real.accept4(fd, (struct sockaddr *)&ss, &sl, flags);
	if (nfd < 0)
		return nfd;
	e = errno;
	if (tp_port_of((struct sockaddr *)&ss, sl, &hp) < 0)
		hp = 0;
	found = ctl_take(VSDP_CTL_PEER, hp, v.gport, &m, WAIT_NOTE_MS);
	if (!found) {
		VSDP_COUNT(peers_missing);
		found = who(v.gport, hp, &m);
	}
	tab_lock(&old);
	sock_put(tab_detach(nfd));
	s = sock_new(v.family ? v.family : AF_INET);
	if (s != NULL) {
		s->state = ST_CONNECTED;
		s->hport = hp;
		s->gport = v.gport;
		s->have_result = 1;
		if (found) {
			s->local = m.local;
			s->remote = m.remote;
			s->have_addrs = 1;
		}
		sock_identify(s, nfd);
		if (tab_set(nfd, FD_CONN, s) < 0)
			sock_put(s);
	}
	tab_unlock(&old);
	VSDP_COUNT(accepts);
	if (addr != NULL && alen != NULL) {
		struct vsdp_ctl_addr none = {0};

		fill_sockaddr(v.family ? v.family : AF_INET, found ? &m.remote : &none, addr, alen);
	}
	errno = e;
	return nfd;
}

/* forget_stale drops a record left at a number the kernel just handed out
 * again (its socket was closed behind the library's back). */
static int forget_stale(int nfd)
{
	if (nfd >= 0 && tab_kind(nfd) != FD_NONE) {
		int e = errno;
		sigset_t old;

		tab_lock(&old);
		sock_put(tab_detach(nfd));
		tab_unlock(&old);
		errno = e;
	}
	return nfd;
}

VSDP_EXPORT int accept(int fd, struct sockaddr *addr, socklen_t *alen)
{
	need();
	if (tab_kind(fd) != FD_LISTEN)
		return forget_stale(vsdp_real.accept(fd, addr, alen));
	return do_accept(fd, addr, alen, 0);
}

VSDP_EXPORT int accept4(int fd, struct sockaddr *addr, socklen_t *alen, int flags)
{
	need();
	if (tab_kind(fd) != FD_LISTEN)
		return forget_stale(vsdp_real.accept4(fd, addr, alen, flags));
	return do_accept(fd, addr, alen, flags);
}

/* ---- names ---- */

/* adopt recognises a device stream this process did not make (inherited
 * across exec, inetd-style) by asking the host who it is. */
static int adopt(int fd)
{
	struct vsdp_ctl_msg rep;
	uint32_t gp, hp;
	sigset_t old;
	struct vsock *s;
	int k = tab_kind(fd);

	if (k != FD_NONE)
		return k == FD_CONN;
	if (!tp_host_stream(fd, &gp, &hp) || !who(gp, hp, &rep)) {
		tab_lock(&old);
		if (tab_kind(fd) == FD_NONE)
			tab_set(fd, FD_FOREIGN, NULL);
		tab_unlock(&old);
		return 0;
	}
	tab_lock(&old);
	if (tab_kind(fd) == FD_NONE) {
		int fam = rep.remote.family == VSDP_CTL_FAMILY_INET6 ? AF_INET6 : AF_INET;

		s = sock_new(fam);
		if (s != NULL) {
			s->state = ST_CONNECTED;
			s->adopted = 1;
			s->gport = gp;
			s->hport = hp;
			s->have_result = 1;
			s->have_addrs = 1;
			s->local = rep.local;
			s->remote = rep.remote;
			sock_identify(s, fd);
			if (tab_set(fd, FD_CONN, s) < 0)
				sock_put(s);
			else
				VSDP_COUNT(adopted);
		}
	}
	tab_unlock(&old);
	return tab_kind(fd) == FD_CONN;
}

/* refresh notices a finished non-blocking connect. */
static void refresh(int fd, struct sock_view *v)
{
	struct sockaddr_storage ss;
	socklen_t l = sizeof(ss);

	if (v->state != ST_CONNECTING)
		return;
	if (vsdp_real.getpeername(fd, (struct sockaddr *)&ss, &l) == 0) {
		set_state(fd, ST_CONNECTED);
		v->state = ST_CONNECTED;
	}
}

/* addrs copies the stream's addresses, fetching them if needed. */
static int addrs(int fd, struct sock_view *v, struct vsdp_ctl_addr *local,
		 struct vsdp_ctl_addr *remote)
{
	sigset_t old;
	struct vsock *s;
	int have = 0;

	tab_lock(&old);
	s = tab_get(fd);
	if (s != NULL && s->have_addrs) {
		*local = s->local;
		*remote = s->remote;
		have = 1;
	}
	tab_unlock(&old);
	if (have || v->kind != FD_CONN || v->state == ST_FAILED)
		return have;
	note_result(fd, v->hport, v->state == ST_CONNECTED ? WAIT_NOTE_MS : 0);
	tab_lock(&old);
	s = tab_get(fd);
	if (s != NULL && s->have_addrs) {
		*local = s->local;
		*remote = s->remote;
		have = 1;
	}
	tab_unlock(&old);
	if (!have && v->state == ST_CONNECTED) {
		struct vsdp_ctl_msg rep;

		if (who(v->gport, v->hport, &rep)) {
			tab_lock(&old);
			s = tab_get(fd);
			if (s != NULL) {
				s->local = rep.local;
				s->remote = rep.remote;
				s->have_addrs = 1;
			}
			tab_unlock(&old);
			*local = rep.local;
			*remote = rep.remote;
			have = 1;
		}
	}
	return have;
}

static int name_of(int fd, struct sockaddr *sa, socklen_t *len, int peer)
{
	struct sock_view v;
	struct vsdp_ctl_addr local, remote, none = {0};
	int k = tab_kind(fd), r;

	if (k == FD_NONE) {
		struct sockaddr_storage ss;
		socklen_t sl = sizeof(ss);

		r = peer ? vsdp_real.getpeername(fd, sa, len) : vsdp_real.getsockname(fd, sa, len);
		if (r < 0 || vsdp_real.getsockname(fd, (struct sockaddr *)&ss, &sl) < 0 ||
		    !transport_family(ss.ss_family, (struct sockaddr *)&ss))
			return r;
		if (!adopt(fd)) {
			/* not a device stream: the kernel's answer stands */
			return peer ? vsdp_real.getpeername(fd, sa, len)
				    : vsdp_real.getsockname(fd, sa, len);
		}
		k = FD_CONN;
	}
	if (k == FD_NATIVE || k == FD_FOREIGN || view_of(fd, &v) < 0)
		return peer ? vsdp_real.getpeername(fd, sa, len) : vsdp_real.getsockname(fd, sa, len);
	switch (k) {
	case FD_TCP: {
		sigset_t old;
		struct vsock *s;
		int deferred = 0;

		if (peer)
			return vsdp_real.getpeername(fd, sa, len);
		tab_lock(&old);
		s = tab_get(fd);
		if (s != NULL && s->bind_deferred) {
			deferred = 1;
			local = s->bound;
		}
		tab_unlock(&old);
		if (!deferred)
			return vsdp_real.getsockname(fd, sa, len);
		return fill_sockaddr(v.family, &local, sa, len);
	}
	case FD_LISTEN: {
		sigset_t old;
		struct vsock *s;

		if (peer) {
			errno = ENOTCONN;
			return -1;
		}
		tab_lock(&old);
		s = tab_get(fd);
		local = s != NULL ? s->bound : none;
		tab_unlock(&old);
		return fill_sockaddr(v.family, &local, sa, len);
	}
	}
	refresh(fd, &v);
	if (peer && v.state != ST_CONNECTED) {
		errno = ENOTCONN;
		return -1;
	}
	if (!addrs(fd, &v, &local, &remote))
		local = remote = none;
	return fill_sockaddr(v.family, peer ? &remote : &local, sa, len);
}

VSDP_EXPORT int getsockname(int fd, struct sockaddr *sa, socklen_t *len)
{
	need();
	if (atomic_load(&vsdp_state) != 1)
		return vsdp_real.getsockname(fd, sa, len);
	return name_of(fd, sa, len, 0);
}

VSDP_EXPORT int getpeername(int fd, struct sockaddr *sa, socklen_t *len)
{
	need();
	if (atomic_load(&vsdp_state) != 1)
		return vsdp_real.getpeername(fd, sa, len);
	return name_of(fd, sa, len, 1);
}

/* ---- options ---- */

static int put_int(void *val, socklen_t *len, int v)
{
	if (val == NULL || len == NULL) {
		errno = EFAULT;
		return -1;
	}
	if ((int)*len < 0) {
		errno = EINVAL;
		return -1;
	}
	if (*len >= sizeof(int)) {
		memcpy(val, &v, sizeof(int));
		*len = sizeof(int);
	} else if (*len > 0) {
		*(unsigned char *)val = (unsigned char)v;
		*len = 1;
	}
	return 0;
}

static int tcp_getopt(int fd, struct sock_view *v, int name, void *val, socklen_t *len)
{
	int slot = topt_slot(name), out = 0;
	sigset_t old;
	struct vsock *s;

	if (name == TCP_INFO) {
		struct tcp_info ti;

		if (val == NULL || len == NULL) {
			errno = EFAULT;
			return -1;
		}
		memset(&ti, 0, sizeof(ti));
		ti.tcpi_state = v->kind == FD_LISTEN ? 10 /* TCP_LISTEN */
			       : v->state == ST_CONNECTED ? 1 /* TCP_ESTABLISHED */ : 2 /* SYN_SENT */;
		if ((int)*len < 0) {
			errno = EINVAL;
			return -1;
		}
		memcpy(val, &ti, *len < sizeof(ti) ? *len : sizeof(ti));
		*len = *len < sizeof(ti) ? *len : sizeof(ti);
		return 0;
	}
	if (slot < 0) {
		errno = ENOPROTOOPT;
		return -1;
	}
	slot = topts[slot].slot;
	tab_lock(&old);
	s = tab_get(fd);
	out = s != NULL && s->topt_set[slot] ? s->topt[slot] : topt_default[slot];
	tab_unlock(&old);
	return put_int(val, len, out);
}

VSDP_EXPORT int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
{
	struct sock_view v;
	int k, r;

	need();
	k = tab_kind(fd);
	if (k == FD_NONE && level == IPPROTO_TCP && atomic_load(&vsdp_state) == 1) {
		r = vsdp_real.getsockopt(fd, level, name, val, len);
		if (r == 0 || errno != ENOPROTOOPT || !adopt(fd))
			return r;
		k = FD_CONN;
	}
	if ((k != FD_CONN && k != FD_LISTEN) || view_of(fd, &v) < 0)
		return vsdp_real.getsockopt(fd, level, name, val, len);
	if (level == SOL_SOCKET) {
		switch (name) {
		case SO_DOMAIN:
			return put_int(val, len, v.family);
		case SO_PROTOCOL:
			return put_int(val, len, IPPROTO_TCP);
		case SO_ERROR: {
			int err = 0;
			socklen_t el = sizeof(err);

			if (k != FD_CONN)
				break;
			if (vsdp_real.getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0)
				return -1;
			if (err != 0 && v.state == ST_CONNECTING &&
			    (tp_is_refusal(err) || err == ETIMEDOUT))
				err = map_connect_error(fd, err);
			else if (err == 0)
				refresh(fd, &v);
			return put_int(val, len, err);
		}
		}
		return vsdp_real.getsockopt(fd, level, name, val, len);
	}
	if (level == IPPROTO_TCP)
		return tcp_getopt(fd, &v, name, val, len);
	if (level == IPPROTO_IP || level == IPPROTO_IPV6)
		return put_int(val, len, 0);
	return vsdp_real.getsockopt(fd, level, name, val, len);
}

static void remember_tcp(int fd, int name, const void *val, socklen_t len)
{
	int slot = topt_slot(name), x;
	sigset_t old;
	struct vsock *s;

	if (slot < 0 || val == NULL || len < (socklen_t)sizeof(int))
		return;
	memcpy(&x, val, sizeof(x));
	slot = topts[slot].slot;
	tab_lock(&old);
	s = tab_get(fd);
	if (s != NULL) {
		s->topt[slot] = slot == TOPT_NODELAY ? x != 0 : x;
		s->topt_set[slot] = 1;
		if (slot == TOPT_NODELAY) {
			if (x)
				s->dial_flags |= VSDP_CTL_DIAL_NODELAY;
			else
				s->dial_flags &= ~VSDP_CTL_DIAL_NODELAY;
		}
	}
	tab_unlock(&old);
}

static void remember_sol(int fd, int name, const void *val, socklen_t len)
{
	sigset_t old;
	struct vsock *s;

	if (val == NULL)
		return;
	tab_lock(&old);
	s = tab_get(fd);
	if (s != NULL && name == SO_LINGER && len >= (socklen_t)sizeof(struct linger)) {
		struct linger l;

		memcpy(&l, val, sizeof(l));
		s->linger_abort = l.l_onoff && l.l_linger == 0;
	} else if (s != NULL && name == SO_KEEPALIVE && len >= (socklen_t)sizeof(int)) {
		int x;

		memcpy(&x, val, sizeof(x));
		s->keepalive = x != 0;
		if (x)
			s->dial_flags |= VSDP_CTL_DIAL_KEEPALIVE;
		else
			s->dial_flags &= ~VSDP_CTL_DIAL_KEEPALIVE;
	}
	tab_unlock(&old);
}

VSDP_EXPORT int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
	int k, r, x, slot;

	need();
	k = tab_kind(fd);
	if (k == FD_TCP) {
		r = vsdp_real.setsockopt(fd, level, name, val, len);
		if (r == 0 && level == IPPROTO_TCP)
			remember_tcp(fd, name, val, len);
		else if (r == 0 && level == SOL_SOCKET)
			remember_sol(fd, name, val, len);
		return r;
	}
	if (k == FD_NONE && (level == IPPROTO_TCP || level == IPPROTO_IP || level == IPPROTO_IPV6) &&
	    atomic_load(&vsdp_state) == 1) {
		r = vsdp_real.setsockopt(fd, level, name, val, len);
		if (r == 0 || errno != ENOPROTOOPT || !adopt(fd))
			return r;
		k = FD_CONN;
	}
	if (k == FD_CONN || k == FD_LISTEN) {
		struct sock_view v;

		if (view_of(fd, &v) < 0)
			k = FD_NONE; /* a stale record, now dropped */
	}
	if (k != FD_CONN && k != FD_LISTEN)
		return vsdp_real.setsockopt(fd, level, name, val, len);
	if (level == SOL_SOCKET) {
		r = vsdp_real.setsockopt(fd, level, name, val, len);
		if (r == 0) {
			remember_sol(fd, name, val, len);
			if (name == SO_KEEPALIVE && val != NULL && len >= (socklen_t)sizeof(int)) {
				memcpy(&x, val, sizeof(x));
				send_setopt(fd, SOL_SOCKET, SO_KEEPALIVE, x != 0);
			}
		}
		return r;
	}
	if (level == IPPROTO_TCP) {
		slot = topt_slot(name);
		if (slot < 0)
			return 0; /* accepted, nothing to carry (TCP_CONGESTION, ...) */
		if (val == NULL) {
			errno = EFAULT;
			return -1;
		}
		if (len < (socklen_t)sizeof(int)) {
			errno = EINVAL;
			return -1;
		}
		memcpy(&x, val, sizeof(x));
		remember_tcp(fd, name, val, len);
		if (topts[slot].forward)
			send_setopt(fd, IPPROTO_TCP, name, name == TCP_NODELAY ? x != 0 : x);
		return 0;
	}
	if (level == IPPROTO_IP || level == IPPROTO_IPV6) {
		if (len > 0 && val == NULL) {
			errno = EFAULT;
			return -1;
		}
		return 0; /* accepted and ignored: the host's socket carries IP */
	}
	return vsdp_real.setsockopt(fd, level, name, val, len);
}

/* ---- ioctl ---- */

VSDP_EXPORT int ioctl(int fd, unsigned long req, ...)
{
	va_list ap;
	void *arg;
	int k, n, r;

	va_start(ap, req);
	arg = va_arg(ap, void *);
	va_end(ap);
	need();
	if (req != FIONREAD)
		return vsdp_real.ioctl(fd, req, arg);
	k = tab_kind(fd);
	if (k == FD_NONE && atomic_load(&vsdp_state) == 1) {
		r = vsdp_real.ioctl(fd, req, arg);
		if (r == 0 || (errno != ENOTTY && errno != EINVAL && errno != EOPNOTSUPP) || !adopt(fd))
			return r;
		k = FD_CONN;
	}
	if (k == FD_CONN) {
		struct sock_view v;

		if (view_of(fd, &v) < 0)
			k = FD_NONE; /* a stale record, now dropped */
	}
	if (k != FD_CONN)
		return vsdp_real.ioctl(fd, req, arg);
	if (arg == NULL) {
		errno = EFAULT;
		return -1;
	}
	if (tp_inq(fd, &n) < 0)
		return -1;
	memcpy(arg, &n, sizeof(n));
	return 0;
}
