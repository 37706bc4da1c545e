// Package sockfs is vsdp's socket filesystem: a Plan 9-style /net for one
// VM, served as a fuse.RawFileSystem (the virtio-fs device hands it to
// go-fuse's fuse.ProtocolServer), so shells, static binaries and Go
// programs reach the fabric with open, read and write. It owns the
// namespace, the connection directories and their lifetime; the streams
// themselves are sdpback's file streams (VM.DialFile, VM.ListenFile), in
// the VM's stream table with its policy, limits, listener registry and
// counters, beside the vsock streams.
//
// # Namespace (the root is what the guest mounts as /net)
//
//	path             mode  read                              write
//	tcp/             0555  clone and the numbers N in use
//	tcp/clone        0666  (the fd is N's ctl)               (the fd is N's ctl)
//	tcp/N/           0700  owned by the uid that cloned it
//	tcp/N/ctl        0600  "N\n"                             a command (below)
//	tcp/N/data       0600  the byte stream (blocking)        the byte stream
//	tcp/N/listen     0600  open parks until a call arrives on announced N; the fd is the new M's ctl
//	tcp/N/local      0400  "10.1.0.10!49152\n"
//	tcp/N/remote     0400  "10.1.0.7!5000\n"
//	tcp/N/status     0400  Idle | Dialing ADDR | Established(SDP|TCP) | Announced ADDR | Closed |
//	                       Refused|Denied|Unreachable|Timeout|Reset|Aborted|Failed: strerror (policy detail)
//	tcp/N/stats      0400  path, out (bytes written), in (bytes read), local, remote, nodelay, keepalive
//	stats            0444  the VM's counters, then "stream PATH LOCAL REMOTE out N in N file|vsock G:H" lines
//	policy           0444  the rules in force (VMConfig.Policy), first match wins
//
// Ctl commands (one per write, at most MaxCtl bytes, a trailing newline
// allowed; anything else is EINVAL): "connect ADDR!PORT" (parks until the
// stream is up; fails with ECONNREFUSED, ETIMEDOUT, ENETUNREACH, the
// policy rule's errno — EACCES by default — or ENETUNREACH where the
// policy says local, since a file stream has no guest stack to fall back
// to), "announce *!PORT" or "announce ADDR!PORT" (ADDR the VM's own; PORT
// 0 picks one; EADDRINUSE when the VM's listener registry, shared with
// the vsock path's LISTEN, has it), "hangup", "keepalive [SECONDS]",
// "nodelay [on|off]" (both remembered before connect and applied to the
// stream), and "shutdown" (an extension: half close, the peer reads EOF
// after the data written so far). On SDP the keepalive period is the
// engine's, per stack (sdp.Config.Keepalive); the request is recorded and
// shown in stats. Data files: reads return what has arrived (short reads),
// 0 bytes at the peer's close or after a local hangup, ECONNRESET after a
// reset, ENOTCONN before a connect; writes after hangup get EPIPE.
//
// # Lifetime
//
// As in Plan 9: a connection directory lives while any of its files is
// open; closing the last one hangs the connection up and releases the
// directory; its number N is reused only after that (lowest free first).
// Node IDs are structural (fixed nodes, then 16 + incarnation<<3 | file),
// incarnations are never reused, so the kernel's handle on a released
// directory resolves to ESTALE even after N is reused, and LOOKUP and
// FORGET need no per-lookup state. Directories are bounded per VM: the
// VM's stream limit bounds those with a live stream, Options.MaxIdle
// those without (Idle, Closed, failed), Options.MaxHandles the open
// files; beyond them opens get ENFILE.
//
// # Blocking semantics, and why event-driven programs use vsock
//
// Every file is direct I/O and non-seekable (FOPEN_DIRECT_IO |
// FOPEN_NONSEEKABLE) with zero entry and attribute timeouts, so each read
// and write reaches the stream and every name is revalidated. Reads,
// writes, connect and listen block; O_NONBLOCK is ignored. Linux's
// virtiofs driver has no notification queue, so the server can never wake
// a guest poll() or epoll_wait(): a file that claimed EAGAIN would never
// become readable again (Go's netpoller, and any edge-triggered loop,
// would hang), and poll on a virtiofs file reports "always ready". So the
// only honest semantics are blocking ones. Event-driven programs, Go
// programs that use package net, and anything that needs poll belong on
// the vsock path (libvsdp.so, guestdrv/vsdpnet), whose sockets the guest
// kernel tracks itself.
//
// # Parked requests
//
// virtiofs drops FUSE_INTERRUPT, so a guest process killed while a read is
// parked waits, unkillable, until the request is answered. Every parked
// request therefore has an owner that completes it: hangup (on any fd of
// the connection, or the last close) and FS.Close complete parked reads
// (EOF), writes (EPIPE), connects (ECONNABORTED) and listen opens
// (ECONNABORTED); a peer's close or reset completes reads (EOF,
// ECONNRESET); VM.Close ends every stream (ECONNRESET). An interrupt that
// does arrive (a /dev/fuse transport) aborts a parked connect or listen.
// Each parked request holds a virtqueue descriptor chain, so the device's
// queue size bounds how many can park (see vhost/virtiofs).
//
// # Threat model
//
// The guest — its kernel as much as its users — is untrusted. Every node
// ID and file handle is looked up, never assumed: unknown ones get ESTALE
// or EBADF, nothing panics or logs. A connection directory belongs to the
// uid that created it (InHeader.Caller) with mode 0700 and files 0600 or
// 0400; the tree checks ownership itself on LOOKUP, OPEN, OPENDIR,
// READDIR, ACCESS and SETATTR, so another uid gets EACCES even without
// the kernel's default_permissions and even holding a node ID. Root
// passes, as with default_permissions. Open handles are not re-checked
// (fd passing works as for any file). stats lists all of the VM's
// streams' addresses to every local user, like /proc/net/tcp. Growth is
// bounded (Lifetime); ctl writes are bounded and parsed strictly
// (FuzzCtl). Policy is the VM's: a guest reaches only what its rules
// name, the same as on the vsock path, and never sees another VM's
// streams (each VM has its own FS).
//
// # Concurrency and lock order
//
// FS.mu guards the tables (numbers, incarnations, handles, reference
// counts); conn.mu a connection's state; handle.mu a text file's
// snapshot. Order: FS.mu before conn.mu; neither is held across a call
// that blocks (a stream's Read or Write, a dial, an accept) — with one
// exception, announce holds conn.mu across VM.ListenFile, which takes
// only the VM's lock and never blocks on the network. The package starts
// one goroutine per parked connect or listen, and only when the transport
// supplies an interrupt channel; it ends with the request.
package sockfs
