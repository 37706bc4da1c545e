/*
 * init.c - resolving the real calls, the configuration, logging, fork hooks.
 */
#include "vsdp.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <syslog.h>
#include <unistd.h>

struct vsdp_real vsdp_real;
atomic_int vsdp_state;
struct vsdp_config vsdp_cfg;
struct vsdp_counters vsdp_cnt;

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
static int log_fd = -1;

/* The shipped default (guestdrv/vsdp.conf without its comments): used when
 * no configuration file exists. */
static const char default_rules[] =
	"use tcp server * 127.0.0.0/8:*\n"
	"use tcp server * [::1]:*\n"
	"use tcp client * 127.0.0.0/8:*\n"
	"use tcp client * [::1]:*\n"
	"use both server * *:*\n"
	"use both client * *:*\n";

#define RESOLVE(name) vsdp_real.name = (__typeof__(vsdp_real.name))dlsym(RTLD_NEXT, #name)

static void resolve(void)
{
	RESOLVE(socket);
	RESOLVE(connect);
	RESOLVE(bind);
	RESOLVE(listen);
	RESOLVE(accept);
	RESOLVE(accept4);
	RESOLVE(getsockname);
	RESOLVE(getpeername);
	RESOLVE(getsockopt);
	RESOLVE(setsockopt);
	RESOLVE(ioctl);
	RESOLVE(close);
	RESOLVE(close_range);
	RESOLVE(closefrom);
	RESOLVE(dup);
	RESOLVE(dup2);
	RESOLVE(dup3);
	RESOLVE(fcntl);
	RESOLVE(fcntl64);
	RESOLVE(read);
	RESOLVE(readv);
	RESOLVE(recv);
	RESOLVE(recvfrom);
	RESOLVE(recvmsg);
	RESOLVE(write);
	RESOLVE(writev);
	RESOLVE(send);
	RESOLVE(sendto);
	RESOLVE(sendmsg);
	RESOLVE(shutdown);
	RESOLVE(epoll_ctl);
	if (vsdp_real.fcntl64 == NULL)
		vsdp_real.fcntl64 = vsdp_real.fcntl;
}

static int env_uint(const char *name, unsigned long max, unsigned long *out)
{
	const char *v = secure_getenv(name);
	char *end;
	unsigned long x;

	if (v == NULL || *v == 0)
		return 0;
	errno = 0;
	x = strtoul(v, &end, 10);
	if (errno != 0 || *end != 0 || x > max)
		return -1;
	*out = x;
	return 1;
}

void vsdp_log(int level, const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	int n, dest = vsdp_cfg.rules.log_dest, min = vsdp_cfg.rules.log_level;

	if (vsdp_cfg.debug) {
		dest = dest == VSDP_LOG_NONE ? VSDP_LOG_STDERR : dest;
		min = 1;
	}
	if (dest == VSDP_LOG_NONE || level < min)
		return;
	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof(buf) - 2)
		n = (int)sizeof(buf) - 2;
	if (dest == VSDP_LOG_SYSLOG) {
		buf[n] = 0;
		syslog(level >= 9 ? LOG_ERR : LOG_DEBUG, "libvsdp: %s", buf);
		return;
	}
	buf[n++] = '\n';
	if (dest == VSDP_LOG_FILE && log_fd >= 0) {
		(void)!vsdp_real.write(log_fd, buf, (size_t)n);
		return;
	}
	(void)!vsdp_real.write(2, "libvsdp: ", 9);
	(void)!vsdp_real.write(2, buf, (size_t)n);
}

