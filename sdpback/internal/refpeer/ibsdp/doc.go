// Package ibsdp is the reference peer: an SDP connection on bare verbs
// that behaves as the last shipped implementation, Linux OFED ib_sdp
// (protocol 2.2, "gen2" in ref/sdp-protocol.md), so the engine in
// sdpback/sdp can be tested against it in both directions. It speaks
// through the independent codec in package refpeer and shares nothing with
// sdpback/wire or the engine.
//
// # What it does
//
// Dial sends the 92-byte Hello (version 2.2, MaxAdverts 1, LocalRcvSz 32 KiB
// plus the BSDH) to the SDP service ID; Listener.Accept checks a Hello as
// gen2's passive side does and answers with a HelloAck. Credits follow
// gen2's formula, refreshed from every BSDH; data goes only above the
// two-credit reserve, control messages with two credits, a credit update
// (Data without payload) with one, when the peer's view of our receives has
// fallen behind. Payload per message is min(peer size − 16, 64 KiB − 1296).
// Close follows gen2's state flow: DisConn after the queued data, the first
// closer issues the CM disconnect once both DisConns are through, a CM
// disconnect out of turn resets. As a sink it keeps a SrcAvail's inline
// bytes and, once the reader consumed them, answers SendSM (it never RDMA
// reads); a second SrcAvail arriving while one is being processed is taken
// as Data without stripping its 16-byte SrcAvail header (ref §10.5) and
// answered with SendSM. SinkAvail and AbortConn reset. ChRcvBuf is
// answered with the size kept (without the BSDH). Unknown MIDs are
// discarded after their credits are read.
//
// Every message from the engine is checked against what a gen2 host relies
// on — mseq in order, mseq_ack naming a message we sent, the reserve rule
// computed from what the engine knew when it sent (our advertisement its
// mseq_ack names, less what it sent since), framing, nothing after DisConn
// — and breaches are recorded (Violations), so an interop test can assert
// there were none. Send posts any message outside the rules, for tests.
//
// # Threat model
//
// Test-only. Input comes from the engine under test; a malformed message is
// recorded and resets the connection, never panics. Memory is bounded by
// the receive and send rings and Options.MaxUnread (past it, receives stop
// being reposted until the test reads).
//
// # Concurrency
//
// A Conn has no goroutines: it processes completions only inside its own
// methods (polling the CQ through the netpoller), so a test decides when
// the peer reacts and can hold the engine in any state. A Conn is used by
// one goroutine at a time; Listener.Accept may run in another. The package
// never logs.
package ibsdp
