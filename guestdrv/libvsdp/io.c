/*
 * io.c - the data calls on device streams.
 *
 * The fast path reads one atomic byte (the fd's kind); only device streams
 * go further. What they add:
 *  - EOF on read, or EPIPE on write, is checked against the host's RESET
 *    note for the stream: a vsock RST on an established stream reads as a
 *    clean close, so without the note a fabric reset would truncate silently.
 *    Each direction reports the reset once, as TCP does.
 *  - writes go out with MSG_NOSIGNAL, so that a reset does not kill the
 *    program with SIGPIPE before it can see ECONNRESET; a plain EPIPE raises
 *    SIGPIPE as the kernel would have.
 *  - MSG_WAITALL is served in pieces of WAITALL_CHUNK (vsock fails a
 *    MSG_WAITALL read of 256 KiB or more with ENOMEM).
 *  - ENOTCONN while a non-blocking connect is in progress reads as EAGAIN
 *    (TCP's answer), or as the connect's failure once the host has said so.
 */
#include "vsdp.h"

#include <limits.h>
#include <string.h>
#include <unistd.h>

#define WAITALL_CHUNK (128 * 1024)
#define IOV_MAX_LOCAL 1024

static inline void need(void)
{
	if (__builtin_expect(atomic_load_explicit(&vsdp_state, memory_order_acquire) == 0, 0))
		vsdp_init();
}

static inline int is_conn(int fd)
{
	return tab_kind(fd) == FD_CONN;
}

/* eof_or_reset reports a RESET announced for fd's stream, once per
 * direction, or plain EOF (reading) / EPIPE (writing). reading == 2 is a
 * MSG_PEEK read: it reports without using up the report. */
int eof_or_reset(int fd, int reading)
{
	struct sock_view v;
	struct vsdp_ctl_msg m;
	sigset_t old;
	struct vsock *s;
	int err = 0, peek = reading == 2;

	if (view_of(fd, &v) < 0 || v.kind != FD_CONN)
		goto plain;
	tab_lock(&old);
	s = tab_get(fd);
	if (s != NULL && s->reset_err != 0) {
		uint8_t *done = reading ? &s->reset_rd : &s->reset_wr;

		if (!*done) {
			*done = !peek;
			err = s->reset_err;
		}
		tab_unlock(&old);
		if (err == 0)
			goto plain;
		VSDP_COUNT(resets_mapped);
		errno = err;
		return -1;
	}
	tab_unlock(&old);
	if (v.hport == 0 || !ctl_take(VSDP_CTL_RESET, v.gport, v.hport, &m, 0))
		goto plain;
	err = m.err > 0 && m.err < 4096 ? m.err : ECONNRESET;
	tab_lock(&old);
	s = tab_get(fd);
	if (s != NULL && s->hport == v.hport && s->gport == v.gport) {
		s->reset_err = err;
		if (peek)
			;
		else if (reading)
			s->reset_rd = 1;
		else
			s->reset_wr = 1;
	}
	tab_unlock(&old);
	VSDP_COUNT(resets_mapped);
	errno = err;
	return -1;
plain:
	if (reading)
		return 0;
	errno = EPIPE;
	return -1;
}

/* connect_failed returns the errno of a failed connect the host has
 * reported, or 0. */
static int connect_failed(int fd, struct sock_view *v)
{
	struct vsdp_ctl_msg m;
	sigset_t old;
	struct vsock *s;
	int have = 0, err = 0;

	tab_lock(&old);
	s = tab_get(fd);
	if (s != NULL) {
		have = s->have_result;
		err = s->result_err;
	}
	tab_unlock(&old);
	if (!have && ctl_take(VSDP_CTL_RESULT, v->hport, 0, &m, 0)) {
		have = 1;
		err = m.err;
		tab_lock(&old);
		s = tab_get(fd);
		if (s != NULL && s->hport == v->hport) {
			s->have_result = 1;
			s->result_err = m.err;
			s->local = m.local;
			s->remote = m.remote;
			s->have_addrs = 1;
		}
		tab_unlock(&old);
	}
	if (!have || err == 0)
		return 0;
	return map_connect_error(fd, ECONNRESET);
}

static ssize_t io_error(int fd, int e)
{
	struct sock_view v;

	if ((e == ENOTCONN || tp_is_refusal(e)) && view_of(fd, &v) == 0 &&
	    v.kind == FD_CONN && v.state == ST_CONNECTING) {
		int err = connect_failed(fd, &v);

		if (err != 0)
			e = err;
		else if (e == ENOTCONN)
			e = EAGAIN;
	}
	errno = e;
	return -1;
}

