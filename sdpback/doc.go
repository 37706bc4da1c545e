// Package sdpback is the host side of every guest stream: per VM, the
// control service guest processes talk to (guestdrv/ctl), the policy that
// sends a destination over SDP, over host TCP, back to the guest's own
// stack or nowhere, the tickets of dials in progress, the fabric listeners
// exported for guest listeners, and the bridges that join each guest
// stream to its SDP (sdpback/sdp) or host TCP connection. Exports publish
// host TCP services on the fabric so VMs reach hosts that do not run vsdp.
//
// sdpback depends on no device package: the guest-facing device (vsock)
// reaches it through the small interfaces in guest.go (Handler, Stream,
// Device, Answer), adapted in the daemon.
//
// # Flows
//
// DIAL: the policy decides at once (DENY errno, LOCAL, or TICKET port); a
// ticket starts the fabric dial while the guest connects its vsock socket
// to the ticket port; that connection is answered — RESULT on the control
// connection first, then RESPONSE or RST — only when the dial is done.
// LISTEN: a fabric listener on the VM's address; each incoming connection
// is announced with PEER, then connected to the guest's listening port.
// A failed stream sends RESET{errno} on the VM's control connections
// before the vsock RST, so the guest library can report ECONNRESET rather
// than EOF.
//
// # File streams
//
// VM.DialFile and VM.ListenFile open streams with no guest device in
// between, for the socket filesystem (sdpback/sockfs): the same policy,
// limits, listener registry (a port announced through a file and one
// LISTENed through the control protocol collide) and accounting as vsock
// streams, so they appear in VM.Streams. Their errors are *FileError
// values carrying the errno a TCP user expects; a "local" rule has no
// meaning without a guest stack and gives ENETUNREACH.
//
// # Threat model
//
// Guest processes are untrusted. Control frames are decoded strictly; a
// malformed frame, a host-to-guest type from the guest, or a guest that
// lets its control output grow past 64 KiB loses that control connection
// (counted), nothing else. Per VM, streams, tickets, listeners and control
// connections are bounded (VMConfig); a ticket the guest never connects
// expires; a ticket port is honoured only for its own VM (every VM has its
// own VM value, stack and tables, so one VM cannot name another's streams
// or listeners). Guest data is buffered only within the guest's vsock
// credit (guest to fabric) and the engine's receive buffers or a 256 KiB
// pull buffer (fabric to guest). Host TCP is used only where a rule says
// tcp; the default is deny.
//
// # Concurrency
//
// VM.mu guards the VM's tables; bridge.mu and ctlConn.mu their own state.
// No lock is held while calling the device, the engine, or another
// object's methods that lock (lock order: VM.mu is never held while taking
// bridge.mu or ctlConn.mu). Each bridge runs a writer goroutine (guest to
// fabric) and, for host TCP, a reader goroutine; each DIAL runs one
// goroutine until its dial completes; each guest listener one accept loop.
package sdpback
