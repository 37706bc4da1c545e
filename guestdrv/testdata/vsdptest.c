/*
 * vsdptest - a guest program for libvsdp.so's tests. It uses only the
 * ordinary socket API (it is not linked with the library; the tests run it
 * under LD_PRELOAD) and prints what it observed as key=value lines, which
 * the Go tests check. A broken expectation inside the program itself exits
 * with status 1 and a "FAIL:" line.
 *
 *   vsdptest connect ADDR PORT [block|nb|epoll]
 *   vsdptest echo ADDR PORT INFILE OUTFILE
 *   vsdptest reset ADDR PORT
 *   vsdptest epoll ADDR PORT
 *   vsdptest fork ADDR PORT ADDR2 PORT2
 *   vsdptest waitall ADDR PORT SIZE OUTFILE
 *   vsdptest fionread ADDR PORT N
 *   vsdptest opts ADDR PORT
 *   vsdptest abort ADDR PORT unread|linger|clean|dup
 *   vsdptest listen ADDR PORT
 *   vsdptest dup ADDR PORT
 *   vsdptest exec ADDR PORT          (re-runs itself as "adopted FD")
 *   vsdptest threads ADDR PORT THREADS ROUNDS
 *   vsdptest stale ADDR PORT
 *   vsdptest passthru
 *   vsdptest fds                     (prints the open descriptor count)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../libvsdp/libvsdp.h"

static void fail(const char *what)
{
	printf("FAIL: %s: %s\n", what, strerrorname_np(errno) ? strerrorname_np(errno) : "?");
	fflush(stdout);
	exit(1);
}

static const char *ename(int e)
{
	const char *n = strerrorname_np(e);

	return e == 0 ? "0" : n ? n : "?";
}

static void kv(const char *k, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void kv(const char *k, const char *fmt, ...)
{
	va_list ap;

	printf("%s=", k);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
}

static void counters(void)
{
	int (*get)(struct vsdp_counters *, size_t) =
		(int (*)(struct vsdp_counters *, size_t))dlsym(RTLD_DEFAULT, "vsdp_counters");
	struct vsdp_counters c;

	if (get == NULL) {
		kv("preloaded", "0");
		return;
	}
	kv("preloaded", "1");
	get(&c, sizeof(c));
#define C(f) kv("c." #f, "%llu", (unsigned long long)c.f)
	C(ctl_opens);
	C(ctl_failures);
	C(dials);
	C(tickets);
	C(locals);
	C(denies);
	C(swaps);
	C(epoll_rereg);
	C(result_mapped);
	C(resets_mapped);
	C(aborts);
	C(setopts);
	C(listens);
	C(accepts);
	C(peers_missing);
	C(waitall_chunks);
	C(inq_emulated);
	C(adopted);
	C(protocol_errors);
#undef C
}

/* sockaddr from "ADDR" "PORT": IPv4, or IPv6 (then an AF_INET6 socket). */
static int addr_of(const char *a, const char *p, struct sockaddr_storage *ss, socklen_t *len)
{
	memset(ss, 0, sizeof(*ss));
	if (strchr(a, ':') == NULL) {
		struct sockaddr_in *in = (struct sockaddr_in *)ss;

		in->sin_family = AF_INET;
		in->sin_port = htons((uint16_t)atoi(p));
		if (inet_pton(AF_INET, a, &in->sin_addr) != 1)
			return -1;
		*len = sizeof(*in);
		return AF_INET;
	}
	struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;

	in6->sin6_family = AF_INET6;
	in6->sin6_port = htons((uint16_t)atoi(p));
	if (inet_pton(AF_INET6, a, &in6->sin6_addr) != 1)
		return -1;
	*len = sizeof(*in6);
	return AF_INET6;
}

static const char *fmt_addr(const struct sockaddr *sa, char *buf, size_t n)
{
	char ip[INET6_ADDRSTRLEN];

	if (sa->sa_family == AF_INET) {
		const struct sockaddr_in *in = (const struct sockaddr_in *)sa;

		inet_ntop(AF_INET, &in->sin_addr, ip, sizeof(ip));
		snprintf(buf, n, "%s:%u", ip, ntohs(in->sin_port));
	} else if (sa->sa_family == AF_INET6) {
		const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;

		inet_ntop(AF_INET6, &in6->sin6_addr, ip, sizeof(ip));
		snprintf(buf, n, "[%s]:%u", ip, ntohs(in6->sin6_port));
	} else {
		snprintf(buf, n, "family-%d", sa->sa_family);
	}
	return buf;
}