static ssize_t send_error(int fd, int e, int app_flags)
{
	if (e == EPIPE) {
		if (eof_or_reset(fd, 0) < 0 && errno != EPIPE)
			return -1;
		if (!(app_flags & MSG_NOSIGNAL)) {
			int saved = EPIPE;

			raise(SIGPIPE);
			errno = saved;
		}
		errno = EPIPE;
		return -1;
	}
	return io_error(fd, e);
}

static ssize_t read_result(int fd, ssize_t r, size_t want, int flags)
{
	if (r == 0 && want > 0)
		return eof_or_reset(fd, (flags & MSG_PEEK) ? 2 : 1);
	if (r < 0)
		return io_error(fd, errno);
	return r;
}

/* stale drops an entry whose descriptor is no longer a socket (closed
 * behind our back, e.g. by fclose(), and the number reused). */
static void stale(int fd)
{
	sigset_t old;

	tab_lock(&old);
	sock_put(tab_detach(fd));
	tab_unlock(&old);
}

VSDP_EXPORT ssize_t read(int fd, void *buf, size_t n)
{
	need();
	if (!is_conn(fd))
		return vsdp_real.read(fd, buf, n);
	return read_result(fd, vsdp_real.read(fd, buf, n), n, 0);
}

VSDP_EXPORT ssize_t readv(int fd, const struct iovec *iov, int cnt)
{
	size_t want = 0;
	int i;

	need();
	if (!is_conn(fd))
		return vsdp_real.readv(fd, iov, cnt);
	for (i = 0; iov != NULL && i < cnt; i++)
		want += iov[i].iov_len;
	return read_result(fd, vsdp_real.readv(fd, iov, cnt), want, 0);
}

/* recv_waitall serves a MSG_WAITALL receive in pieces of at most
 * WAITALL_CHUNK. A short piece (a signal, a receive timeout, a
 * non-blocking socket) ends it with what it has, as MSG_WAITALL does. */
static ssize_t recv_waitall(int fd, struct msghdr *msg, int flags)
{
	struct iovec v[IOV_MAX_LOCAL];
	size_t n = msg->msg_iovlen, i, want = 0, total = 0;
	int last_flags = 0;

	if (n > IOV_MAX_LOCAL || (n > 0 && msg->msg_iov == NULL)) {
		errno = n > IOV_MAX_LOCAL ? EMSGSIZE : EFAULT;
		return -1;
	}
	if (n > 0)
		memcpy(v, msg->msg_iov, n * sizeof(v[0]));
	for (i = 0; i < n; i++)
		want += v[i].iov_len;
	i = 0;
	while (i < n && v[i].iov_len == 0)
		i++;
	while (total < want) {
		struct msghdr m;
		size_t k = i, piece = 0, saved_len = 0, rest;
		ssize_t r;

		/* this piece: v[i..k-1], the last one trimmed to the chunk */
		while (k < n && piece < WAITALL_CHUNK) {
			piece += v[k].iov_len;
			k++;
		}
		if (piece > WAITALL_CHUNK) {
			saved_len = v[k - 1].iov_len;
			v[k - 1].iov_len -= piece - WAITALL_CHUNK;
			piece = WAITALL_CHUNK;
		}
		memset(&m, 0, sizeof(m));
		m.msg_iov = &v[i];
		m.msg_iovlen = k - i;
		r = vsdp_real.recvmsg(fd, &m, flags);
		VSDP_COUNT(waitall_chunks);
		if (saved_len != 0)
			v[k - 1].iov_len = saved_len;
		if (r < 0) {
			if (total > 0)
				break;
			return io_error(fd, errno);
		}
		if (r == 0) {
			if (total > 0)
				break;
			return eof_or_reset(fd, 1);
		}
		last_flags = m.msg_flags;
		total += (size_t)r;
		for (rest = (size_t)r; rest > 0 && i < n;) {
			if (rest >= v[i].iov_len) {
				rest -= v[i].iov_len;
				v[i].iov_len = 0;
				i++;
			} else {
				v[i].iov_base = (char *)v[i].iov_base + rest;
				v[i].iov_len -= rest;
				rest = 0;
			}
		}
		while (i < n && v[i].iov_len == 0)
			i++;
		if ((size_t)r < piece)
			break;
	}
	msg->msg_flags = last_flags;
	msg->msg_namelen = 0;
	msg->msg_controllen = 0;
	return (ssize_t)total;
}

