// Package refpeer is an independent SDP codec for a reference test peer that
// behaves like the last shipped SDP implementation, Linux OFED ib_sdp
// (protocol 2.2, "gen2" in ref/sdp-protocol.md).
//
// It exists to catch misreadings of the protocol in package sdpback/wire:
// it was written separately from wire, from the reference's offset tables,
// in a different style — C-struct mirrors (BSDH, HH, HAH, SrcAH, SinkAH)
// named as ib_sdp's sdp.h names them, absolute byte offsets from the start of
// the message, encoding/binary — and shares no code or constants with wire.
// The cross-tests in this directory check that every message either codec
// encodes decodes identically in the other.
//
// It covers only what ib_sdp speaks: BSDH, Hello, HelloAck, Data, DisConn,
// AbortConn, SendSM, SrcAvail, SrcAvailCancel, RdmaRdCompl, ChRcvBuf and
// ChRcvBufAck, plus SinkAvail, which it parses only so that a test peer can
// recognise it and reset the connection as ib_sdp does. Other MIDs parse
// their BSDH (ib_sdp refreshes credits from every message) and then fail
// with ErrUnknownMID, the "FIXME: discard" path. There is no compact Hello:
// ib_sdp does not know it.
//
// Validation is deliberately close to ib_sdp's, plus the framing checks a
// test peer needs to catch an engine's mistakes (len equal to the received
// byte count, extended header present, payload only where allowed). It
// checks no reserved bits and no value ranges: a test peer must be able to
// send odd but legal values, and to build malformed messages by patching
// the bytes Marshal returns.
//
// The peer itself — a connection on verbs that behaves as ib_sdp does —
// is the subpackage ibsdp, which speaks through this codec; this package
// stays free of any vsdp import (TestIndependent).
//
// Threat model: test-only. Inputs come from the engine under test; parsers
// still never panic on any input (fuzzed by FuzzCross). Concurrency:
// stateless, safe for concurrent use. The package never logs.
package refpeer
