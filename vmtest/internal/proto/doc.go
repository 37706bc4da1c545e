// Package proto is the wire format between the vmtest host and the guest
// agent: framed messages over a byte stream (a virtio-serial port in the
// guest, the QEMU chardev's Unix socket on the host).
//
// # Frame layout
//
//	offset size
//	0      4    magic "VSDA"
//	4      1    type (Type)
//	5      3    reserved, zero
//	8      4    request id, big endian (0 in Hello)
//	12     4    payload length, big endian, at most MaxPayload
//	16     n    payload: JSON of the message the type names
//
// The agent speaks first: a Hello when it starts (again after a restart).
// The host sends requests with ids it chooses; the agent answers each with
// one Reply carrying the same id, in any order (requests run concurrently).
// A Cancel carries the id of a running Exec and has no reply of its own.
//
// # Threat model
//
// Both ends are ours, but the byte stream may carry noise (a serial line,
// the rest of a frame a restarted agent never finished) and a peer may be
// buggy: ReadFrame checks the magic, the type, the reserved bytes and the
// length bound before allocating, and never panics (fuzzed by
// FuzzReadFrame). ReadFrameSync skips noise to the next well-formed header.
// Message validation (Exec.Validate and friends) is the receiver's job.
package proto
