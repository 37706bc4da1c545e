/*
 * ctlconn.c - the process's control connection to the host.
 *
 * Opened lazily by the first call that needs the host, with HELLO/HELLO_OK;
 * reopened in a forked child (the pid differs) and after the host broke it.
 * The socket is non-blocking and close-on-exec. Nothing reads it in the
 * background: whoever needs something from the host holds ctl.mu and reads
 * frames until it has it, filing the asynchronous ones (RESULT, PEER,
 * RESET) as notes that other calls take later. The host sends each note
 * before the stream event it explains (RESULT before the RST or RESPONSE,
 * PEER before connecting, RESET before the RST), and the guest delivers
 * them in that order, so a note is normally readable by the time the stream
 * event is seen; callers still wait a bounded time for it.
 *
 * A malformed frame, EOF or an I/O error closes the connection; a pending
 * request then fails and the next request opens a new connection (after a
 * one-second pause, so a guest without a device does not retry per call).
 */
#include "vsdp.h"

#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define NOTES_MAX 1024
#define RX_MAX 1024
#define RETRY_MS 1000

struct note {
	uint8_t type;
	uint32_t k1, k2;
	struct vsdp_ctl_msg m;
};

static struct {
	pthread_mutex_t mu;
	int fd;
	pid_t pid;
	dev_t dev;
	ino_t ino;
	uint32_t next_id;
	uint64_t fail_at_ms;
	int fail_err;
	uint8_t rx[RX_MAX];
	size_t rxlen;
	struct note notes[NOTES_MAX];
	unsigned head, count;
} ctl = {.mu = PTHREAD_MUTEX_INITIALIZER, .fd = -1};

/* set while this thread holds ctl.mu: a signal handler that closes a
 * socket on the same thread must not wait for it */
static VSDP_TLS int in_ctl;

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void lock(void)
{
	pthread_mutex_lock(&ctl.mu);
	in_ctl = 1;
}

static void unlock(void)
{
	in_ctl = 0;
	pthread_mutex_unlock(&ctl.mu);
}

static void drop_conn(int err)
{
	if (ctl.fd >= 0) {
		struct stat st;

		/* Close only what is still ours: the program may have closed the
		 * number behind our back and reused it. */
		if (fstat(ctl.fd, &st) == 0 && st.st_dev == ctl.dev && st.st_ino == ctl.ino)
			vsdp_real.close(ctl.fd);
		VSDP_COUNT(ctl_failures);
	}
	ctl.fd = -1;
	ctl.rxlen = 0;
	ctl.fail_at_ms = now_ms();
	ctl.fail_err = err;
}

static void add_note(const struct vsdp_ctl_msg *m, uint32_t k1, uint32_t k2)
{
	unsigned i;

	if (ctl.count == NOTES_MAX) {
		/* Full: forget the oldest. Only a program that ignores its
		 * streams lets notes pile up this far. */
		ctl.head = (ctl.head + 1) % NOTES_MAX;
		ctl.count--;
	}
	i = (ctl.head + ctl.count) % NOTES_MAX;
	ctl.notes[i].type = m->type;
	ctl.notes[i].k1 = k1;
	ctl.notes[i].k2 = k2;
	ctl.notes[i].m = *m;
	ctl.count++;
}

static int find_note(uint8_t type, uint32_t k1, uint32_t k2, struct vsdp_ctl_msg *out)
{
	unsigned i, j;

	for (i = 0; i < ctl.count; i++) {
		struct note *n = &ctl.notes[(ctl.head + i) % NOTES_MAX];

		if (n->type != type || n->k1 != k1 || n->k2 != k2)
			continue;
		*out = n->m;
		/* close the gap */
		for (j = i; j + 1 < ctl.count; j++)
			ctl.notes[(ctl.head + j) % NOTES_MAX] = ctl.notes[(ctl.head + j + 1) % NOTES_MAX];
		ctl.count--;
		return 1;
	}
	return 0;
}

/* What pump() waits for. */
struct want {
	int kind;      /* 0 nothing (drain), 1 reply with id, 2 note */
	uint32_t id;
	uint8_t type;  /* note type */
	uint32_t k1, k2;
	struct vsdp_ctl_msg *out;
	int done;
};

static int is_reply(uint8_t t)
{
	return t == VSDP_CTL_HELLO_OK || t == VSDP_CTL_TICKET || t == VSDP_CTL_LOCAL ||
	       t == VSDP_CTL_DENY || t == VSDP_CTL_LISTEN_OK || t == VSDP_CTL_WHO_OK;
}

