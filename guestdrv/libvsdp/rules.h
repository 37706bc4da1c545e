/*
 * rules.h - the libsdp.conf rule syntax, parsed and matched.
 *
 *   use <sdp|tcp|both> <server|listen|client|connect> <program> <addr[/prefix]|*>:<port[-port]|*>
 *   log [destination stderr|syslog|file <path>] [min-level <1-9>]
 *
 * '#' starts a comment; blank lines are ignored; keywords are case-insensitive.
 * Programs are shell wildcards (fnmatch) matched against the program's short
 * name. The address is the bound local address for servers and the remote
 * address for clients; IPv6 addresses are written bare (the last ':' splits
 * the port) or in brackets. Rules are evaluated in order; the first match wins.
 *
 * Pure code: no interception, no global state; the caller owns the memory.
 */
#ifndef VSDP_RULES_H
#define VSDP_RULES_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

enum vsdp_action {
	VSDP_ACT_NONE = 0, /* no rule matched */
	VSDP_ACT_SDP = 1,  /* through the device; fail if it is absent */
	VSDP_ACT_TCP = 2,  /* the guest's own TCP stack */
	VSDP_ACT_BOTH = 3, /* through the device; the guest's TCP if it is absent */
};

enum vsdp_role {
	VSDP_ROLE_SERVER = 1,
	VSDP_ROLE_CLIENT = 2,
};

enum vsdp_log_dest {
	VSDP_LOG_NONE = 0,
	VSDP_LOG_STDERR = 1,
	VSDP_LOG_SYSLOG = 2,
	VSDP_LOG_FILE = 3,
};

#define VSDP_PROG_MAX 255
#define VSDP_PATH_MAX 1024
#define VSDP_RULES_MAX 4096
#define VSDP_CONFIG_MAX (1 << 20)

struct vsdp_rule {
	uint8_t action;          /* enum vsdp_action */
	uint8_t role;            /* enum vsdp_role */
	uint8_t family;          /* 0 any address, 4 IPv4, 6 IPv6 */
	uint8_t prefix;          /* prefix length in bits */
	uint8_t addr[16];        /* masked to prefix; IPv4 in the first four */
	uint16_t port_lo, port_hi;
	int line;
	char prog[VSDP_PROG_MAX + 1];
};

struct vsdp_rules {
	struct vsdp_rule *v;
	size_t n;
	int log_dest;   /* enum vsdp_log_dest; NONE when no log statement */
	int log_level;  /* 1 (debug) .. 9 (errors only) */
	char log_file[VSDP_PATH_MAX + 1];
};

struct vsdp_rules_err {
	int line;
	char msg[160];
};

/* vsdp_rules_parse parses text (len bytes, need not be NUL-terminated) into
 * out. Lines with errors are skipped; up to maxerr of them are described in
 * errs. It returns the number of erroneous lines, or -1 if memory ran out
 * (out is then empty). out must be released with vsdp_rules_free. */
int vsdp_rules_parse(const char *text, size_t len, struct vsdp_rules *out,
		     struct vsdp_rules_err *errs, size_t maxerr);

void vsdp_rules_free(struct vsdp_rules *r);

/* vsdp_rules_match returns the action of the first rule matching (role,
 * program, address family fam (4 or 6), address, port), and its index in
 * *idx (-1 when none matched), or VSDP_ACT_NONE. addr is 4 or 16 bytes in
 * network order. */
int vsdp_rules_match(const struct vsdp_rules *r, int role, const char *prog, int fam,
		     const uint8_t *addr, uint16_t port, int *idx);

/* vsdp_rules_match_sa is vsdp_rules_match on a socket address; IPv4-mapped
 * IPv6 addresses match as IPv4. It returns VSDP_ACT_NONE for other families. */
int vsdp_rules_match_sa(const struct vsdp_rules *r, int role, const char *prog,
			const struct sockaddr *sa, socklen_t len, int *idx);

/* vsdp_rule_format writes the normalized text of one rule ("use sdp client
 * prog 10.0.0.0/8:80-90") into buf and returns its length (snprintf rules). */
int vsdp_rule_format(const struct vsdp_rule *rule, char *buf, size_t cap);

const char *vsdp_action_name(int action);

#endif /* VSDP_RULES_H */
