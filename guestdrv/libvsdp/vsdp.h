/*
 * vsdp.h - libvsdp.so internals shared between its files.
 *
 * Lock order: ctl.mu (control connection, may wait on the host) before
 * tab.mu (fd table, short sections with signals blocked). No function holds
 * tab.mu while it talks to the host. The fast path of every data call reads
 * one atomic byte (the fd's kind) and takes no lock.
 */
#ifndef VSDP_INTERNAL_H
#define VSDP_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "libvsdp.h"
#include "rules.h"
#include "vsdp_ctl.h"

#define VSDP_EXPORT __attribute__((visibility("default")))
#define VSDP_TLS __thread __attribute__((tls_model("initial-exec")))

/* ---- the real calls (init.c) ---- */
struct vsdp_real {
	int (*socket)(int, int, int);
	int (*connect)(int, const struct sockaddr *, socklen_t);
	int (*bind)(int, const struct sockaddr *, socklen_t);
	int (*listen)(int, int);
	int (*accept)(int, struct sockaddr *, socklen_t *);
	int (*accept4)(int, struct sockaddr *, socklen_t *, int);
	int (*getsockname)(int, struct sockaddr *, socklen_t *);
	int (*getpeername)(int, struct sockaddr *, socklen_t *);
	int (*getsockopt)(int, int, int, void *, socklen_t *);
	int (*setsockopt)(int, int, int, const void *, socklen_t);
	int (*ioctl)(int, unsigned long, ...);
	int (*close)(int);
	int (*close_range)(unsigned, unsigned, int);
	void (*closefrom)(int);
	int (*dup)(int);
	int (*dup2)(int, int);
	int (*dup3)(int, int, int);
	int (*fcntl)(int, int, ...);
	int (*fcntl64)(int, int, ...);
	ssize_t (*read)(int, void *, size_t);
	ssize_t (*readv)(int, const struct iovec *, int);
	ssize_t (*recv)(int, void *, size_t, int);
	ssize_t (*recvfrom)(int, void *, size_t, int, struct sockaddr *, socklen_t *);
	ssize_t (*recvmsg)(int, struct msghdr *, int);
	ssize_t (*write)(int, const void *, size_t);
	ssize_t (*writev)(int, const struct iovec *, int);
	ssize_t (*send)(int, const void *, size_t, int);
	ssize_t (*sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
	ssize_t (*sendmsg)(int, const struct msghdr *, int);
	int (*shutdown)(int, int);
	int (*epoll_ctl)(int, int, int, struct epoll_event *);
};

extern struct vsdp_real vsdp_real;
extern atomic_int vsdp_state; /* 0 not yet, 1 active, 2 disabled */

void vsdp_init(void);

static inline int vsdp_active(void)
{
	int s = atomic_load_explicit(&vsdp_state, memory_order_acquire);

	if (s == 0) {
		vsdp_init();
		s = atomic_load_explicit(&vsdp_state, memory_order_acquire);
	}
	return s == 1;
}

/* configuration (init.c) */
struct vsdp_config {
	struct vsdp_rules rules;
	int ctl_timeout_ms;   /* VSDP_CTL_TIMEOUT_MS, default 5000 */
	uint32_t host_cid;    /* VSDP_HOST_CID, default 2 */
	uint32_t ctl_port;    /* VSDP_CTL_PORT, default 1022 */
	int debug;            /* VSDP_DEBUG */
};
extern struct vsdp_config vsdp_cfg;

int vsdp_decide(int role, const struct sockaddr *sa, socklen_t len);
void vsdp_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* counters */
extern struct vsdp_counters vsdp_cnt;
#define VSDP_COUNT(field) __atomic_add_fetch(&vsdp_cnt.field, 1, __ATOMIC_RELAXED)

/* ---- the transport (transport.c): vsock, or a test transport ---- */
enum { TP_VSOCK = 0, TP_UNIX = 1, TP_TCP = 2 };
int tp_kind(void);
int tp_configure(void); /* from the environment; -1 on a bad setting */
int tp_socket(void);    /* a blocking SOCK_STREAM socket, close-on-exec */
int tp_connect_ctl(int fd, int timeout_ms);
int tp_prepare_dial(int fd, uint32_t timeout_ms);
int tp_connect(int fd, uint32_t port);
int tp_bind_listen(int fd);
int tp_local_port(int fd, uint32_t *port);
int tp_peer_port(int fd, uint32_t *port);
int tp_port_of(const struct sockaddr *sa, socklen_t len, uint32_t *port);
int tp_host_stream(int fd, uint32_t *gport, uint32_t *hport);
int tp_inq(int fd, int *n);
int tp_is_refusal(int err);

/* ---- the control connection (ctlconn.c) ---- */
int ctl_request(struct vsdp_ctl_msg *req, struct vsdp_ctl_msg *reply);
int ctl_send(const struct vsdp_ctl_msg *m);
int ctl_take(uint8_t type, uint32_t k1, uint32_t k2, struct vsdp_ctl_msg *out, int wait_ms);
void ctl_fd_closed(int lo, int hi);
void ctl_atfork_prepare(void);
void ctl_atfork_parent(void);
void ctl_atfork_child(void);

/* ---- the fd table (table.c) ---- */
enum fd_kind {
	FD_NONE = 0,   /* not ours: every call goes straight through */
	FD_TCP = 1,    /* an AF_INET/AF_INET6 stream socket not yet decided */
	FD_CONN = 2,   /* a device stream (connecting, connected or failed) */
	FD_LISTEN = 3, /* a device listener */
	FD_NATIVE = 4, /* an AF_VSOCK socket the program made itself */
	FD_FOREIGN = 5,/* checked once: not a device stream */
};

enum sock_state {
	ST_FRESH = 0,
	ST_CONNECTING,
	ST_CONNECTED,
	ST_FAILED,
	ST_LISTENING,
};

#define EPREG_MAX 8

struct epreg {
	int epfd;
	uint32_t gen;
	struct epoll_event ev;
};

/* TCP options remembered for getsockopt and forwarded to the host. */
enum { TOPT_NODELAY, TOPT_CORK, TOPT_KEEPIDLE, TOPT_KEEPINTVL, TOPT_KEEPCNT,
       TOPT_USER_TIMEOUT, TOPT_MAXSEG, TOPT_QUICKACK, TOPT_N };

struct vsock {
	struct vsock *next_free;
	int refs;
	int family;          /* AF_INET or AF_INET6: what the program sees */
	int state;           /* enum sock_state */
	int action;          /* decided rule action */
	uint32_t hport;      /* host vsock port: ticket, or PEER's id */
	uint32_t gport;      /* guest vsock port */
	int result_err;
	uint8_t have_result, have_addrs, bind_deferred, adopted, forked, linger_abort;
	uint8_t reset_rd, reset_wr, keepalive;
	int reset_err;
	uint32_t dial_flags;
	pid_t owner;
	dev_t dev;           /* the socket's identity: a number closed behind */
	ino_t ino;           /* our back and reused is not this record */
	struct vsdp_ctl_addr local, remote, bound;
	int topt[TOPT_N];
	uint8_t topt_set[TOPT_N];
	struct epreg eps[EPREG_MAX];
	int neps;
};

/* Table access. tab_lock blocks signals for the section. */
void tab_lock(sigset_t *old);
void tab_unlock(const sigset_t *old);
int tab_kind(int fd);                 /* lock-free */
struct vsock *tab_get(int fd);        /* under tab_lock */
uint32_t tab_gen(int fd);             /* under tab_lock */
int tab_set(int fd, int kind, struct vsock *s); /* under tab_lock; -1 if fd out of range */
struct vsock *tab_detach(int fd);     /* under tab_lock: kind NONE, gen++, returns s */
void tab_bump(int fd);                /* lock-free: gen++ (the number was closed) */
int tab_next_used(int fd, int last);  /* lock-free: next number with a table chunk */
struct vsock *sock_new(int family);   /* under tab_lock */
void sock_identify(struct vsock *s, int fd); /* records fd's file identity */
void sock_put(struct vsock *s);       /* under tab_lock: drop a reference */
void tab_mark_forked(void);           /* under tab_lock */
void tab_atfork_prepare(void);
void tab_atfork_parent(void);
void tab_atfork_child(void);

/* Snapshot of what a data call needs, taken under the lock. */
struct sock_view {
	int kind, family, state, adopted, forked, linger_abort;
	uint32_t gport, hport;
};
int view_of(int fd, struct sock_view *v);

/* helpers shared between the wrapper files */
int release_fd(int fd, int do_abort); /* before a real close of fd */
int eof_or_reset(int fd, int reading);
int map_connect_error(int fd, int err);
void rereg_epoll(int fd);
int fill_sockaddr(int family, const struct vsdp_ctl_addr *a, struct sockaddr *sa,
		  socklen_t *len);
int addr_from_sockaddr(const struct sockaddr *sa, socklen_t len, struct vsdp_ctl_addr *a);

#endif /* VSDP_INTERNAL_H */