/* dispatch files one frame; -1 when the frame breaks the protocol. */
static int dispatch(const struct vsdp_ctl_msg *m, struct want *w)
{
	switch (m->type) {
	case VSDP_CTL_RESULT:
		add_note(m, m->id, 0);
		break;
	case VSDP_CTL_PEER:
		add_note(m, m->id, m->port);
		break;
	case VSDP_CTL_RESET:
		add_note(m, m->guest_port, m->host_port);
		break;
	default:
		if (!is_reply(m->type)) {
			VSDP_COUNT(protocol_errors);
			return -1; /* a guest-to-host type from the host */
		}
		if (w->kind == 1 && m->id == w->id) {
			*w->out = *m;
			w->done = 1;
		}
		/* else: the answer to a request that timed out; drop it */
		return 0;
	}
	if (w->kind == 2 && !w->done && find_note(w->type, w->k1, w->k2, w->out))
		w->done = 1;
	return 0;
}

/* pump reads and files frames until w is done, nothing is readable
 * (wait_ms == 0) or wait_ms passes. It returns 0, or -errno when the
 * connection broke (it is then closed). */
static int pump(struct want *w, int wait_ms)
{
	uint64_t deadline = now_ms() + (uint64_t)(wait_ms > 0 ? wait_ms : 0);

	while (!w->done) {
		ssize_t r;
		size_t off = 0;

		r = vsdp_real.recv(ctl.fd, ctl.rx + ctl.rxlen, RX_MAX - ctl.rxlen, MSG_DONTWAIT);
		if (r == 0) {
			drop_conn(ECONNRESET);
			return -ECONNRESET;
		}
		if (r < 0) {
			int e = errno;
			struct pollfd p = {.fd = ctl.fd, .events = POLLIN};
			uint64_t now;

			if (e == EINTR)
				continue;
			if (e != EAGAIN && e != EWOULDBLOCK) {
				drop_conn(e);
				return -e;
			}
			now = now_ms();
			if (wait_ms <= 0 || now >= deadline)
				return 0;
			if (poll(&p, 1, (int)(deadline - now)) < 0 && errno != EINTR) {
				e = errno;
				drop_conn(e);
				return -e;
			}
			continue;
		}
		ctl.rxlen += (size_t)r;
		for (;;) {
			struct vsdp_ctl_msg m;
			int n = vsdp_ctl_decode(ctl.rx + off, ctl.rxlen - off, &m);

			if (n == 0)
				break;
			if (n < 0 || dispatch(&m, w) < 0) {
				if (n < 0)
					VSDP_COUNT(protocol_errors);
				vsdp_log(9, "control connection: malformed frame from the host");
				drop_conn(EPROTO);
				return -EPROTO;
			}
			off += (size_t)n;
		}
		memmove(ctl.rx, ctl.rx + off, ctl.rxlen - off);
		ctl.rxlen -= off;
	}
	return 0;
}

static int write_all(const uint8_t *b, size_t n)
{
	uint64_t deadline = now_ms() + (uint64_t)vsdp_cfg.ctl_timeout_ms;

	while (n > 0) {
		ssize_t r = vsdp_real.send(ctl.fd, b, n, MSG_DONTWAIT | MSG_NOSIGNAL);

		if (r > 0) {
			b += r;
			n -= (size_t)r;
			continue;
		}
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			struct pollfd p = {.fd = ctl.fd, .events = POLLOUT};
			uint64_t now = now_ms();

			if (now >= deadline)
				return -ETIMEDOUT;
			poll(&p, 1, (int)(deadline - now));
			continue;
		}
		return r < 0 ? -errno : -EIO;
	}
	return 0;
}

static int send_msg(const struct vsdp_ctl_msg *m)
{
	uint8_t b[VSDP_CTL_MAX_FRAME];
	int n = vsdp_ctl_encode(m, b, sizeof(b)), r;

	if (n < 0)
		return -EINVAL;
	r = write_all(b, (size_t)n);
	if (r < 0)
		drop_conn(-r);
	return r;
}

/* current reports whether the connection this process holds is usable. */
static int current(void)
{
	struct stat st;

	if (ctl.fd < 0)
		return 0;
	if (ctl.pid != getpid()) {
		/* A forked child: the connection is the parent's. Let go of our
		 * copy (if the number still names it) and of the parent's notes. */
		if (fstat(ctl.fd, &st) == 0 && st.st_dev == ctl.dev && st.st_ino == ctl.ino)
			vsdp_real.close(ctl.fd);
		ctl.fd = -1;
		ctl.rxlen = 0;
		ctl.count = 0;
		ctl.fail_at_ms = 0;
		return 0;
	}
	if (fstat(ctl.fd, &st) != 0 || st.st_dev != ctl.dev || st.st_ino != ctl.ino) {
		ctl.fd = -1; /* closed by the program: not ours to close again */
		ctl.rxlen = 0;
		return 0;
	}
	return 1;
}

