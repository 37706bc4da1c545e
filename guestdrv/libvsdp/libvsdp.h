/*
 * libvsdp.h - the public face of libvsdp.so beyond the socket calls it
 * replaces: event counters, for tests and for diagnosing a guest program.
 *
 *   struct vsdp_counters c;
 *   int (*get)(struct vsdp_counters *, size_t) = dlsym(RTLD_DEFAULT, "vsdp_counters");
 *   if (get != NULL && get(&c, sizeof(c)) == 0) ...
 *
 * Counters only grow; they are process-wide, and a forked child starts with
 * its parent's values.
 */
#ifndef LIBVSDP_H
#define LIBVSDP_H

#include <stddef.h>
#include <stdint.h>

struct vsdp_counters {
	uint64_t ctl_opens;        /* control connections opened (HELLO answered) */
	uint64_t ctl_failures;     /* control connections that failed or broke */
	uint64_t dials;            /* DIAL requests sent */
	uint64_t tickets;          /* TICKET answers */
	uint64_t locals;           /* LOCAL answers, and fallbacks to the guest's TCP */
	uint64_t denies;           /* DENY answers */
	uint64_t swaps;            /* sockets replaced by device sockets (dup3) */
	uint64_t epoll_rereg;      /* epoll registrations carried over a swap */
	uint64_t result_mapped;    /* connect errors replaced by RESULT's errno */
	uint64_t resets_mapped;    /* EOF/EPIPE turned into RESET's errno */
	uint64_t aborts;           /* ABORT messages sent */
	uint64_t setopts;          /* SETOPT messages sent */
	uint64_t listens;          /* LISTEN_OK answers */
	uint64_t accepts;          /* device connections accepted */
	uint64_t peers_missing;    /* accepted connections without a PEER (WHO asked) */
	uint64_t waitall_chunks;   /* recv calls made to serve MSG_WAITALL in pieces */
	uint64_t inq_emulated;     /* FIONREAD answers computed by peeking */
	uint64_t adopted;          /* inherited device sockets recognised (exec) */
	uint64_t protocol_errors;  /* malformed or unexpected control frames */
};

/* vsdp_counters copies the counters into out (size = sizeof(*out) of the
 * caller's header; a smaller size copies a prefix). Returns 0. */
int vsdp_counters(struct vsdp_counters *out, size_t size);

#endif /* LIBVSDP_H */
