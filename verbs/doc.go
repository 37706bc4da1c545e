// Package verbs is the provider-neutral RDMA verbs API that the SDP engine
// is written against: devices, protection domains, memory regions, type-2
// memory windows, completion queues, reliable-connected queue pairs and a
// connection manager. It has no cgo. Two providers implement it: verbs/ibv
// (rdma-core through cgo: HCAs, soft-RoCE, siw) and verbs/soft (pure Go, in
// process or over TCP/Unix streams between hosts without HCAs).
// verbs/verbstest is the conformance suite both pass.
//
// # What it owns
//
//   - The interfaces (Provider, Device, PD, MR, MW, CQ, QP, Conn, Listener)
//     and the plain data that crosses them: SendWR, RecvWR, SGE, Bind,
//     Completion, QPOptions, ConnParam, ListenOptions, ResolveOptions.
//   - Typed enumerations with the libibverbs values and wire names:
//     Access, Opcode, SendFlags, Status, QPState, CompletionOp, EventType,
//     RejectReason, ServiceID.
//   - The errors: sentinels (ErrNotSupported, ErrInvalid, ErrClosed (which
//     is net.ErrClosed), ErrBusy, ErrQPState, ErrQueueFull, ErrCQOverflow,
//     ErrRefused, ErrUnreachable, ErrTimeout, ErrDisconnected, ErrProtocol,
//     ErrCompletion) and typed errors carrying detail (*PostError,
//     *CompletionError, *RejectError, *PrivateDataError, *AddrError,
//     *BusyError), each unwrapping to a sentinel.
//   - Helpers both providers and their users need: AllocDMA (memory outside
//     the Go heap, for regions), PollFD (wait for a descriptor on Go's
//     netpoller with a context), Dial/AcceptConn (the connect and accept
//     sequences with receives posted before the peer may send) and PollWait
//     (poll, arm, poll, wait).
//
// # Design
//
// The shapes follow libibverbs and librdmacm so verbs/ibv maps them one to
// one: lists of work requests per post (a *PostError names the first one not
// posted, like bad_wr), batches of completions per poll, completion
// notification armed per CQ (next or solicited-only, as ibv_req_notify_cq)
// and delivered through a file descriptor that Go's netpoller waits on, so a
// waiting goroutine never holds an OS thread. Addresses in SGEs are virtual
// addresses inside registered regions and keys are the 32-bit lkey/rkey, so
// a buffer in guest memory is described in place. Enumerations that callers
// build (Opcode, CompletionOp, EventType) start at 1 so a zero value is
// caught as invalid; the others keep the libibverbs numbering.
//
// A connection is an identifier (Conn, an rdma_cm_id) that owns at most one
// queue pair. The active side resolves (Device.Resolve), creates the QP,
// posts its receives and connects with REQ private data; the passive side
// takes a request from a Listener, reads its private data, then accepts
// (creating its QP first) or rejects with private data. Refusals are told
// apart, as SDP needs: a REJ or no listener wraps ErrRefused (ECONNREFUSED;
// *RejectError says which), no route wraps ErrUnreachable (ENETUNREACH), no
// answer wraps ErrTimeout (ETIMEDOUT). Private data limits depend on the
// provider and the service ID (Device.PrivateDataLimits):
//
//   - verbs/soft: any service ID, the IB CM sizes at offset 0 — REQ 92, REP
//     196, REJ 148 — so SDP's service ID 0x10000|port carries the full Hello.
//   - verbs/ibv listening or connecting with IP addressing on RDMA_PS_TCP
//     (service ID 0x01060000|port): the RDMA CM's 36-byte header leaves 56
//     bytes of REQ private data (SDP sends a compact Hello); REP 196.
//   - verbs/ibv connecting actively to a legacy SDP listener with native IB
//     addressing (AF_IB, service ID 0x10000|port): 92 bytes at offset 0.
//     Listening on an SDP service ID is refused with ErrNotSupported: a
//     mainline kernel lets no user-space listener bind that range.
//
// Events that are not completions arrive on Conn.Events: connection
// manager events (established, disconnected) and QP-affiliated verbs events
// (fatal, request error, access error, SQ drained, CQ error). Each type is
// delivered at most once per connection, so the channel (EventQueueLen) is
// never full for the provider; Close closes it.
//
// # Object lifetimes
//
// Device → PD → {MR, MW, QP}; Device → {CQ, Listener, Conn}; Conn → QP;
// CQ is used by QPs; MR is bound by MWs. A parent's Close fails with a
// *BusyError (ErrBusy) while children are open; Close is idempotent.
// Device.Resources counts live objects, and the conformance suite fails a
// case that leaves any. Memory given to RegMR must stay mapped until the MR
// is closed; after MR.Close returns the provider no longer touches it.
//
// # Threat model
//
// The consumer of this package (the daemon) is trusted; the peer at the
// other end of a connection is not. Providers validate every frame, key,
// right and bound on the peer's behalf, and report the peer's faults as
// completion statuses, events and errors, scoped to the one connection: an
// access outside what was registered fails the request (REM_ACCESS_ERR at
// the requester, the responder's QP in the error state with
// EventQPAccessError), a broken protocol resets the connection
// (ErrProtocol). Values from the peer never cause a panic. Guest memory is
// registered with local access only; it is exposed to a peer, if at all,
// through a type-2 window bound to exactly one buffer and invalidated when
// done.
//
// # Concurrency
//
// Every object is safe for concurrent use. Posting, polling and arming may
// run on different goroutines; CQ.Wait and PollFD.Wait admit one waiter at a
// time. This package holds no locks of its own beyond PollFD's waiter lock
// and DMA's mapping lock, both leaves. It never logs.
package verbs