static void names(int fd, const char *prefix)
{
	struct sockaddr_storage ss;
	socklen_t l = sizeof(ss);
	char buf[128], key[64];
	int dom = -1;
	socklen_t dl = sizeof(dom);

	snprintf(key, sizeof(key), "%ssockname", prefix);
	if (getsockname(fd, (struct sockaddr *)&ss, &l) == 0)
		kv(key, "%s", fmt_addr((struct sockaddr *)&ss, buf, sizeof(buf)));
	else
		kv(key, "%s", ename(errno));
	l = sizeof(ss);
	snprintf(key, sizeof(key), "%speername", prefix);
	if (getpeername(fd, (struct sockaddr *)&ss, &l) == 0)
		kv(key, "%s", fmt_addr((struct sockaddr *)&ss, buf, sizeof(buf)));
	else
		kv(key, "%s", ename(errno));
	snprintf(key, sizeof(key), "%sdomain", prefix);
	if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &dom, &dl) == 0)
		kv(key, "%s", dom == AF_INET ? "AF_INET" : dom == AF_INET6 ? "AF_INET6" : "other");
}

static int dial(const char *a, const char *p)
{
	struct sockaddr_storage ss;
	socklen_t len;
	int fam = addr_of(a, p, &ss, &len), fd;

	if (fam < 0) {
		errno = EINVAL;
		fail("address");
	}
	fd = socket(fam, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		fail("socket");
	if (connect(fd, (struct sockaddr *)&ss, len) < 0) {
		kv("connect", "%s", ename(errno));
		close(fd);
		return -1;
	}
	kv("connect", "OK");
	return fd;
}

static void write_all(int fd, const void *b, size_t n)
{
	const char *p = b;

	while (n > 0) {
		ssize_t r = write(fd, p, n);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			fail("write");
		}
		p += r;
		n -= (size_t)r;
	}
}

static char *read_file(const char *path, size_t *n)
{
	struct stat st;
	int fd = open(path, O_RDONLY);
	char *b;
	size_t got = 0;

	if (fd < 0 || fstat(fd, &st) < 0)
		fail("open input");
	b = malloc((size_t)st.st_size + 1);
	while (got < (size_t)st.st_size) {
		ssize_t r = read(fd, b + got, (size_t)st.st_size - got);

		if (r <= 0)
			fail("read input");
		got += (size_t)r;
	}
	close(fd);
	*n = got;
	return b;
}

/* ---- connect ---- */

static int cmd_connect(char **av)
{
	struct sockaddr_storage ss;
	socklen_t len;
	const char *mode = av[2] ? av[2] : "block";
	int fam = addr_of(av[0], av[1], &ss, &len), fd, r, err = 0, ep = -1;
	socklen_t el = sizeof(err);

	fd = socket(fam, SOCK_STREAM | (strcmp(mode, "block") ? SOCK_NONBLOCK : 0), 0);
	if (fd < 0)
		fail("socket");
	if (strcmp(mode, "epoll") == 0) {
		struct epoll_event ev = {.events = EPOLLOUT, .data.fd = fd};

		ep = epoll_create1(EPOLL_CLOEXEC);
		/* registered before connect: the library must carry it over */
		if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
			fail("epoll");
	}
	r = connect(fd, (struct sockaddr *)&ss, len);
	if (r == 0) {
		kv("connect", "OK");
	} else if (errno != EINPROGRESS) {
		kv("connect", "%s", ename(errno));
	} else {
		kv("inprogress", "1");
		if (ep >= 0) {
			struct epoll_event ev;
			int n = epoll_wait(ep, &ev, 1, 10000);

			kv("epollout", "%d", n == 1 && ev.data.fd == fd && (ev.events & EPOLLOUT));
		} else {
			struct pollfd p = {.fd = fd, .events = POLLOUT};

			kv("pollout", "%d", poll(&p, 1, 10000) == 1 && (p.revents & (POLLOUT | POLLERR)));
		}
		if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0)
			fail("SO_ERROR");
		kv("so_error", "%s", ename(err));
		kv("connect", "%s", err ? ename(err) : "OK");
	}
	if (r == 0 || (r < 0 && errno == EINPROGRESS && err == 0))
		names(fd, "");
	counters();
	close(fd);
	if (ep >= 0)
		close(ep);
	return 0;
}

