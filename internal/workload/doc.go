// Package workload is the client and server halves of the stream workload
// that the VM-tier benchmarks run inside their guests, so that the tables
// comparing paths (the product path beside virtio-net, SDP beside kernel
// TCP) measure every path with the same code:
//
//   - Bulk sends a buffer in fixed-size writes, half-closes, and reads back
//     the 32-byte SHA-256 that the server (Digest) answers with once it has
//     read to end of stream;
//   - PingPong sends numbered fixed-size messages one at a time to an echo
//     server, checks each echo byte for byte, and times all but the first
//     few (warm-up).
//
// Design: functions over a net.Conn that return errors and durations; the
// caller dials, times what it wants timed, checks the digest against its
// own hash and prints the figures. Nothing here knows a transport.
//
// Threat model: test support. The peer is the test's own server, but a
// short or wrong reply is an error, never a panic, and every loop is
// bounded by the sizes the caller gives (and by the connection's deadline,
// which the caller sets).
//
// Concurrency: each call uses its connection from one goroutine; calls on
// different connections are independent. No shared state, no locks. The
// package never logs.
package workload