static int open_conn(void)
{
	struct vsdp_ctl_msg hello = {.type = VSDP_CTL_HELLO}, ok;
	struct want w = {.kind = 1, .id = 0, .out = &ok};
	struct stat st;
	int fd, r, fl;

	if (current())
		return 0;
	if (ctl.fail_at_ms != 0 && now_ms() - ctl.fail_at_ms < RETRY_MS)
		return -(ctl.fail_err ? ctl.fail_err : ECONNREFUSED);
	fd = tp_socket();
	if (fd < 0) {
		drop_conn(errno);
		return -ctl.fail_err;
	}
	if (tp_connect_ctl(fd, vsdp_cfg.ctl_timeout_ms) < 0 || fstat(fd, &st) < 0) {
		int e = errno;

		vsdp_real.close(fd);
		drop_conn(e);
		return -e;
	}
	fl = vsdp_real.fcntl(fd, F_GETFL);
	vsdp_real.fcntl(fd, F_SETFL, fl | O_NONBLOCK);
	ctl.fd = fd;
	ctl.pid = getpid();
	ctl.dev = st.st_dev;
	ctl.ino = st.st_ino;
	ctl.rxlen = 0;
	hello.pid = (uint32_t)ctl.pid;
	hello.ver = VSDP_CTL_VERSION;
	r = send_msg(&hello);
	if (r == 0)
		r = pump(&w, vsdp_cfg.ctl_timeout_ms);
	if (r == 0 && (!w.done || ok.type != VSDP_CTL_HELLO_OK || ok.ver != VSDP_CTL_VERSION)) {
		r = w.done ? -EPROTO : -ETIMEDOUT;
		drop_conn(-r);
	}
	if (r < 0)
		return r;
	ctl.fail_at_ms = 0;
	VSDP_COUNT(ctl_opens);
	return 0;
}

int ctl_request(struct vsdp_ctl_msg *req, struct vsdp_ctl_msg *reply)
{
	struct want w = {.kind = 1, .out = reply};
	int r;

	lock();
	r = open_conn();
	if (r == 0) {
		if (++ctl.next_id == 0)
			ctl.next_id = 1;
		req->id = w.id = ctl.next_id;
		r = send_msg(req);
	}
	if (r == 0)
		r = pump(&w, vsdp_cfg.ctl_timeout_ms);
	if (r == 0 && !w.done) {
		/* The host did not answer in time: it is not fit to serve us. */
		drop_conn(ETIMEDOUT);
		r = -ETIMEDOUT;
	}
	unlock();
	return r;
}

int ctl_send(const struct vsdp_ctl_msg *m)
{
	int r;

	if (in_ctl)
		return -EDEADLK; /* a signal handler on a thread inside the lock */
	lock();
	r = current() ? send_msg(m) : -ENOTCONN;
	unlock();
	return r;
}

int ctl_take(uint8_t type, uint32_t k1, uint32_t k2, struct vsdp_ctl_msg *out, int wait_ms)
{
	struct want w = {.kind = 2, .type = type, .k1 = k1, .k2 = k2, .out = out};

	if (in_ctl)
		return 0;
	lock();
	if (find_note(type, k1, k2, out))
		w.done = 1;
	else if (current())
		pump(&w, wait_ms);
	unlock();
	return w.done;
}

void ctl_fd_closed(int lo, int hi)
{
	/* The program closed a range of numbers; if ours was in it, the
	 * connection is gone. Called before the real close, lock-free for
	 * the number itself (a stale check is caught by the fstat test). */
	int fd = __atomic_load_n(&ctl.fd, __ATOMIC_RELAXED);

	if (fd >= 0 && fd >= lo && fd <= hi && !in_ctl) {
		lock();
		if (ctl.fd >= lo && ctl.fd <= hi && ctl.pid == getpid()) {
			ctl.fd = -1;
			ctl.rxlen = 0;
		}
		unlock();
	}
}

void ctl_atfork_prepare(void)
{
	pthread_mutex_lock(&ctl.mu);
}

void ctl_atfork_parent(void)
{
	pthread_mutex_unlock(&ctl.mu);
}

void ctl_atfork_child(void)
{
	pthread_mutex_unlock(&ctl.mu);
}