/* bindconnect ADDR PORT BINDPORT: bind to the wildcard address and
 * BINDPORT first (a server rule may defer that bind), then connect and
 * report both names: the bind must hold on whichever path connect takes. */
static int cmd_bindconnect(char **av)
{
	struct sockaddr_storage ss, bs;
	socklen_t len, bl;
	int fam = addr_of(av[0], av[1], &ss, &len), fd;

	addr_of(fam == AF_INET6 ? "::" : "0.0.0.0", av[2], &bs, &bl);
	fd = socket(fam, SOCK_STREAM, 0);
	if (fd < 0)
		fail("socket");
	if (bind(fd, (struct sockaddr *)&bs, bl) < 0)
		fail("bind");
	kv("connect", "%s", connect(fd, (struct sockaddr *)&ss, len) == 0 ? "OK" : ename(errno));
	names(fd, "");
	counters();
	close(fd);
	return 0;
}

/* ---- echo: data integrity ---- */

static int cmd_echo(char **av)
{
	size_t n, off = 0, got = 0, cap;
	char *in = read_file(av[2], &n), *back;
	int fd = dial(av[0], av[1]), out, turn = 0;

	if (fd < 0)
		return 0;
	/* write with write, send and writev in turn, in uneven pieces */
	while (off < n) {
		size_t k = n - off < 7777 + (size_t)turn * 1000 ? n - off : 7777 + (size_t)turn * 1000;
		ssize_t r;

		if (turn % 3 == 0) {
			r = write(fd, in + off, k);
		} else if (turn % 3 == 1) {
			r = send(fd, in + off, k, 0);
		} else {
			struct iovec iov[2] = {{in + off, k / 2}, {in + off + k / 2, k - k / 2}};

			r = writev(fd, iov, 2);
		}
		if (r < 0)
			fail("write");
		off += (size_t)r;
		turn = (turn + 1) % 9;
	}
	if (shutdown(fd, SHUT_WR) < 0)
		fail("shutdown");
	cap = n + 1;
	back = malloc(cap);
	for (;;) {
		ssize_t r = turn++ % 2 ? read(fd, back + got, cap - got)
				       : recv(fd, back + got, cap - got, 0);

		if (r < 0)
			fail("read");
		if (r == 0)
			break;
		got += (size_t)r;
		if (got == cap)
			fail("more data than was sent");
	}
	out = open(av[3], O_WRONLY | O_CREAT | O_TRUNC, 0600);
	write_all(out, back, got);
	close(out);
	kv("sent", "%zu", n);
	kv("received", "%zu", got);
	counters();
	close(fd);
	return 0;
}

/* ---- reset ---- */

static volatile sig_atomic_t sigpipes;

static void on_sigpipe(int s)
{
	(void)s;
	sigpipes++;
}

static int cmd_reset(char **av)
{
	char buf[4096];
	size_t total = 0;
	int fd = dial(av[0], av[1]);
	ssize_t r;

	if (fd < 0)
		return 0;
	signal(SIGPIPE, on_sigpipe);
	/* the host sends 1000 bytes, then resets */
	while (total < 1000 && (r = read(fd, buf, sizeof(buf))) > 0)
		total += (size_t)r;
	kv("read_total", "%zu", total);
	r = recv(fd, buf, 1, MSG_PEEK);
	kv("peek_err", "%s", r < 0 ? ename(errno) : r == 0 ? "EOF" : "data");
	r = read(fd, buf, sizeof(buf));
	kv("read_err", "%s", r < 0 ? ename(errno) : r == 0 ? "EOF" : "data");
	r = read(fd, buf, sizeof(buf));
	kv("read_again", "%s", r < 0 ? ename(errno) : r == 0 ? "EOF" : "data");
	r = write(fd, "x", 1);
	kv("write_err", "%s", r < 0 ? ename(errno) : "OK");
	kv("sigpipe_after_first", "%d", (int)sigpipes);
	r = write(fd, "x", 1);
	kv("write_again", "%s", r < 0 ? ename(errno) : "OK");
	kv("sigpipes", "%d", (int)sigpipes);
	counters();
	close(fd);
	return 0;
}

