/*
 * fd.c - close, dup, fcntl, epoll_ctl: keeping the table true to the
 * descriptors.
 *
 * Duplicates share one record (reference-counted). The last close of a
 * connected device stream with unread data, or with SO_LINGER {1, 0}, sends
 * ABORT first (the host then aborts the fabric stream rather than closing it
 * gracefully); the last close of a listener sends UNLISTEN. Neither is sent
 * for records that existed at a fork (the other process may still use the
 * stream) or that were inherited across exec.
 *
 * epoll registrations belong to the open file, and a swap (dup3) replaces
 * the file: epoll_ctl is watched for sockets that may still be swapped, and
 * the registrations are made again on the new file (sock.c, rereg_epoll).
 */
#include "vsdp.h"

#include <fcntl.h>
#include <stdarg.h>
#include <string.h>
#include <unistd.h>

static inline void need(void)
{
	if (__builtin_expect(atomic_load_explicit(&vsdp_state, memory_order_acquire) == 0, 0))
		vsdp_init();
}

int release_fd(int fd, int do_abort)
{
	struct sock_view v;
	struct vsdp_ctl_msg m;
	int unread = 0, abort = 0, unlisten = 0;
	sigset_t old;
	struct vsock *s;

	if (view_of(fd, &v) < 0) {
		tab_lock(&old);
		tab_detach(fd);
		tab_unlock(&old);
		return 0;
	}
	if (do_abort && v.kind == FD_CONN && v.state == ST_CONNECTED && !v.forked && !v.adopted &&
	    !v.linger_abort) {
		char c;

		unread = vsdp_real.recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) > 0;
	}
	tab_lock(&old);
	s = tab_detach(fd);
	if (s != NULL && s->refs == 1 && !s->forked && !s->adopted) {
		abort = do_abort && v.kind == FD_CONN && s->state == ST_CONNECTED &&
			(unread || s->linger_abort) && s->hport != 0;
		unlisten = v.kind == FD_LISTEN && s->owner == getpid();
	}
	sock_put(s);
	tab_unlock(&old);
	if (abort) {
		memset(&m, 0, sizeof(m));
		m.type = VSDP_CTL_ABORT;
		m.guest_port = v.gport;
		m.host_port = v.hport;
		if (ctl_send(&m) == 0)
			VSDP_COUNT(aborts);
	}
	if (unlisten) {
		memset(&m, 0, sizeof(m));
		m.type = VSDP_CTL_UNLISTEN;
		m.port = v.gport;
		ctl_send(&m);
	}
	return 0;
}

VSDP_EXPORT int close(int fd)
{
	need();
	ctl_fd_closed(fd, fd);
	if (tab_kind(fd) != FD_NONE)
		release_fd(fd, 1);
	tab_bump(fd);
	return vsdp_real.close(fd);
}

static void release_range(unsigned first, unsigned last)
{
	int fd, hi = last > (unsigned)INT32_MAX ? INT32_MAX : (int)last;

	if (first > (unsigned)INT32_MAX)
		return;
	ctl_fd_closed((int)first, hi);
	for (fd = tab_next_used((int)first, hi); fd >= 0 && fd <= hi;
	     fd = fd == hi ? -1 : tab_next_used(fd + 1, hi)) {
		if (tab_kind(fd) != FD_NONE)
			release_fd(fd, 1);
		tab_bump(fd);
	}
}

VSDP_EXPORT int close_range(unsigned first, unsigned last, int flags)
{
	need();
	if (vsdp_real.close_range == NULL) {
		errno = ENOSYS;
		return -1;
	}
	if (first <= last && !(flags & CLOSE_RANGE_CLOEXEC))
		release_range(first, last);
	return vsdp_real.close_range(first, last, flags);
}

VSDP_EXPORT void closefrom(int lowfd)
{
	need();
	if (lowfd < 0)
		lowfd = 0;
	release_range((unsigned)lowfd, ~0u);
	if (vsdp_real.closefrom != NULL)
		vsdp_real.closefrom(lowfd);
}

