// Package sdp is vsdp's Sockets Direct Protocol engine: TCP stream
// semantics carried over reliable-connected queue pairs, driven only
// through the provider-neutral verbs API (verbs/soft or verbs/ibv), with
// the wire format from sdpback/wire. It announces protocol 2.2 and behaves
// as the last shipped implementation (OFED ib_sdp) expects.
//
// # What it does
//
// Connection set-up puts the Hello in the CM REQ private data and the
// HelloAck in the REP: the full 92-byte Hello on SDP service IDs
// (0x10000|port, verbs/soft), the compact Hello on RDMA_PS_TCP
// (0x01060000|port, verbs/ibv listening on a mainline kernel). Data moves
// by BCopy: Write copies into registered send buffers; SendGather sends
// straight from caller memory registered with the stack's PD (guest
// memory, local access only), with no copy. Credits follow gen2's formula
// and the CA4-82 reserve (see conn.go's primer); Nagle holds a partial
// message while data is unacknowledged, with a back-stop timer, unless
// SetNoDelay. Close follows the DisConn state machine with a timeout;
// close with unread data, Abort, any failed completion or a peer's
// disconnect out of turn reset the stream (ECONNRESET) — except a
// disconnect after the peer's own DisConn, TCP's RST after a FIN: what the
// peer sent stays readable, then EOF, and writes get EPIPE. Keepalive is a
// zero-length RDMA WRITE. A peer's Read-ZCopy offer (SrcAvail) is answered
// with SendSM so it falls back to BCopy, and its inline bytes are kept.
//
// Buffer sets. A connection's receive, send and control buffers (about
// 1 MiB with the defaults) are one registered set (pool.go). Allocating
// and registering it was half of a dial on rxe in a TCG guest, so the stack
// keeps up to Config.BufferSets sets of released connections registered,
// on its PD, and hands them to new connections; beyond that, connections
// allocate their own and free them. A set goes back only after its queue
// pair was destroyed (no device access can be in flight) and after it was
// zeroed (the receive and control buffers whole, the send buffers up to
// what the engine wrote), and never from a connection that failed during
// set-up. Stack.Close frees the idle sets. No set is registered for remote
// access.
//
// # Errors
//
// At the net.Conn edge: *net.OpError wrapping ECONNREFUSED, ENETUNREACH,
// ETIMEDOUT (dial), ECONNRESET (reset; also wraps ErrProtocol or
// ErrAborted with the cause), EPIPE (write after CloseWrite, or after the
// peer's DisConn and then its disconnect), io.EOF,
// net.ErrClosed and os.ErrDeadlineExceeded.
//
// # Threat model
//
// Remote peers are untrusted. Every received message is decoded and
// validated by sdpback/wire against the completion's byte count; mseq must
// advance by one and mseq_ack may not acknowledge unsent messages; data
// after DisConn, a second DisConn, or a MID this engine never solicited
// (SendSM, RdmaRdCompl, SinkAvail, ModeChange, …) resets that connection
// with ErrProtocol. Inflated credits cannot overrun the peer's receives
// unnoticed: RNR retry defaults to 0, so a send without a posted receive
// fails and resets. Memory is bounded per connection: RecvBufs receive
// buffers, SendBufs send buffers and a fixed number of control slots; the
// listener's backlog bounds pending connections, BufferSets the idle
// registered memory. A reused buffer set is zeroed first: one connection's
// data is never visible to the next. Nothing a peer sends can
// make the engine touch memory other than its own buffers and the memory
// a caller registered and named in SendGather.
//
// # Concurrency
//
// Each connection has a mutex (Conn.mu) guarding all of its state, a
// goroutine that waits for completions on the CQ through the netpoller,
// and one that waits for CM events. Neither holds the mutex while blocked.
// Readers and writers wait on a broadcast channel replaced on every state
// change. Callbacks (SetCallbacks) and SendGather completions run without
// the mutex held. Stack.mu also guards the idle buffer sets; a set is
// zeroed and freed outside it. Lock order: Stack.mu is never held while
// taking Conn.mu.
package sdp