/* ---- epoll registered before the swap ---- */

static int cmd_epoll(char **av)
{
	struct sockaddr_storage ss;
	socklen_t len;
	int fam = addr_of(av[0], av[1], &ss, &len), fd, ep, n;
	struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0xfeedface};
	char buf[64];

	fd = socket(fam, SOCK_STREAM, 0);
	ep = epoll_create1(0);
	if (fd < 0 || ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
		fail("epoll setup");
	if (connect(fd, (struct sockaddr *)&ss, len) < 0)
		fail("connect");
	kv("connect", "OK");
	n = epoll_wait(ep, &ev, 1, 10000);
	kv("epoll_n", "%d", n);
	kv("epollin", "%d", n == 1 && (ev.events & EPOLLIN) && ev.data.u64 == 0xfeedface);
	n = (int)read(fd, buf, sizeof(buf) - 1);
	buf[n > 0 ? n : 0] = 0;
	kv("data", "%s", buf);
	counters();
	close(fd);
	close(ep);
	return 0;
}

/* ---- fork ---- */

static int cmd_fork(char **av)
{
	int fd = dial(av[0], av[1]), st;
	pid_t pid;

	if (fd < 0)
		return 0;
	kv("parent_pid", "%d", getpid());
	pid = fork();
	if (pid < 0)
		fail("fork");
	if (pid == 0) {
		int c = dial(av[2], av[3]);

		printf("child_pid=%d\nchild_connect=%s\n", getpid(), c >= 0 ? "OK" : "FAILED");
		fflush(stdout);
		if (c >= 0) {
			char b[16];

			/* read the echo back: a close with unread data would abort */
			write_all(c, "child", 5);
			shutdown(c, SHUT_WR);
			while (read(c, b, sizeof(b)) > 0)
				;
			close(c);
		}
		close(fd);
		_exit(c >= 0 ? 0 : 3);
	}
	waitpid(pid, &st, 0);
	kv("child_status", "%d", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
	/* the parent's stream still works after the child closed its copy */
	write_all(fd, "parent", 6);
	{
		char buf[16];
		ssize_t r = recv(fd, buf, 6, MSG_WAITALL);

		kv("parent_echo", "%s", r == 6 && memcmp(buf, "parent", 6) == 0 ? "OK" : "BAD");
	}
	counters();
	close(fd);
	return 0;
}

/* ---- MSG_WAITALL ---- */

static int cmd_waitall(char **av)
{
	size_t n = strtoul(av[2], NULL, 10);
	char *b = malloc(n);
	int fd = dial(av[0], av[1]), out;
	ssize_t r;

	if (fd < 0)
		return 0;
	r = recv(fd, b, n, MSG_WAITALL);
	kv("recv", "%zd", r);
	if (r < 0)
		kv("recv_err", "%s", ename(errno));
	out = open(av[3], O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (r > 0)
		write_all(out, b, (size_t)r);
	close(out);
	counters();
	close(fd);
	return 0;
}

/* ---- FIONREAD ---- */

static int cmd_fionread(char **av)
{
	int want = atoi(av[2]), fd = dial(av[0], av[1]), v = -1, i;

	if (fd < 0)
		return 0;
	for (i = 0; i < 500; i++) {
		if (ioctl(fd, FIONREAD, &v) < 0)
			fail("FIONREAD");
		if (v >= want)
			break;
		usleep(10000);
	}
	kv("fionread", "%d", v);
	counters();
	close(fd);
	return 0;
}

/* ---- TCP options ---- */

static int cmd_opts(char **av)
{
	struct sockaddr_storage ss;
	socklen_t len, l;
	int fam = addr_of(av[0], av[1], &ss, &len), fd, one = 1, v, r;
	char c;

	fd = socket(fam, SOCK_STREAM, 0);
	if (fd < 0)
		fail("socket");
	if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
		fail("TCP_NODELAY before connect");
	if (connect(fd, (struct sockaddr *)&ss, len) < 0)
		fail("connect");
	kv("connect", "OK");
	v = 30;
	r = setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &v, sizeof(v));
	kv("keepidle_set", "%s", r == 0 ? "OK" : ename(errno));
	v = 0;
	r = setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &v, sizeof(v));
	kv("nodelay_off", "%s", r == 0 ? "OK" : ename(errno));
	v = 1;
	r = setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &v, sizeof(v));
	kv("nodelay_set", "%s", r == 0 ? "OK" : ename(errno));
	r = setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &v, 2);
	kv("nodelay_short", "%s", r == 0 ? "OK" : ename(errno));
	l = sizeof(v);
	v = -1;
	getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &v, &l);
	kv("nodelay_get", "%d", v);
	l = sizeof(v);
	getsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &v, &l);
	kv("keepidle_get", "%d", v);
	r = setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
	kv("keepalive_set", "%s", r == 0 ? "OK" : ename(errno));
	v = 0x10;
	r = setsockopt(fd, IPPROTO_IP, IP_TOS, &v, sizeof(v));
	kv("tos_set", "%s", r == 0 ? "OK" : ename(errno));
	l = sizeof(v);
	r = getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &v, &l);
	kv("protocol", "%d", r == 0 ? v : -1);
	/* wait for the host to close, so every SETOPT is out first */
	write_all(fd, "x", 1);
	r = (int)read(fd, &c, 1);
	counters();
	close(fd);
	return 0;
}

