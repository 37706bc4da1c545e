/*
 * vsdp-conf - check a libvsdp configuration and show what it decides.
 *
 *   vsdp-conf [-c FILE]                          check FILE, print its rules
 *   vsdp-conf [-c FILE] client|server PROG ADDR PORT
 *                                                print the action for a socket
 *
 * FILE defaults to $VSDP_CONFIG, then /etc/vsdp.conf. Exit status: 0 good,
 * 1 errors in the file, 2 usage.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rules.h"

static int usage(void)
{
	fprintf(stderr, "usage: vsdp-conf [-c FILE] [client|server PROGRAM ADDR PORT]\n");
	return 2;
}

int main(int argc, char **argv)
{
	const char *path = getenv("VSDP_CONFIG");
	struct vsdp_rules r;
	struct vsdp_rules_err errs[64];
	char *text = NULL, line[VSDP_PROG_MAX + 128];
	size_t len = 0, cap = 0, i;
	int nerr, a = 1;
	FILE *f;

	if (argc > 2 && strcmp(argv[1], "-c") == 0) {
		path = argv[2];
		a = 3;
	}
	if (path == NULL || *path == 0)
		path = "/etc/vsdp.conf";
	if (argc != a && argc != a + 4)
		return usage();
	f = fopen(path, "r");
	if (f == NULL) {
		fprintf(stderr, "vsdp-conf: %s: %s\n", path, strerror(errno));
		return 1;
	}
	for (;;) {
		size_t n;

		if (len == cap) {
			char *t;

			cap = cap ? cap * 2 : 4096;
			if (cap > VSDP_CONFIG_MAX + 1)
				cap = VSDP_CONFIG_MAX + 1;
			t = realloc(text, cap);
			if (t == NULL) {
				fprintf(stderr, "vsdp-conf: out of memory\n");
				return 1;
			}
			text = t;
		}
		n = fread(text + len, 1, cap - len, f);
		len += n;
		if (n == 0 || len > VSDP_CONFIG_MAX)
			break;
	}
	fclose(f);
	nerr = vsdp_rules_parse(text, len, &r, errs, 64);
	free(text);
	if (nerr < 0) {
		fprintf(stderr, "vsdp-conf: out of memory\n");
		return 1;
	}
	for (i = 0; i < (size_t)nerr && i < 64; i++)
		fprintf(stderr, "%s:%d: %s\n", path, errs[i].line, errs[i].msg);
	if (argc == a) {
		for (i = 0; i < r.n; i++) {
			vsdp_rule_format(&r.v[i], line, sizeof(line));
			printf("%s\t# line %d\n", line, r.v[i].line);
		}
		if (r.n == 0)
			printf("# no rules: every socket is 'both'\n");
	} else {
		uint8_t addr[16];
		char *end;
		unsigned long port = strtoul(argv[a + 3], &end, 10);
		int fam = 4, role, idx, act;

		if (strcmp(argv[a], "client") == 0 || strcmp(argv[a], "connect") == 0)
			role = VSDP_ROLE_CLIENT;
		else if (strcmp(argv[a], "server") == 0 || strcmp(argv[a], "listen") == 0)
			role = VSDP_ROLE_SERVER;
		else
			return usage();
		if (inet_pton(AF_INET, argv[a + 2], addr) != 1) {
			fam = 6;
			if (inet_pton(AF_INET6, argv[a + 2], addr) != 1)
				return usage();
		}
		if (*end != 0 || port > 65535)
			return usage();
		act = vsdp_rules_match(&r, role, argv[a + 1], fam, addr, (uint16_t)port, &idx);
		if (idx >= 0)
			printf("%s\t# line %d\n", vsdp_action_name(act), r.v[idx].line);
		else
			printf("both\t# no rule matched\n");
	}
	vsdp_rules_free(&r);
	return nerr > 0 ? 1 : 0;
}