/* share makes nfd a duplicate of old in the table. */
static void share(int old, int nfd)
{
	sigset_t o;
	struct vsock *s;
	int k;

	tab_lock(&o);
	sock_put(tab_detach(nfd));
	k = tab_kind(old);
	s = tab_get(old);
	if (k != FD_NONE) {
		if (s != NULL)
			s->refs++;
		if (tab_set(nfd, k, s) < 0 && s != NULL)
			s->refs--;
	}
	tab_unlock(&o);
}

VSDP_EXPORT int dup(int old)
{
	int r;

	need();
	r = vsdp_real.dup(old);
	if (r >= 0 && (tab_kind(old) != FD_NONE || tab_kind(r) != FD_NONE)) {
		int e = errno;

		share(old, r);
		errno = e;
	}
	return r;
}

static int dup_onto(int old, int nfd, int flags, int three)
{
	int r, e;

	if (old == nfd || vsdp_real.fcntl(old, F_GETFD) < 0 || nfd < 0)
		return three ? vsdp_real.dup3(old, nfd, flags) : vsdp_real.dup2(old, nfd);
	/* dup2 closes nfd first, silently: the same as close() for us */
	ctl_fd_closed(nfd, nfd);
	if (tab_kind(nfd) != FD_NONE)
		release_fd(nfd, 1);
	tab_bump(nfd);
	r = three ? vsdp_real.dup3(old, nfd, flags) : vsdp_real.dup2(old, nfd);
	if (r >= 0 && tab_kind(old) != FD_NONE) {
		e = errno;
		share(old, r);
		errno = e;
	}
	return r;
}

VSDP_EXPORT int dup2(int old, int nfd)
{
	need();
	return dup_onto(old, nfd, 0, 0);
}

VSDP_EXPORT int dup3(int old, int nfd, int flags)
{
	need();
	return dup_onto(old, nfd, flags, 1);
}

static int do_fcntl(int (*real)(int, int, ...), int fd, int cmd, void *arg)
{
	int r = real(fd, cmd, arg);

	if (r >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC) &&
	    (tab_kind(fd) != FD_NONE || tab_kind(r) != FD_NONE)) {
		int e = errno;

		share(fd, r);
		errno = e;
	}
	return r;
}

VSDP_EXPORT int fcntl(int fd, int cmd, ...)
{
	va_list ap;
	void *arg;

	va_start(ap, cmd);
	arg = va_arg(ap, void *);
	va_end(ap);
	need();
	return do_fcntl(vsdp_real.fcntl, fd, cmd, arg);
}

VSDP_EXPORT int fcntl64(int fd, int cmd, ...)
{
	va_list ap;
	void *arg;

	va_start(ap, cmd);
	arg = va_arg(ap, void *);
	va_end(ap);
	need();
	return do_fcntl(vsdp_real.fcntl64, fd, cmd, arg);
}

VSDP_EXPORT int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
	sigset_t old;
	struct vsock *s;
	int r, k, i;

	need();
	r = vsdp_real.epoll_ctl(epfd, op, fd, ev);
	if (r != 0)
		return r;
	k = tab_kind(fd);
	if (k != FD_TCP && k != FD_CONN)
		return r;
	tab_lock(&old);
	s = tab_get(fd);
	if (s != NULL && !(k == FD_CONN && s->state == ST_CONNECTED)) {
		for (i = 0; i < s->neps && s->eps[i].epfd != epfd; i++)
			;
		if (op == EPOLL_CTL_DEL) {
			if (i < s->neps) {
				s->eps[i] = s->eps[s->neps - 1];
				s->neps--;
			}
		} else if (ev != NULL && (op == EPOLL_CTL_ADD || op == EPOLL_CTL_MOD)) {
			if (i == s->neps && s->neps < EPREG_MAX)
				s->neps++;
			if (i < s->neps) {
				s->eps[i].epfd = epfd;
				s->eps[i].gen = tab_gen(epfd);
				s->eps[i].ev = *ev;
			}
		}
	}
	tab_unlock(&old);
	return r;
}
