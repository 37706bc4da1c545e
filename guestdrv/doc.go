// Package guestdrv is the guest side of vsdp, and this Go package is its
// test host.
//
// The directory holds three things:
//
//   - libvsdp/ - libvsdp.so, a C preload library (ARCHITECTURE.md §2.2) that
//     moves a guest program's TCP sockets onto the vsdp device, chosen per
//     socket by libsdp.conf rules (/etc/vsdp.conf, $VSDP_CONFIG); and
//     vsdp-conf, which checks a configuration. Built by build.sh.
//   - vsdpnet/ - the same for Go programs (which LD_PRELOAD cannot reach): a
//     net.Conn/net.Listener dialer over the same control protocol.
//   - this package - FakeHost, a scripted stand-in for vsdpd's control
//     service over a test transport, used by the tests of both.
//
// docs/guest.md is the user's guide; docs/control-protocol.md the protocol;
// guestdrv/ctl its Go codec, which libvsdp/vsdp_ctl.h mirrors (a test checks
// both against each other, and a fuzz target decodes the same bytes with
// both).
//
// # libvsdp.so: design
//
// socket() of an AF_INET/AF_INET6 stream socket makes the real TCP socket
// and records it. connect() matches the client rules; for sdp/both it asks
// the host (DIAL) and follows the answer: LOCAL or a tcp rule connects the
// TCP socket; DENY fails with the host's errno; TICKET makes an AF_VSOCK
// socket, dup3()s it over the program's descriptor (keeping O_NONBLOCK,
// FD_CLOEXEC and the socket timeouts), re-registers it in every epoll set
// that held the old file, and connects it to the ticket port. The kernel
// does the waiting (EINPROGRESS, EPOLLOUT, SO_ERROR); the library replaces
// the kernel's ECONNRESET (or a test transport's ECONNREFUSED/ENOENT) with
// the host's RESULT errno in connect() and getsockopt(SO_ERROR). bind() of
// an offloaded server records the address; listen() registers it (LISTEN)
// and swaps in a vsock listener; accept() pairs each connection with the
// host's PEER (or asks WHO) and reports the remote AF_INET address. Names
// are answered from RESULT/PEER/WHO in the program's own family (IPv4 in a
// v4-mapped AF_INET6 address for an AF_INET6 socket).
//
// What vsock lacks is filled in: FIONREAD by peeking; TCP and IP options
// accepted (TCP_NODELAY, TCP_CORK, keepalive knobs and TCP_USER_TIMEOUT
// forwarded as SETOPT); MSG_WAITALL in 128 KiB pieces; EOF/EPIPE after the
// host's RESET reported as its errno (once per direction, no SIGPIPE); a
// last close with unread data or SO_LINGER {1, 0} preceded by ABORT.
// Streams inherited across exec are recognised by asking WHO.
//
// # Threat model and fault scope
//
// The library runs inside the guest program and trusts the guest kernel.
// The host's control frames are checked by the same rules as guestdrv/ctl:
// a malformed frame, a host-to-guest reply of the wrong kind or a silent host
// closes the control connection; the pending call then fails with
// ENETUNREACH/EADDRNOTAVAIL (sdp rules) or falls back to the guest's TCP
// (both rules), and the next call reconnects after a one-second pause.
// Errno values from the host outside 1..4095 are replaced (EACCES,
// ECONNREFUSED). Every wait for the host is bounded (VSDP_CTL_TIMEOUT_MS,
// default 5 s; notes 1-2 s); nothing the host sends can crash the program
// or make it write outside its buffers. Notes the program never claims are
// kept up to 1024, oldest dropped. The configuration is trusted but parsed
// defensively (bad lines are reported with their number and skipped); all
// environment variables are read with secure_getenv, so set-uid programs
// ignore them.
//
// # Concurrency and lock order
//
// Two mutexes: ctl.mu (the control connection and its notes; may wait on
// the host) before tab.mu (the fd table and socket records; short
// sections, with signals blocked so a handler cannot deadlock on it). No
// code holds tab.mu while it talks to the host. The fast path of every data
// call reads one atomic byte (the descriptor's kind) and takes no lock. The
// table grows in mmap'd chunks of 4096 entries, records come from an mmap'd
// pool: nothing on the close path calls malloc or free. fork() runs
// pthread_atfork handlers that take both locks, and marks every record that
// exists as shared, so neither process's close sends ABORT or UNLISTEN for
// it; the child opens its own control connection on first use (pid check).
//
// # FakeHost and the test transports
//
// The host kernel of a test machine has no vsock loopback, so libvsdp.so
// and vsdpnet take a test transport from the environment: with
// VSDP_TEST_UNIX_DIR every AF_VSOCK socket is an AF_UNIX stream socket in
// that directory; with VSDP_TEST_TCP_PORT it is TCP on 127.0.0.1 (see
// Transport). AF_UNIX reads a closed peer as EOF/EPIPE, as vsock reads an
// RST on an established stream, but its connects never return EINPROGRESS;
// TCP's do, as vsock's, so the tests run both. FakeHost serves the control
// protocol on either, answers each DIAL by a Plan (ticket with success or
// an errno, LOCAL, DENY, silence), exports listeners, plays incoming calls
// (PEER then connect), resets streams (RESET then close), answers WHO, and
// records every guest message as an Event.
//
// FakeHost trusts nothing from the guest: a malformed frame or a
// host-to-guest type ends that connection and is reported by Err. Its
// lock (FakeHost.mu) guards its tables; each control connection has a
// write lock taken after it, never before.
package guestdrv