/* ---- close: ABORT or not ---- */

static int cmd_abort(char **av)
{
	const char *mode = av[2];
	int fd = dial(av[0], av[1]), v = 0, i;
	char buf[100];

	if (fd < 0)
		return 0;
	/* the host sends 100 bytes */
	if (strcmp(mode, "clean") == 0) {
		if (recv(fd, buf, sizeof(buf), MSG_WAITALL) != sizeof(buf))
			fail("read 100");
	} else {
		for (i = 0; i < 500 && v < 100; i++) {
			ioctl(fd, FIONREAD, &v);
			if (v < 100)
				usleep(10000);
		}
		kv("unread", "%d", v);
	}
	if (strcmp(mode, "linger") == 0) {
		struct linger l = {.l_onoff = 1, .l_linger = 0};

		if (recv(fd, buf, sizeof(buf), MSG_WAITALL) != sizeof(buf))
			fail("read 100");
		if (setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l)) < 0)
			fail("SO_LINGER");
	}
	if (strcmp(mode, "dup") == 0) {
		/* closing one of two duplicates is not the last close */
		int d = dup(fd);

		close(fd);
		counters();
		kv("dup_closed", "1");
		fd = d;
	}
	close(fd);
	counters();
	return 0;
}

/* ---- listen/accept ---- */

static int cmd_listen(char **av)
{
	struct sockaddr_storage ss, peer;
	socklen_t len, pl = sizeof(peer);
	int fam = addr_of(av[0], av[1], &ss, &len), fd, c, one = 1;
	char buf[65536], ab[128];
	ssize_t r;

	fd = socket(fam, SOCK_STREAM, 0);
	if (fd < 0)
		fail("socket");
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&ss, len) < 0)
		fail("bind");
	if (listen(fd, 16) < 0) {
		kv("listen", "%s", ename(errno));
		close(fd);
		counters();
		return 0;
	}
	len = sizeof(ss);
	getsockname(fd, (struct sockaddr *)&ss, &len);
	kv("listening", "%s", fmt_addr((struct sockaddr *)&ss, ab, sizeof(ab)));
	c = accept4(fd, (struct sockaddr *)&peer, &pl, SOCK_CLOEXEC);
	if (c < 0)
		fail("accept");
	kv("accept_peer", "%s", fmt_addr((struct sockaddr *)&peer, ab, sizeof(ab)));
	kv("accept_len", "%u", pl);
	names(c, "c.");
	while ((r = read(c, buf, sizeof(buf))) > 0)
		write_all(c, buf, (size_t)r);
	if (r < 0)
		fail("read");
	close(c);
	close(fd);
	counters();
	return 0;
}

/* ---- dup ---- */

static int cmd_dup(char **av)
{
	int fd = dial(av[0], av[1]), d;
	char buf[8];

	if (fd < 0)
		return 0;
	d = dup2(fd, 100);
	if (d != 100)
		fail("dup2");
	close(fd);
	names(d, "d.");
	write_all(d, "ping", 4);
	kv("echo", "%s", recv(d, buf, 4, MSG_WAITALL) == 4 && memcmp(buf, "ping", 4) == 0 ? "OK" : "BAD");
	d = fcntl(100, F_DUPFD_CLOEXEC, 200);
	close(100);
	names(d, "f.");
	counters();
	close(d);
	return 0;
}