VSDP_EXPORT ssize_t recv(int fd, void *buf, size_t n, int flags)
{
	need();
	if (!is_conn(fd))
		return vsdp_real.recv(fd, buf, n, flags);
	if ((flags & MSG_WAITALL) && !(flags & MSG_PEEK)) {
		struct iovec iov = {.iov_base = buf, .iov_len = n};
		struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};

		return recv_waitall(fd, &m, flags);
	}
	return read_result(fd, vsdp_real.recv(fd, buf, n, flags), n, flags);
}

VSDP_EXPORT ssize_t recvfrom(int fd, void *buf, size_t n, int flags, struct sockaddr *from,
			     socklen_t *fromlen)
{
	need();
	if (!is_conn(fd))
		return vsdp_real.recvfrom(fd, buf, n, flags, from, fromlen);
	if (fromlen != NULL)
		*fromlen = 0; /* a connected stream reports no source address */
	if ((flags & MSG_WAITALL) && !(flags & MSG_PEEK)) {
		struct iovec iov = {.iov_base = buf, .iov_len = n};
		struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};

		return recv_waitall(fd, &m, flags);
	}
	return read_result(fd, vsdp_real.recv(fd, buf, n, flags), n, flags);
}

VSDP_EXPORT ssize_t recvmsg(int fd, struct msghdr *msg, int flags)
{
	size_t want = 0, i;

	need();
	if (!is_conn(fd) || msg == NULL)
		return vsdp_real.recvmsg(fd, msg, flags);
	if ((flags & MSG_WAITALL) && !(flags & MSG_PEEK))
		return recv_waitall(fd, msg, flags);
	for (i = 0; msg->msg_iov != NULL && i < msg->msg_iovlen; i++)
		want += msg->msg_iov[i].iov_len;
	return read_result(fd, vsdp_real.recvmsg(fd, msg, flags), want, flags);
}

VSDP_EXPORT ssize_t write(int fd, const void *buf, size_t n)
{
	ssize_t r;

	need();
	if (!is_conn(fd))
		return vsdp_real.write(fd, buf, n);
	r = vsdp_real.send(fd, buf, n, MSG_NOSIGNAL);
	if (r >= 0)
		return r;
	if (errno == ENOTSOCK) {
		stale(fd);
		return vsdp_real.write(fd, buf, n);
	}
	return send_error(fd, errno, 0);
}

VSDP_EXPORT ssize_t writev(int fd, const struct iovec *iov, int cnt)
{
	struct msghdr m;
	ssize_t r;

	need();
	if (!is_conn(fd))
		return vsdp_real.writev(fd, iov, cnt);
	if (cnt < 0) {
		errno = EINVAL;
		return -1;
	}
	memset(&m, 0, sizeof(m));
	m.msg_iov = (struct iovec *)iov;
	m.msg_iovlen = (size_t)cnt;
	r = vsdp_real.sendmsg(fd, &m, MSG_NOSIGNAL);
	if (r >= 0)
		return r;
	if (errno == ENOTSOCK) {
		stale(fd);
		return vsdp_real.writev(fd, iov, cnt);
	}
	return send_error(fd, errno, 0);
}

VSDP_EXPORT ssize_t send(int fd, const void *buf, size_t n, int flags)
{
	ssize_t r;

	need();
	if (!is_conn(fd))
		return vsdp_real.send(fd, buf, n, flags);
	r = vsdp_real.send(fd, buf, n, flags | MSG_NOSIGNAL);
	return r >= 0 ? r : send_error(fd, errno, flags);
}

VSDP_EXPORT ssize_t sendto(int fd, const void *buf, size_t n, int flags,
			   const struct sockaddr *to, socklen_t tolen)
{
	ssize_t r;

	need();
	if (!is_conn(fd))
		return vsdp_real.sendto(fd, buf, n, flags, to, tolen);
	/* TCP ignores a destination on a connected stream; vsock refuses it */
	r = vsdp_real.send(fd, buf, n, flags | MSG_NOSIGNAL);
	return r >= 0 ? r : send_error(fd, errno, flags);
}

VSDP_EXPORT ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
	struct msghdr m;
	ssize_t r;

	need();
	if (!is_conn(fd) || msg == NULL)
		return vsdp_real.sendmsg(fd, msg, flags);
	m = *msg;
	m.msg_name = NULL;
	m.msg_namelen = 0;
	r = vsdp_real.sendmsg(fd, &m, flags | MSG_NOSIGNAL);
	return r >= 0 ? r : send_error(fd, errno, flags);
}