static void load_config(void)
{
	struct vsdp_rules_err errs[16];
	const char *path = secure_getenv("VSDP_CONFIG");
	char *text = NULL;
	size_t len = 0;
	int fd, nerr, i;

	if (path == NULL || *path == 0)
		path = "/etc/vsdp.conf";
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		struct stat st;

		if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size <= VSDP_CONFIG_MAX) {
			text = malloc((size_t)st.st_size + 1);
			while (text != NULL && len < (size_t)st.st_size) {
				ssize_t r = vsdp_real.read(fd, text + len, (size_t)st.st_size - len);

				if (r <= 0)
					break;
				len += (size_t)r;
			}
		}
		vsdp_real.close(fd);
	}
	if (text == NULL) {
		nerr = vsdp_rules_parse(default_rules, sizeof(default_rules) - 1, &vsdp_cfg.rules,
					errs, 16);
		return;
	}
	nerr = vsdp_rules_parse(text, len, &vsdp_cfg.rules, errs, 16);
	free(text);
	if (vsdp_cfg.rules.log_dest == VSDP_LOG_FILE)
		log_fd = open(vsdp_cfg.rules.log_file, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
	for (i = 0; i < nerr && i < 16; i++)
		vsdp_log(9, "%s:%d: %s (line ignored)", path, errs[i].line, errs[i].msg);
}

static void atfork_prepare(void)
{
	ctl_atfork_prepare();
	tab_atfork_prepare();
}

static void atfork_parent(void)
{
	tab_atfork_parent();
	ctl_atfork_parent();
}

static void atfork_child(void)
{
	tab_atfork_child();
	ctl_atfork_child();
}

static void do_init(void)
{
	unsigned long v;
	const char *dis;

	resolve();
	vsdp_cfg.ctl_timeout_ms = 5000;
	vsdp_cfg.host_cid = 2;
	vsdp_cfg.ctl_port = VSDP_CTL_DEFAULT_PORT;
	if (env_uint("VSDP_DEBUG", 1, &v) > 0)
		vsdp_cfg.debug = (int)v;
	dis = secure_getenv("VSDP_DISABLE");
	if (dis != NULL && *dis != 0 && strcmp(dis, "0") != 0) {
		atomic_store(&vsdp_state, 2);
		return;
	}
	if (env_uint("VSDP_CTL_TIMEOUT_MS", 600000, &v) > 0 && v > 0)
		vsdp_cfg.ctl_timeout_ms = (int)v;
	if (env_uint("VSDP_HOST_CID", 0xffffffffUL, &v) > 0)
		vsdp_cfg.host_cid = (uint32_t)v;
	if (env_uint("VSDP_CTL_PORT", 0xffffffffUL, &v) > 0)
		vsdp_cfg.ctl_port = (uint32_t)v;
	if (tp_configure() < 0) {
		vsdp_log(9, "bad VSDP_TEST_* setting: library disabled");
		atomic_store(&vsdp_state, 2);
		return;
	}
	load_config();
	pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
	atomic_store(&vsdp_state, 1);
}

void vsdp_init(void)
{
	pthread_once(&init_once, do_init);
}

__attribute__((constructor)) static void vsdp_ctor(void)
{
	vsdp_init();
}

int vsdp_decide(int role, const struct sockaddr *sa, socklen_t len)
{
	int idx, act = vsdp_rules_match_sa(&vsdp_cfg.rules, role, program_invocation_short_name,
					   sa, len, &idx);

	if (act == VSDP_ACT_NONE)
		act = VSDP_ACT_BOTH; /* libsdp: no match means both */
	vsdp_log(1, "%s %s: rule %d -> %s", program_invocation_short_name,
		 role == VSDP_ROLE_SERVER ? "server" : "client",
		 idx >= 0 ? vsdp_cfg.rules.v[idx].line : 0, vsdp_action_name(act));
	return act;
}

VSDP_EXPORT int vsdp_counters(struct vsdp_counters *out, size_t size)
{
	struct vsdp_counters c;
	size_t i, n = sizeof(c) / sizeof(uint64_t);
	uint64_t *src = (uint64_t *)&vsdp_cnt, *dst = (uint64_t *)&c;

	for (i = 0; i < n; i++)
		dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
	if (size > sizeof(c))
		size = sizeof(c);
	memcpy(out, &c, size);
	return 0;
}