/* ---- exec: an inherited stream ---- */

static int cmd_exec(char **av, const char *self)
{
	int fd = dial(av[0], av[1]);
	char n[16];

	if (fd < 0)
		return 0;
	fcntl(fd, F_SETFD, 0);
	snprintf(n, sizeof(n), "%d", fd);
	execl(self, self, "adopted", n, (char *)NULL);
	fail("exec");
	return 1;
}

static int cmd_adopted(char **av)
{
	int fd = atoi(av[0]), v = 0, one = 1, r;
	char buf[8];

	names(fd, "a.");
	r = setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	kv("a.nodelay", "%s", r == 0 ? "OK" : ename(errno));
	write_all(fd, "ping", 4);
	kv("a.echo", "%s", recv(fd, buf, 4, MSG_WAITALL) == 4 && memcmp(buf, "ping", 4) == 0 ? "OK" : "BAD");
	(void)v;
	counters();
	close(fd);
	return 0;
}

/* ---- a socket closed behind the library's back ---- */

static int cmd_stale(char **av)
{
	int fd = dial(av[0], av[1]), sv[2], v = -1;
	FILE *f;

	if (fd < 0)
		return 0;
	kv("stream_fd", "%d", fd);
	/* glibc's fclose closes the descriptor internally, not through close() */
	f = fdopen(fd, "r+");
	if (f == NULL)
		fail("fdopen");
	fclose(f);
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
		fail("socketpair");
	kv("reused", "%d", sv[0] == fd || sv[1] == fd);
	names(fd, "s.");
	write_all(sv[0] == fd ? sv[1] : sv[0], "abc", 3);
	if (ioctl(fd, FIONREAD, &v) < 0)
		kv("s.fionread", "%s", ename(errno));
	else
		kv("s.fionread", "%d", v);
	close(sv[0]);
	close(sv[1]);
	counters();
	return 0;
}

/* ---- many threads at once ---- */

struct thr {
	const char *a, *p;
	int rounds, ok;
	unsigned seed;
};

static void *thread_main(void *arg)
{
	struct thr *t = arg;
	int i;

	for (i = 0; i < t->rounds; i++) {
		struct sockaddr_storage ss;
		socklen_t len;
		int fam = addr_of(t->a, t->p, &ss, &len), fd, j, good;
		char out[8192], in[8192];
		size_t got = 0;

		fd = socket(fam, SOCK_STREAM | SOCK_CLOEXEC | (i % 2 ? SOCK_NONBLOCK : 0), 0);
		if (fd < 0)
			continue;
		if (connect(fd, (struct sockaddr *)&ss, len) < 0) {
			struct pollfd p = {.fd = fd, .events = POLLOUT};
			int err = 0;
			socklen_t el = sizeof(err);

			if (errno != EINPROGRESS || poll(&p, 1, 10000) != 1 ||
			    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0 || err != 0) {
				close(fd);
				continue;
			}
		}
		fcntl(fd, F_SETFL, 0);
		for (j = 0; j < (int)sizeof(out); j++)
			out[j] = (char)rand_r(&t->seed);
		write_all(fd, out, sizeof(out));
		while (got < sizeof(in)) {
			ssize_t r = read(fd, in + got, sizeof(in) - got);

			if (r <= 0)
				break;
			got += (size_t)r;
		}
		good = got == sizeof(in) && memcmp(in, out, sizeof(in)) == 0;
		close(fd);
		t->ok += good;
	}
	return NULL;
}

static int cmd_threads(char **av)
{
	int n = atoi(av[2]), rounds = atoi(av[3]), i, ok = 0;
	pthread_t th[64];
	struct thr t[64];

	if (n > 64)
		n = 64;
	for (i = 0; i < n; i++) {
		t[i] = (struct thr){.a = av[0], .p = av[1], .rounds = rounds, .seed = (unsigned)i + 1};
		pthread_create(&th[i], NULL, thread_main, &t[i]);
	}
	for (i = 0; i < n; i++) {
		pthread_join(th[i], NULL);
		ok += t[i].ok;
	}
	kv("threads_ok", "%d", ok);
	counters();
	return 0;
}

