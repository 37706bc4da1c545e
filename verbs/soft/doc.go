// Package soft is a pure-Go verbs provider with real reliable-connected
// semantics. It is the default provider where no HCA exists and what the
// tests use: two devices in one process (the in-process transport) or
// vsdpd instances on hosts without HCAs (the stream transport, TCP or Unix
// sockets).
//
// # What it owns
//
// Device (verbs.Device; Open, Provider), protection domains, memory regions,
// type-2 memory windows, completion queues with an eventfd, RC queue pairs
// and the connection manager; the two transports; the wire format
// (frame.go); fault injection (Inject) and the copy instrumentation (Touch,
// RegionStats, Device.Stats).
//
// # Addressing
//
// There is no IPoIB and no subnet manager. A Table maps each fabric IPv4
// address (this device's included) to an Endpoint: "inproc:NAME" (a device
// on the same Network), "tcp:HOST:PORT" or "unix:PATH". Resolve looks the
// peer up (no entry: ErrUnreachable); the REQ carries source and destination
// fabric addresses and the service ID, and the passive device hands it to
// the listener bound to (address, service ID) or (any, service ID), or
// rejects it with RejectInvalidServiceID. Any service ID can be bound, and
// private data is carried at offset 0 with the IB CM sizes (REQ 92, REP 196,
// REJ 148), so SDP uses its own service ID and the full Hello.
//
// # Design
//
// Each connection has one link (an in-process pipe of frames, or one stream
// socket) carrying the CM exchange (REQ, REP/REJ, RTU, later DREQ/DREP) and
// then the RC traffic. The RC engine is described at the top of qp.go:
// in-order requests with PSNs, ACK/NAK/READ responses, go-back on RNR with
// the responder's timer (RNR retry 0 fails at once, 7 retries forever),
// completions in posting order, flush on the error state, rkey/lkey, rights
// and bounds checked on every access (zero-length RDMA checks no key), a
// failed remote access NAKed to the requester while the responder's QP
// enters the error state with EventQPAccessError and no completion. A peer
// that answers nothing for Options.AckTimeout fails the oldest request with
// RETRY_EXC_ERR, as an HCA's transport retries would; a lost link does the
// same at once. A CQ that overflows refuses every later completion, Poll
// reports ErrCQOverflow, and each QP that lost one enters the error state
// with EventCQError and EventQPFatal.
//
// Data moves like DMA. The in-process transport passes descriptions of the
// sender's region segments and the receiver copies straight from them into
// the destination: one copy per byte, as an HCA makes. The stream transport
// copies through 64 KiB user-space buffers on each side (counted as
// Device.Stats().StagedBytes; the kernel's socket copies come on top).
// Every copy to or from registered memory is reported to Options.Touch and
// counted per region (RegionStats), so callers can count host copies
// honestly.
//
// Deviations from IB, by design: a message is one frame (no path MTU or
// packet sequence per message); no P_Key, atomics or SRQ; ConnParam's
// RetryCount, ResponderResources and InitiatorDepth are accepted and ignored
// (the transport is reliable, READs are not limited in flight beyond the
// queue depths); while bytes of a large transfer still move on the link the
// ack timeout does not fire; type-2 windows are invalidated when their QP
// is destroyed; SQD holds new sends but is otherwise RTS; a fence waits for
// every earlier request, not only READs; lkeys are checked for inline data
// too; the REP is not handed to the consumer before ESTABLISHED.
//
// # Threat model
//
// The peer of a stream link is untrusted; the consumer (the daemon) and the
// configuration are trusted, and so are in-process peers. From the stream
// every header is checked field by field against its type before the engine
// sees it (decodeHeader; FuzzFrame), payload lengths are bounded by
// MaxMsgSize and are consumed in 64 KiB chunks, so no length from the peer
// sizes an allocation. Every remote access is resolved against the key
// table with overflow-safe bounds, and region memory is only touched through
// resolved segments while the region is held (mr.acquire), so a peer can
// never reach memory outside what was registered for it, nor memory being
// deregistered. Work from the peer is bounded: requests must arrive in PSN
// order and within the depth it declared, unanswered requests beyond twice
// that depth reset the link (a peer that floods without reading), incoming
// links must send their REQ within HandshakeTimeout and at most
// MaxHandshakes may be pending, listener backlogs are bounded. Faults are
// scoped to the connection: a refused access errors that QP (the peer sees
// REM_ACCESS_ERR); a malformed or unexpected frame, a PSN out of order,
// frames after close or a flood reset the link — the oldest request fails
// with BAD_RESP_ERR, the rest flush, and the consumer gets
// EventQPRequestError and EventDisconnected carrying a *FrameError
// (verbs.ErrProtocol). Nothing the peer sends panics. FuzzStream drives a
// connected responder with hostile frame sequences and checks that memory
// outside the registered region is untouched.
//
// # Concurrency and lock order
//
// Each connection has two goroutines while its link is up: the reader (the
// only consumer of frames) and the writer (the only sender); neither holds a
// lock while blocked on the link. Timers (RNR, acknowledgement, disconnect,
// handshake) run as Clock.AfterFunc callbacks. A stream device adds an
// accept goroutine and one goroutine per link in its handshake. All stop
// before Close returns.
//
// One mutex per connection, conn.mu, guards the connection and its queue
// pair (the engine state in qp). Payload is copied into registered memory
// in chunks, each under conn.mu after checking the QP is still live, so no
// byte lands in a buffer whose work request has already completed. Lock
// order: listener.mu → conn.mu → cq.mu; conn.mu → Device.keys.mu →
// Device.mu; listener.mu → Device.mu. cq.mu, mr.mu and the in-process pipe
// locks are leaves; mr.acquire never blocks, so copying between two regions
// cannot deadlock. Options.Touch is called with conn.mu held.
//
// # Fault injection
//
// Inject(conn) returns an Injector: DropLink (both sides fail what is in
// flight with RETRY_EXC_ERR and see EventDisconnected), SetDelay (delay each
// batch of outgoing frames), ForceError (EventQPFatal and a flush; the peer
// is not told) and WithholdReceives (the peer's sends meet RNR NAKs).
// Clock lets tests drive the timers.
package soft