/* ---- sockets the library must leave alone ---- */

static int cmd_passthru(void)
{
	int sv[2], u, l, c, a, v = 0;
	struct sockaddr_in in = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t len = sizeof(in);
	char b[4];

	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
		fail("socketpair");
	write_all(sv[0], "abc", 3);
	if (read(sv[1], b, 3) != 3 || memcmp(b, "abc", 3) != 0)
		fail("socketpair data");
	ioctl(sv[1], FIONREAD, &v);
	kv("unix_fionread", "%d", v);
	close(sv[0]);
	close(sv[1]);
	u = socket(AF_INET, SOCK_DGRAM, 0);
	if (u < 0)
		fail("udp socket");
	close(u);
	/* a loopback TCP pair, through the default config's tcp rules */
	l = socket(AF_INET, SOCK_STREAM, 0);
	if (l < 0 || bind(l, (struct sockaddr *)&in, sizeof(in)) < 0 || listen(l, 1) < 0 ||
	    getsockname(l, (struct sockaddr *)&in, &len) < 0)
		fail("loopback listen");
	c = socket(AF_INET, SOCK_STREAM, 0);
	if (connect(c, (struct sockaddr *)&in, sizeof(in)) < 0)
		fail("loopback connect");
	a = accept(l, NULL, NULL);
	write_all(c, "xyz", 3);
	if (read(a, b, 3) != 3 || memcmp(b, "xyz", 3) != 0)
		fail("loopback data");
	kv("loopback", "OK");
	close(a);
	close(c);
	close(l);
	counters();
	return 0;
}

static int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	int n = 0;

	while (d != NULL && (e = readdir(d)) != NULL)
		if (e->d_name[0] != '.')
			n++;
	if (d != NULL)
		closedir(d);
	return n - 1; /* the directory's own */
}

int main(int argc, char **argv)
{
	int r = 2;

	alarm(60); /* never hang a test run */
	if (argc < 2)
		return 2;
	if (strcmp(argv[1], "fds") == 0) {
		kv("fds", "%d", count_fds());
		return 0;
	}
	kv("fds_before", "%d", count_fds());
	if (strcmp(argv[1], "connect") == 0 && argc >= 4)
		r = cmd_connect(argv + 2);
	else if (strcmp(argv[1], "bindconnect") == 0 && argc == 5)
		r = cmd_bindconnect(argv + 2);
	else if (strcmp(argv[1], "echo") == 0 && argc == 6)
		r = cmd_echo(argv + 2);
	else if (strcmp(argv[1], "reset") == 0 && argc == 4)
		r = cmd_reset(argv + 2);
	else if (strcmp(argv[1], "epoll") == 0 && argc == 4)
		r = cmd_epoll(argv + 2);
	else if (strcmp(argv[1], "fork") == 0 && argc == 6)
		r = cmd_fork(argv + 2);
	else if (strcmp(argv[1], "waitall") == 0 && argc == 6)
		r = cmd_waitall(argv + 2);
	else if (strcmp(argv[1], "fionread") == 0 && argc == 5)
		r = cmd_fionread(argv + 2);
	else if (strcmp(argv[1], "opts") == 0 && argc == 4)
		r = cmd_opts(argv + 2);
	else if (strcmp(argv[1], "abort") == 0 && argc == 5)
		r = cmd_abort(argv + 2);
	else if (strcmp(argv[1], "listen") == 0 && argc == 4)
		r = cmd_listen(argv + 2);
	else if (strcmp(argv[1], "dup") == 0 && argc == 4)
		r = cmd_dup(argv + 2);
	else if (strcmp(argv[1], "exec") == 0 && argc == 4)
		r = cmd_exec(argv + 2, argv[0]);
	else if (strcmp(argv[1], "adopted") == 0 && argc == 3)
		r = cmd_adopted(argv + 2);
	else if (strcmp(argv[1], "stale") == 0 && argc == 4)
		r = cmd_stale(argv + 2);
	else if (strcmp(argv[1], "threads") == 0 && argc == 6)
		r = cmd_threads(argv + 2);
	else if (strcmp(argv[1], "passthru") == 0)
		r = cmd_passthru();
	/* every descriptor the program opened is closed again; the library
	 * may keep one, its control connection */
	kv("fds_after", "%d", count_fds());
	return r;
}
